"""A study's own config and its lock (``tmad_ray.search.state``): what ``--resume`` runs with, and
that two drivers never run one study."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tmad_ray.config import config_from_dict
from tmad_ray.search import state
from tmad_ray.storage import Storage


class Refused(Exception):
    pass


def saved_study(tmp_path, cfg, **extra) -> Storage:
    results = Storage(str(tmp_path / "ray"))
    results.write_text(json.dumps({"name": "s-1", "config": state.saved_form(cfg), **extra}), "s-1", state.STATE_FILE)
    return results


def test_resume_uses_the_saved_config_and_lists_what_a_command_line_changes(tmp_path):
    started = config_from_dict({"train": {"epochs": 7}, "search": {"num_samples": 4},
                                "tracking": {"tracking_uri": "http://user:secret@mlflow:5000"}})
    results = saved_study(tmp_path, started)
    assert "secret" not in results.read_text("s-1", state.STATE_FILE)  # no credentials kept in storage
    plain = config_from_dict({})
    cfg, finished = state.resumed_config(plain, results, "s-1", explicit=False, error=Refused)
    assert (cfg.train.epochs, cfg.search.num_samples, finished) == (7, 4, None)
    assert cfg.tracking.tracking_uri == plain.tracking.tracking_uri  # where this command line logs
    same = config_from_dict({"train": {"epochs": 7}, "search": {"num_samples": 4}})
    assert state.resumed_config(same, results, "s-1", explicit=True, error=Refused)[0].train.epochs == 7
    other = config_from_dict({"train": {"epochs": 9}, "search": {"num_samples": 4}})
    with pytest.raises(Refused, match=r"other settings than this command line's: train.epochs: study 7, command "
                                      r"line 9\. Resume it"):
        state.resumed_config(other, results, "s-1", explicit=True, error=Refused)


def test_a_finished_study_says_so(tmp_path):
    results = saved_study(tmp_path, config_from_dict({}), finished="2026-12-05 10:00:00")
    assert state.resumed_config(config_from_dict({}), results, "s-1", False, Refused)[1] == "2026-12-05 10:00:00"


def test_a_second_driver_is_refused_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    results = Storage(str(tmp_path / "ray"))
    results.make_dirs("s-1")
    here = socket.gethostname()
    # a live driver on this host (here: pid 1, always alive) holds it
    results.write_text(json.dumps({"host": here, "pid": 1, "start": state._process_start(1), "since": "then"}),
                       "s-1", state.LOCK_FILE)
    with pytest.raises(Refused, match=rf"study s-1 is being run by another driver \(host {here}, pid 1"):
        state.take_lock(results, "s-1", Refused)
    # a driver on another host cannot be checked: refused, with the file to delete if it is gone
    results.write_text(json.dumps({"host": "elsewhere", "pid": 1}), "s-1", state.LOCK_FILE)
    with pytest.raises(Refused, match=r"delete .*tmad_study.lock"):
        state.take_lock(results, "s-1", Refused)
    # a dead driver (its process gone) on this host: taken over, released at the end
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    results.write_text(json.dumps({"host": here, "pid": gone.pid, "start": "123"}), "s-1", state.LOCK_FILE)
    state.take_lock(results, "s-1", Refused)
    assert json.loads(results.read_text("s-1", state.LOCK_FILE))["pid"] == os.getpid()
    state.take_lock(results, "s-1", Refused)  # its own lock again: fine
    state.release_lock(results, "s-1")
    assert not results.is_file("s-1", state.LOCK_FILE)


def test_a_reused_pid_is_not_the_driver_that_locked():
    me = state.holder()
    assert not state.lock_is_stale(me)
    assert state.lock_is_stale({**me, "start": str(int(me["start"]) + 1)})  # same pid, another process

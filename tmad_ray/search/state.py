"""What a study keeps beside Tune's experiment state, so that ``--resume`` continues the same study.

* its config (overrides applied), saved when it starts: ``--resume`` alone runs with that config,
  and a command line that says something else is refused with the differences (one study, one
  set of settings); a finished study is said to be finished and left as it is;
* a lock while a driver runs it (host, pid and that process's start time): a second driver is
  refused, and a lock whose driver is gone (same host, process dead) is taken over.

Both live in the study's directory under ``storage.ray_results`` (a local path or a URI).
"""

from __future__ import annotations

import json
import os
import socket
import time

from tmad_ray.storage import Storage

STATE_FILE = "tmad_study.json"  # beside Tune's experiment state: the parent run, the config, whether it finished
LOCK_FILE = "tmad_study.lock"


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_form(cfg) -> dict:
    """The config as the study keeps it: plain JSON, without the tracking URI (it may hold credentials;
    a resumed study logs where the command line says, to the parent run it began with)."""
    tree = cfg.model_dump(mode="json")
    tree["tracking"].pop("tracking_uri", None)
    return tree


def config_differences(saved: dict, now: dict) -> list[str]:
    """``key: study <saved>, command line <now>`` for every key whose value differs."""
    a, b = flatten(saved), flatten(now)
    return [f"{k}: study {a.get(k)!r}, command line {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart; None if
    there is no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return "?"


def holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def lock_is_stale(lock: dict) -> bool:
    """A lock is stale when its driver ran on this host and that process is gone (or is another
    process under a reused pid). A driver on another host cannot be checked from here: not stale."""
    if lock.get("host") != socket.gethostname():
        return False
    start = _process_start(int(lock.get("pid", -1)))
    return start is None or (lock.get("start") not in (None, "?") and start not in ("?", lock["start"]))


def take_lock(results: Storage, study: str, error) -> None:
    """Hold the study's lock, or raise ``error(message)`` naming the driver that holds it."""
    if results.is_file(study, LOCK_FILE):
        lock = json.loads(results.read_text(study, LOCK_FILE))
        mine = lock.get("host") == socket.gethostname() and lock.get("pid") == os.getpid()
        if not mine and not lock_is_stale(lock):
            raise error(f"study {study} is being run by another driver (host {lock.get('host')}, pid "
                        f"{lock.get('pid')}, since {lock.get('since')}): wait for it to end or stop it first. If "
                        f"that driver is gone (its machine was lost), delete {results.uri(study, LOCK_FILE)}")
    results.write_text(json.dumps(holder()), study, LOCK_FILE)


def release_lock(results: Storage, study: str) -> None:
    if results.is_file(study, LOCK_FILE):
        lock = json.loads(results.read_text(study, LOCK_FILE))
        if lock.get("host") == socket.gethostname() and lock.get("pid") == os.getpid():
            results.fs.delete_file(results.path(study, LOCK_FILE))


def resumed_config(cfg, results: Storage, study: str, explicit: bool, error):
    """The config ``--resume`` runs ``study`` with: the one saved with it. With ``explicit`` (the command
    line gave overrides) the command line's config must say the same, else ``error`` lists the
    differences. Returns ``(config,
    finished)`` (when it finished, or None); a study saved by an older version (no config kept) runs with
    ``cfg``."""
    from tmad_ray.config import config_from_dict

    state = json.loads(results.read_text(study, STATE_FILE))
    saved = state.get("config")
    if saved is None:
        return cfg, state.get("finished")
    if explicit and (diff := config_differences(saved, saved_form(cfg))):
        raise error(f"study {study} was started with other settings than this command line's: {'; '.join(diff)}. "
                    f"Resume it without overrides (`--resume {study}` runs it with its own config), or start a new "
                    "study without --resume")
    saved["tracking"]["tracking_uri"] = cfg.tracking.tracking_uri
    return config_from_dict(saved, source=f"the config saved with study {study}"), state.get("finished")

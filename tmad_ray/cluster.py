"""Connecting to Ray: the cluster a command runs in, or a local one with enough logical CPUs.

Under ``ray job submit`` (``RAY_ADDRESS`` set) or next to a ``ray start`` cluster, it attaches
to that cluster. Otherwise a local Ray starts; on a small machine it gets more
logical CPUs than cores, because training workers (and a trial's driver) each hold a CPU for the
whole run, and one more is kept free for Ray's own tasks (the decode pipeline's scheduling, the
frozen-target build, Tune's bookkeeping) so that nothing waits forever for a free CPU.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_STARTED: dict[str, str] = {}  # what init_ray set in this process for the local Ray it started


def shutdown_ray() -> None:
    """Stop the Ray this process started or attached to, and forget the State API address set for a
    local one: left in the environment it would point the next local Ray's placement-group cleaner
    at a dead dashboard (stopped trials would then keep their CPUs and the next trial wait forever)."""
    import ray

    ray.shutdown()
    if os.environ.get("RAY_API_SERVER_ADDRESS") == _STARTED.pop("api_server", None):
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _api_server(context) -> None:
    """Attached to a running cluster: point Ray Train's placement-group cleaner (the State API) at that
    cluster's dashboard, which it would otherwise look for among every Ray on the machine."""
    url = getattr(context, "dashboard_url", None)
    if url and not os.environ.get("RAY_API_SERVER_ADDRESS"):
        os.environ["RAY_API_SERVER_ADDRESS"] = url if "://" in url else f"http://{url}"
        _STARTED["api_server"] = os.environ["RAY_API_SERVER_ADDRESS"]


def cpus_needed(cfg, concurrent_runs: int = 1, per_run_extra: float = 0.0) -> float:
    """Logical CPUs for ``concurrent_runs`` training runs plus one kept free."""
    t = cfg.train
    return concurrent_runs * (t.num_workers * t.cpus_per_worker + per_run_extra) + 1


def local_trials(cfg) -> int:
    """Trials a local Ray runs at once: as many as fill this machine's cores with their workers (at
    least one, at most ``search.max_concurrent_trials`` and the study's size). On a CPU machine a
    trial of one worker per core, several trials at once, finishes a study sooner than one trial of
    DDP workers across the cores: the per-trial start-up (processes, imports, models) of one trial
    then overlaps the training of another (docs/guide.md, "Where a trial's first seconds go")."""
    t, s = cfg.train, cfg.search
    if t.use_gpu:
        return 1  # a local GPU machine: the trial's workers share its GPUs; no measurement says otherwise
    k = max(1, int((os.cpu_count() or 1) // (t.num_workers * t.cpus_per_worker)))
    return max(1, min(k, s.max_concurrent_trials or k, s.num_samples))


def init_ray(cfg, concurrent_runs: int = 1, per_run_extra: float = 0.0, quiet: bool = False,
             worker_logs: bool = True) -> dict:
    """Attach to the running cluster or start a local Ray sized for the config; returns its resources.
    ``worker_logs=False``: the workers' output stays in Ray's log files (``/tmp/ray/session_latest/logs``
    on each node) instead of being copied to this process's terminal."""
    import logging

    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    quiet_ray = {} if worker_logs else {"log_to_driver": False, "logging_level": logging.WARNING}
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        _api_server(ray.init(**quiet_ray))  # the cluster of `ray job submit` (or the one RAY_ADDRESS names)
        return ray.cluster_resources()
    if not address and os.path.exists(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")):
        # `ray start` wrote this: attach to that cluster (never to another driver's private Ray)
        _api_server(ray.init(address="auto", **quiet_ray))
        return ray.cluster_resources()
    cores = os.cpu_count() or 1
    # A small, busy machine can take more than Ray Train's default 60 s to start a worker group
    # (fresh processes importing torch and transformers); the processes of this Ray inherit this.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # Ray Train's controller looks at its workers every 2 s by default: each trial waits up to that for
    # its workers to be seen running, and again for them to be seen done. 0.5 s: an empty trial took
    # 15.0 s instead of 16.4 s here (`tmad-ray bench startup`).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    need = cpus_needed(cfg, concurrent_runs, per_run_extra)
    num_cpus = max(cores, int(-(-need // 1)))
    # Ray warns on the terminal once the processes started on a node reach 5x the number it starts at
    # once (the cores): a trial is 3+ processes (trial, Train controller, workers), so two trials at
    # once on 2 cores trip it though nothing is wrong. Start as many at once as there are logical CPUs.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(num_cpus))
    # Ray Train's placement-group cleaner finds "its" cluster through the State API, which looks for
    # any Ray on the machine and gives up when there are two (a second study, a test's Ray): then a
    # trial that Tune stops keeps its CPUs and the next trial waits forever. Tell it which one.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    _STARTED["api_server"] = os.environ["RAY_API_SERVER_ADDRESS"]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, **quiet_ray)
    if num_cpus > cores and not quiet:
        print(f"local Ray: {num_cpus} logical CPUs on {cores} cores (a run needs {need - 1:g} for its workers"
              f"{' and driver' if per_run_extra else ''}, 1 more kept free)", file=sys.stderr)
    return ray.cluster_resources()

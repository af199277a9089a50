"""Before anything is decoded, cached or tracked on a cluster of several nodes: can every node see
every path the run reads or writes, and does every node log to the same MLflow?

On one machine every path is shared. On a cluster, a path on the head's disk is a different (or
missing) directory on every other node: workers there cannot open the videos, write the clip cache
or checkpoints to their own disk, and each logs to its own ``sqlite:`` file. So when the Ray
cluster has more than one node, each key below must be a URI (``s3://``, ``gs://``, ...) or a
path that every node sees (a shared mount, checked with a marker the driver writes and a tiny Ray
task on each node reads), and the tracking URI must be a server. Otherwise one line per problem,
naming the key, the node and the fix, and exit 2.

A cluster that still has one node (an autoscaler adds workers later) is not refused; the local
paths it would need shared are named in one line.
"""

from __future__ import annotations

import os
import shutil
import uuid

from tmad_ray.data.clips import HIDE_ENV
from tmad_ray.errors import UserError

MARKER = ".tmad_ray_preflight"


class PreflightError(UserError):
    pass


def shared_keys(cfg) -> dict[str, tuple[str, bool]]:
    """Every key whose path every node uses: ``key -> (path, writable)``. Writable ones are checked
    with a marker written there; read-only ones (the dataset, model directories) by a file in them."""
    keys = {"storage.clip_cache": (cfg.storage.clip_cache, True), "storage.ray_results": (cfg.storage.ray_results, True),
            "storage.output_dir": (cfg.storage.output_dir, True),
            "data.root": (cfg.data.root, cfg.data.synthetic is not None)}  # the embedded dataset is generated there
    m = cfg.models
    for key, value in (("models.teacher.name", m.teacher.name), ("models.student.name", m.student.name),
                       ("models.assistant.path", m.assistant.path), ("models.assistant.config", m.assistant.config)):
        if value and os.path.exists(value):  # a hub name is downloaded on each node: nothing shared
            keys[key] = (value, False)
    return keys


def is_uri(path: str) -> bool:
    return "://" in str(path)


def visible_on_node(probes: dict[str, str]) -> dict[str, bool]:
    """Runs on one node: ``key -> file`` exists there (and is not hidden by ``HIDE_ENV``)."""
    hidden = [p for p in os.environ.get(HIDE_ENV, "").split(",") if p]
    return {k: os.path.exists(f) and not any(f.startswith(h) for h in hidden) for k, f in probes.items()}


def probe_files(keys: dict[str, tuple[str, bool]], token: str, created: list[str]) -> dict[str, str]:
    """A file per local key that every node should see: a marker the driver writes in a writable
    directory, else the directory's first entry (or the file itself). Directories made for a marker
    are added to ``created`` (the topmost of each)."""
    probes = {}
    for key, (path, writable) in keys.items():
        if writable:
            top = os.path.abspath(path)
            while not os.path.exists(os.path.dirname(top)):
                top = os.path.dirname(top)
            if not os.path.exists(top):
                created.append(top)
            os.makedirs(path, exist_ok=True)
            probes[key] = os.path.join(path, f"{MARKER}-{token}")
            with open(probes[key], "w") as f:
                f.write(token)
        elif os.path.isdir(path):
            entries = sorted(os.listdir(path))
            probes[key] = os.path.join(path, entries[0]) if entries else path
        else:
            probes[key] = path
    return probes


def check_cluster(cfg, tracking_uri: str, say=print) -> None:
    """Refuse (``PreflightError``, one line per problem) what a multi-node cluster cannot run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = {k: v for k, v in shared_keys(cfg).items() if not is_uri(v[0])}
    if len(nodes) < 2:
        if local and os.environ.get("RAY_JOB_ID") is not None:
            say(f"preflight: 1 node now; should the cluster add nodes, these must be URIs or shared mounts: "
                f"{', '.join(sorted(local))}")
        return
    problems = []
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        problems.append(f"tracking.tracking_uri={tracking_uri}: a local store, so each of the {len(nodes)} nodes "
                        "would log to its own; run an MLflow server (`mlflow server --host 0.0.0.0 ...`) and pass "
                        "its http(s) URI (MLFLOW_TRACKING_URI)")
    token, created = uuid.uuid4().hex[:12], []
    try:
        probes = probe_files(local, token, created)
        check = ray.remote(num_cpus=0)(visible_on_node)
        seen = ray.get([check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(probes) for n in nodes])
    finally:  # nothing left behind: the markers, and the directories made for them
        for key, (path, writable) in local.items():
            marker = os.path.join(path, f"{MARKER}-{token}")
            if writable and os.path.exists(marker):
                os.remove(marker)
        for top in created:
            if not any(files for _, _, files in os.walk(top)):
                shutil.rmtree(top)
    for node, vis in zip(nodes, seen):
        for key in sorted(k for k, ok in vis.items() if not ok):
            problems.append(f"{key}={local[key][0]} is not visible from node {node['NodeManagerAddress']}: give a URI "
                            "(s3://..., gs://...) or a path on a mount every node shares")
    if problems:
        from tmad_ray.tracking import redact

        raise PreflightError(redact(f"on this {len(nodes)}-node cluster: " + "; ".join(problems)))
    from tmad_ray.tracking import redact

    uris = sorted(k for k in shared_keys(cfg) if k not in local)
    say(f"preflight: {len(nodes)} nodes see every local path ({', '.join(sorted(local)) or 'none'})"
        f"{'; URIs: ' + ', '.join(uris) if uris else ''}; MLflow at {redact(tracking_uri)}")

"""``train_loop_per_worker``: one DDP distillation run over the clip cache (Ray Train V2).

Setup (``setup_worker``: models, DDP, optimizer, data, resume) -> per epoch: train, evaluate,
report -> done. Every rank calls ``ray.train.report`` each epoch (it is a barrier); rank 0 alone
attaches the checkpoint, writes the log and hands the epoch to the study's MLflow queue. Metrics
are all-reduced before reporting, because only rank 0's reach Tune.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch

from tmad_ray.train.epoch import evaluate_shard, train_epoch
from tmad_ray.train.metrics import driver_phases, epoch_metrics, epoch_row
from tmad_ray.train.worker import RunSpec, Worker, save_checkpoint, setup_worker


def train_loop_per_worker(config: dict) -> None:
    """``config``: ``{"spec": RunSpec}`` (``tmad_ray.train.run.build_trainer`` makes it)."""
    entered = time.time()  # start-up phases, timed for the run's log (event "startup")
    import ray.train
    import ray.train.torch

    from tmad_ray.config import config_from_dict

    _quiet_report_log()

    # ---- setup
    spec: RunSpec = config["spec"]
    cfg = config_from_dict(spec.cfg)
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    phases = {"imports_s": time.time() - entered}
    checkpoint = ray.train.get_checkpoint()
    w, state = setup_worker(cfg, spec, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                            ray.train.torch.prepare_model, checkpoint, phases)
    start = state["epoch"] if state else 0
    # best_<metric> and best_<objective> ride in every report, so a resumed run takes them back from its checkpoint
    best = {k: v for k, v in state["metrics"].items() if k.startswith("best_")} if state else {}
    w.run_log.write(event="start", epoch=start, world=w.world, resumed=state is not None,
                    node=ray.get_runtime_context().get_node_id())  # which machine, for a cluster's post-mortem
    if state is None:
        phases = {**driver_phases(spec.started_at, spec.fit_at, entered), **phases}
    elif start >= cfg.train.epochs:
        # Finished before its driver died: say so again, so that Tune (and the searcher) get its result.
        ray.train.report(state["metrics"])
        return
    mlflow_run = dict(spec.mlflow) if w.rank == 0 and spec.mlflow else None  # rank 0 hands epochs to MLflow

    # ---- loop
    for epoch in range(start + 1, cfg.train.epochs + 1):
        w.run_log.write(event="epoch_start", epoch=epoch)
        t0, wall0 = time.perf_counter(), time.time()
        # crops and flips drawn from (seed, rank, epoch) alone: a resumed run augments as an unbroken one
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + w.rank * 104729 + epoch * 15485863)
        tr = train_epoch(w, epoch, gen)
        train_s = time.perf_counter() - t0
        va = evaluate_shard(w)
        first = epoch == start + 1
        if first and tr["step_times"]:  # where this attempt's first seconds went, up to its first step
            began = spec.started_at if "ray_train_start_s" in phases else entered
            phases.update(first_step_s=tr["step_times"][0], startup_s=wall0 + tr["step_times"][0] - began)
            w.run_log.write(event="startup", **{k: round(v, 3) for k, v in phases.items()})

        # ---- report (all-reduced, so rank 0's metrics are the global ones)
        metrics = {**epoch_metrics(w, epoch, tr, va, train_s, first), "epoch_s": time.perf_counter() - t0}
        if not math.isfinite(metrics["train_loss"]):  # all-reduced: every rank stops at the same epoch
            stop_non_finite(w, epoch, {**metrics, **(best or best_so_far(cfg, metrics, best))}, mlflow_run)
            return
        best = best_so_far(cfg, metrics, best)
        report(w, epoch, {**metrics, **best}, mlflow_run, header=first)


def best_so_far(cfg, metrics: dict, best: dict) -> dict:
    """``best_<metric>``: the best ``search.metric`` over the epochs so far, and ``best_<objective>``:
    each other objective at that same epoch. It is what the searcher and ASHA are told, and the epoch
    whose checkpoint is exported, so a trial is judged by the student it would hand back, not by its
    last epoch. ``best`` is the previous epochs' (empty at first); the new one is returned."""
    s = cfg.search
    if s.metric not in metrics:
        return best
    old, new = best.get(f"best_{s.metric}"), metrics[s.metric]
    if old is not None and not (new > old if s.mode == "max" else new < old):
        return best
    return {f"best_{k}": metrics[k] for k in dict.fromkeys([s.metric, *(s.objectives or [])]) if k in metrics}


def report(w: Worker, epoch: int, metrics: dict, mlflow_run: dict | None, header: bool) -> None:
    """The epoch's metrics to the run's log, the screen (outside a study: Tune's table shows a study's
    epochs), the study's MLflow queue (rank 0) and Ray Train, with rank 0's checkpoint attached."""
    import ray.train

    w.run_log.write(event="epoch_end", **{k: v for k, v in metrics.items() if k != "val_confusion"})
    if w.rank == 0 and not mlflow_run:
        print(epoch_row(metrics, header=header), flush=True)
    if mlflow_run:
        to_mlflow(mlflow_run, "log_epoch", metrics, w.labels, int(time.time() * 1000))
    storage = ray.train.get_context().get_storage()
    name = storage.make_default_checkpoint_dir_name()  # every rank's report takes rank 0's name
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            save_checkpoint(w, epoch, metrics, tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        try:
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        except OSError as e:  # a full or read-only volume mid-copy: no half checkpoint is left to fill it
            if ckpt is None:
                raise
            path = remove_partial_checkpoint(storage, name, w)
            if e.filename is None:  # pyarrow's errors name no file: the user needs to know which volume
                raise OSError(e.errno, e.strerror or str(e), path) from e
            raise


def remove_partial_checkpoint(storage, name: str, w: Worker) -> str:
    """Delete the checkpoint directory ``name`` that Ray Train could not write completely (it is not
    registered, so nothing refers to it; left there, it would keep the volume full); returns its path."""
    path = storage.build_checkpoint_path_from_name(name)
    try:
        storage.storage_filesystem.delete_dir(path)
        w.run_log.write(event="partial_checkpoint_removed", path=path)
    except OSError as e:  # already gone, or the volume refuses even that: the report's error says why
        w.run_log.write(event="partial_checkpoint_left", path=path, why=str(e)[:200])
    return path


def stop_non_finite(w: Worker, epoch: int, metrics: dict, mlflow_run: dict | None) -> None:
    """A NaN or infinite training loss: the weights are lost, so the run ends here. Its last report
    carries ``non_finite_loss`` (the epoch) and no checkpoint, so it is never exported; Tune and the
    searcher still get a result (the best so far before it diverged, or this epoch's own score)."""
    import ray.train

    why = (f"epoch {epoch}: the training loss is {metrics['train_loss']} (not finite): the run stops here and "
           "nothing of this epoch is kept; lower train.lr (or search.lr) or the loss weights")
    w.run_log.write(event="non_finite_loss", epoch=epoch, loss=str(metrics["train_loss"]), why=why)
    if w.rank == 0:
        print(why, flush=True)
        if mlflow_run:
            to_mlflow(mlflow_run, "set_tag", "non_finite_loss", why)
    ray.train.report({**metrics, "non_finite_loss": epoch})


def to_mlflow(mlflow_run: dict, method: str, *args) -> None:
    """One write for the trial's MLflow run, handed to the study's queue (``tmad_ray.tracking_queue``),
    which writes it from its own process: an MLflow outage delays tracking, never training. Handed over
    before the epoch's report, because Tune may end the trial's processes as soon as it has the last
    one; the wait is for the queue to take it (milliseconds), not for MLflow."""
    import ray

    run = {k: v for k, v in mlflow_run.items() if k != "queue"}
    ray.wait([getattr(mlflow_run["queue"], method).remote(run, *args)], timeout=10)


def _quiet_report_log() -> None:
    """Ray Train logs every report's full metrics at INFO under a logger named by its file path, so
    ``LoggingConfig`` does not reach it; the epoch table says the same in one line."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)

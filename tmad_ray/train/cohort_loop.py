"""``cohort_loop_per_worker``: one Ray Train run that trains a cohort of students side by side.

Setup (the frozen models once, one student per recipe, each under its own DDP, the shards, resume)
-> per epoch: drop the students whose trials Tune ended (ASHA's cut), train the others on the same
batches (``tmad_ray.train.cohort``), evaluate each -> report each student's epoch to its trial
(through the study's cohort hub), its MLflow run and its own ``train_log.jsonl``, and one
checkpoint with every live student -> done when every epoch ran or every student stopped.

A student is what a trial trained alone is: the same metrics, the same best-so-far rule, its best
student exported under ``best/<trial>/`` of the run's storage when it improves (what the study
registers), and a non-finite loss stops it alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time

import torch

from tmad_ray import recipe
from tmad_ray.data.augment import augment, crop_flip
from tmad_ray.train import cohort
from tmad_ray.train.cohort import save_best, write_atomically
from tmad_ray.train.epoch import accumulation, evaluate_students
from tmad_ray.train.loop import _quiet_report_log, best_so_far, remove_partial_checkpoint, to_mlflow
from tmad_ray.train.metrics import driver_phases, epoch_metrics
from tmad_ray.train.worker import (STATE_FILE, RunLog, RunSpec, Worker, adamw, ddp_kwargs, kill_switch,
                                   make_shards, schedule)

COHORT_FILE = "cohort.json"   # in every cohort checkpoint: the epoch and each student's status
MEMBERS_DIR = "members"       # in every cohort checkpoint: members/<trial>/{state.pt, student/}


def cohort_loop_per_worker(config: dict) -> None:
    """``config``: ``{"spec": RunSpec}`` with ``recipes`` and ``hub`` set (``build_trainer(cohort=...)``)."""
    entered = time.time()
    import ray
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
    w, start = setup_cohort(cfg, spec, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                            ray.train.torch.prepare_model, ray.train.get_checkpoint(), phases)
    if start == 0:
        phases = {**driver_phases(spec.started_at, spec.fit_at, entered), **phases}
    announce(w, start, ray.get_runtime_context().get_node_id())
    if start >= cfg.train.epochs:  # finished before its driver died: say each student's last epoch again
        report_cohort(w, spec, start, {m.name: m.last for m in w.members if m.last}, improved=set())
        return

    # ---- loop
    for epoch in range(start + 1, cfg.train.epochs + 1):
        # after epoch e, wait for Tune's word on each student's report of e; an attempt's first epoch
        # only drops those Tune ended before this attempt (its trials have seen none of its reports)
        drop_ended(w, spec.hub, epoch - 1 if epoch > start + 1 else 0)
        live = [m for m in w.members if m.stopped is None]
        if not live:
            break
        for m in live:
            m.log.write(event="epoch_start", epoch=epoch)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + w.rank * 104729 + epoch * 15485863)
        trained = train_cohort_epoch(w, live, epoch, gen)
        train_s = time.perf_counter() - t0
        if epoch == start + 1 and trained["step_times"]:  # where this attempt's first seconds went
            began = spec.started_at if "ray_train_start_s" in phases else entered
            phases.update(first_step_s=trained["step_times"][0], startup_s=time.time() - train_s
                          + trained["step_times"][0] - began)
            for m in live:
                m.log.write(event="startup", **{k: round(v, 3) for k, v in phases.items()})
        results, improved = {}, set()
        evaluated = evaluate_students(w, [m.tri.core.student for m in live])
        for m, va in zip(live, evaluated):
            results[m.name] = student_epoch(w, m, epoch, trained, va, train_s, len(live))
            if m.best.get("epoch_of_best") == epoch and m.stopped is None:
                improved.add(m.name)
        for m in live:  # the epoch's wall time, every student's share included, as a trial alone reports it
            results[m.name]["epoch_s"] = time.perf_counter() - t0

        # ---- report
        report_cohort(w, spec, epoch, results, improved)


def announce(w: Worker, start: int, node: str) -> None:
    """The attempt's ``start`` event in the cohort's log and in each live student's (which machine: for
    a cluster's post-mortem)."""
    w.run_log.write(event="start", epoch=start, world=w.world, resumed=start > 0, node=node,
                    students={m.name: m.stopped for m in w.members})
    for m in w.members:
        if m.stopped is None:
            m.log.write(event="start", epoch=start, world=w.world, resumed=start > 0, node=node, cohort=cohort_name())


def cohort_name() -> str:
    import ray.train

    return ray.train.get_context().get_experiment_name()


def setup_cohort(cfg, spec: RunSpec, rank: int, world: int, device, prepare_model, checkpoint,
                 phases: dict) -> tuple[Worker, int]:
    """The cohort's worker: frozen models loaded once (those some recipe needs), a student per recipe
    (``spec.recipes``: trial id -> recipe) with its own DDP, optimizer and schedule, this rank's shards,
    restored from ``checkpoint``. Returns the worker and the epoch to go on from; times its phases."""
    from tmad_ray.distill.targets import TargetCache, TargetReader
    from tmad_ray.models.hf import frozen_roles, load_models

    mark = time.time()
    roles = {r for p in spec.recipes.values() for r in frozen_roles(recipe.apply(cfg, p).distill)}
    frozen = load_models(cfg, spec.labels, tuple(r for r in ("teacher", "assistant") if r in roles)) if roles else {}

    def prepare(mcfg, tri):
        tri.wrap(lambda m: prepare_model(m, parallel_strategy_kwargs=ddp_kwargs(mcfg)))
        return adamw(mcfg, tri)
    members = cohort.build_members(cfg, list(spec.recipes.values()), spec.labels, frozen, prepare,
                                   names=list(spec.recipes))
    phases["models_s"], phases["ddp_s"], mark = time.time() - mark, 0.0, time.time()  # (DDP: in the students')
    train_shard, val_shard = make_shards(cfg, spec, rank, world)
    for m in members:
        m.scheduler = schedule(m.cfg, m.optimizer, train_shard.steps)
        m.log = RunLog(os.path.join(spec.trials_dir, m.name, "train_log.jsonl") if rank == 0 and spec.trials_dir
                       else None)
    targets = None
    if spec.targets_key:
        keep: dict[str, set[int]] = {}
        for m in members:
            for name, layers in m.tri.target_layers().items():
                keep.setdefault(name, set()).update(layers)
        d = cfg.distill
        targets = TargetReader(TargetCache(cfg.storage.clip_cache, spec.targets_key), spec.train_entries,
                               d.target_views, keep=keep, budget_mb=d.target_cache_reader_mb)
    else:
        for m in members:
            m.tri.frozen_to(device)  # the same frozen objects: moved once
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    w = Worker(cfg, spec.labels, rank, world, device, autocast, None, None, None, train_shard, val_shard, targets,
               kill_switch(cfg, rank), RunLog(spec.log_path if rank == 0 else None), members=members)
    start = restore(w, checkpoint, device)
    phases["data_and_checkpoint_s"] = time.time() - mark
    return w, start


def restore(w: Worker, checkpoint, device) -> int:
    """Each student's state from the cohort's checkpoint (a student that stopped stays stopped); the
    checkpoint's epoch, 0 without one."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, COHORT_FILE)) as f:
            saved = json.load(f)
        for m in w.members:
            s = saved["members"].get(m.name)
            if s is None:
                raise RuntimeError(f"student {m.name} is not in the cohort's checkpoint ({sorted(saved['members'])}): "
                                   "a cohort resumes with the students it began with")
            m.stopped, m.best, m.last = s["stopped"], s["best"], s["last"]
            if m.stopped is None:
                state = torch.load(os.path.join(d, MEMBERS_DIR, m.name, STATE_FILE), map_location=device,
                                   weights_only=True)
                m.tri.core.load_state_dict(state["trainable"])
                m.optimizer.load_state_dict(state["optimizer"])
                m.scheduler.load_state_dict(state["scheduler"])
                m.rng = state["rng"]
    return saved["epoch"]


def view(w: Worker, m: cohort.Member) -> Worker:
    """The worker as one of its students sees it (what ``evaluate_shard``, ``epoch_metrics`` and
    ``save_checkpoint`` take)."""
    import dataclasses

    return dataclasses.replace(w, cfg=m.cfg, tri=m.tri, optimizer=m.optimizer, scheduler=m.scheduler, once=m.once,
                               members=[])


def train_cohort_epoch(w: Worker, live: list, epoch: int, gen: torch.Generator) -> dict:
    """One pass over this rank's clips for every live student at once (``train.epoch.train_epoch``'s
    pass, the batch shared): each student's summed loss terms, and the clips, steps and step times."""
    t = w.cfg.train
    for m in live:
        m.tri.trainable.train()
    sums = {m.name: {} for m in live}
    n, step, seen, times = 0, 0, [], []
    for step, batch in enumerate(w.train_shard.batches(epoch), start=1):
        t0 = time.perf_counter()
        if w.fault is not None:
            w.fault(epoch, step)
        clips = torch.as_tensor(batch["clip"]).to(w.device)
        targets = None
        if w.targets is None:
            x = augment(clips, w.cfg.data.image_size, t.flip, gen)
            query = cohort.query_rows(live, w.device, gen)
        else:
            params, query, targets = w.targets.batch(batch["video_id"], batch["view"], gen, w.device)
            x = crop_flip(clips, params, w.cfg.data.image_size)
        y = torch.tensor(batch["label"], device=w.device)
        sync, group = accumulation(step, w.train_shard.steps, t.grad_accum)
        outs = cohort.forward_backward(live, x, y, query, group, sync, w.autocast, targets)
        if sync:
            cohort.optimizer_steps(live, t.grad_clip)
        for name, out in outs.items():
            for k, v in out.items():
                if k != "logits":
                    sums[name][k] = sums[name].get(k, 0.0) + v.detach().float() * len(y)
        n += len(y)
        seen += [f"{v}#{i}" for v, i in zip(batch["video_id"], batch["view"])]
        if w.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if step != w.train_shard.steps:
        raise RuntimeError(f"rank trained {step} steps, expected {w.train_shard.steps}: the ranks would fall out "
                           "of step")
    return {"sums": {name: {k: float(v) for k, v in s.items()} for name, s in sums.items()}, "n": n, "steps": step,
            "seen": seen, "step_times": times}


def student_epoch(w: Worker, m: cohort.Member, epoch: int, trained: dict, va: dict, train_s: float,
                  live: int) -> dict:
    """One student's epoch report (``va``: its ``evaluate_students`` result): the metrics a trial alone
    reports, its best so far included, plus the cohort's size; a non-finite loss stops it here."""
    v = view(w, m)
    tr = {**trained, "sums": trained["sums"][m.name]}
    metrics = {**epoch_metrics(v, epoch, tr, va, train_s, first=not m.once), "cohort_students": live}
    m.once = v.once
    if not math.isfinite(metrics["train_loss"]):  # all-reduced: every rank stops the student at this epoch
        why = (f"epoch {epoch}: the training loss is {metrics['train_loss']} (not finite): this student stops here "
               "and nothing of this epoch is kept; lower train.lr (or search.lr) or the loss weights")
        m.stopped = "non_finite_loss"
        m.log.write(event="non_finite_loss", epoch=epoch, loss=str(metrics["train_loss"]), why=why)
        metrics = {**metrics, **(m.best or best_so_far(m.cfg, metrics, m.best)), "non_finite_loss": epoch,
                   "why": why}
    else:
        new = best_so_far(m.cfg, metrics, m.best)
        if new is not m.best:
            new = {**new, "epoch_of_best": epoch}
        m.best = new
        metrics = {**metrics, **m.best}
    m.last = {k: v for k, v in metrics.items() if k != "val_confusion"}
    return metrics


def drop_ended(w: Worker, hub, acked: int) -> None:
    """Stop the students whose trials Tune ended after epoch ``acked`` (ASHA's cut, or the study's
    end): rank 0 asks the hub, which waits until each trial either asked for its next epoch or was
    ended, and every rank stops the same ones."""
    import ray
    import torch.distributed as dist

    live = [m.name for m in w.members if m.stopped is None]
    ended = [ray.get(hub.wanted.remote(cohort_name(), acked, live))] if w.rank == 0 else [None]
    if w.world > 1 and dist.is_initialized():
        dist.broadcast_object_list(ended, src=0)
    for m in w.members:
        if m.name in ended[0]:
            m.stopped = "ended_by_tune"
            m.log.write(event="stopped", why=ended[0][m.name])


def report_cohort(w: Worker, spec: RunSpec, epoch: int, results: dict[str, dict], improved: set[str]) -> None:
    """Each student's epoch to its log, its MLflow run and its trial (rank 0, through the hub); the
    students that improved exported under ``best/``; one checkpoint of every live student; one
    ``ray.train.report`` on every rank (it is a barrier)."""
    import ray
    import ray.train

    storage = ray.train.get_context().get_storage()
    if w.rank == 0:
        for m in w.members:
            if m.name not in results:
                continue
            metrics = results[m.name]
            run = {**spec.mlflow, "trial": m.name} if spec.mlflow else None
            if "non_finite_loss" in metrics:  # as a trial alone: nothing of the epoch is logged but why
                if run:
                    to_mlflow(run, "set_tag", "non_finite_loss", metrics["why"])
                continue
            m.log.write(event="epoch_end", **{k: v for k, v in metrics.items() if k != "val_confusion"})
            if run:
                to_mlflow(run, "log_epoch", metrics, w.labels, int(time.time() * 1000))
            if m.name in improved:
                save_best(storage, m, w.cfg.data, epoch, metrics)
        # the students' status beside the run, before any trial hears of the epoch: when Tune ends the
        # study on a student's last report, the study's summary and export find it (Ray Train registers
        # the epoch's checkpoint only on its controller's next poll)
        write_atomically(storage, f"{storage.experiment_fs_path}/{COHORT_FILE}", status_json(w, epoch))
        ray.wait([spec.hub.report.remote(cohort_name(), name, {k: v for k, v in metrics.items()
                                                                if k not in ("val_confusion", "why")})
                  for name, metrics in results.items()], num_returns=len(results), timeout=30)
    name = storage.make_default_checkpoint_dir_name()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            save_cohort_checkpoint(w, epoch, tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        try:
            ray.train.report({"epoch": epoch, "students": sum(m.stopped is None for m in w.members)},
                             checkpoint=ckpt, checkpoint_dir_name=name)
        except OSError:
            if ckpt is not None:
                remove_partial_checkpoint(storage, name, w)
            raise


def status_json(w: Worker, epoch: int) -> str:
    """``cohort.json``: the epoch and, per student, why it stopped (None: live), its best so far and its
    last report."""
    return json.dumps({"epoch": epoch, "members": {m.name: {"stopped": m.stopped, "best": m.best, "last": m.last}
                                                   for m in w.members}})


def save_cohort_checkpoint(w: Worker, epoch: int, directory: str) -> None:
    """``cohort.json`` (``status_json``) and, per live student, ``members/<trial>/state.pt`` (student +
    projectors, optimizer, schedule, RNG)."""
    with open(os.path.join(directory, COHORT_FILE), "w") as f:
        f.write(status_json(w, epoch))
    for m in w.members:
        if m.stopped is None:
            d = os.path.join(directory, MEMBERS_DIR, m.name)
            os.makedirs(d)
            torch.save({"trainable": m.tri.core.state_dict(), "optimizer": m.optimizer.state_dict(),
                        "scheduler": m.scheduler.state_dict(), "rng": m.rng, "epoch": epoch},
                       os.path.join(d, STATE_FILE))

"""A cohort: K students that learn side by side on the same batches, sharing the frozen models.

Per batch: one forward of the teacher and one of the assistant for every layer any student reads
(``trimodel.shared_targets``), then, per student, its own forward, loss, backward and optimizer
step. Each student keeps its own recipe (loss weights, temperature, aligned layers, lr), projectors,
optimizer, schedule and RNG state, so its gradients are exactly those it gets trained alone on the
same batches (``tests/test_cohort.py`` checks it bit for bit on CPU in fp32). What the cohort saves
is the frozen forwards (and, in a study, the decode and the start-up) of K - 1 students.

Why the students share batches and not only models: the frozen targets depend on the clip, so
sharing them means sharing the crops, flips and sampled attention rows too. A study's trials
already share ``train.seed`` (the search samples recipes, not seeds), so a student sees the batches
it would see alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from tmad_ray import recipe
from tmad_ray.distill.trimodel import TriModel, shared_targets


BEST_DIR = "best"  # beside a cohort run's checkpoints: best/<trial>/ (a student, loadable with from_pretrained)


@dataclass
class Member:
    """One student of a cohort and everything that is its own."""

    name: str                       # its trial's name (the search's), or a bench label
    cfg: object                     # the cohort's config with this student's recipe applied
    tri: TriModel                   # its student and projectors; the frozen models are the cohort's
    optimizer: torch.optim.Optimizer
    scheduler: object | None = None
    rng: torch.Tensor | None = None  # its CPU RNG state (dropout, stochastic depth), swapped in per step
    stopped: str | None = None      # why it stopped learning (ASHA's cut, a non-finite loss); None: live
    best: dict = field(default_factory=dict)   # best_<metric> (and objectives at that epoch) so far
    once: dict = field(default_factory=dict)   # per attempt: shard overlap, student latency
    log: object = None              # its trial's RunLog (rank 0), as a trial trained alone writes it
    last: dict = field(default_factory=dict)   # its last epoch's report (said again after a restart)


def build_tri(cfg, labels: list[str], frozen: dict[str, torch.nn.Module]) -> TriModel:
    """A student (seeded by ``train.seed``, as ``train.worker.build_trimodel`` seeds it, so it starts
    from the weights it would start from alone) with the cohort's frozen models (not copied)."""
    from tmad_ray.models.hf import load_models

    torch.manual_seed(cfg.train.seed)
    student = load_models(cfg, labels, ("student",))["student"]
    torch.manual_seed(cfg.train.seed + 1)  # its projectors, as build_trimodel seeds them
    return TriModel(student, frozen.get("teacher"), frozen.get("assistant"), cfg.distill, labels)


def build_members(cfg, recipes: list[dict], labels: list[str], frozen: dict[str, torch.nn.Module],
                  optimizer, names: list[str] | None = None) -> list[Member]:
    """One ``Member`` per recipe (``recipe.apply`` to ``cfg``); ``optimizer(member_cfg, tri)`` makes
    its optimizer (after wrapping ``tri`` for DDP, in a Ray Train worker); the caller adds a schedule."""
    members = []
    for i, params in enumerate(recipes):
        mcfg = recipe.apply(cfg, params)
        tri = build_tri(mcfg, labels, frozen)
        rng = torch.get_rng_state()
        members.append(Member(names[i] if names else recipe.short(params), mcfg, tri, optimizer(mcfg, tri), rng=rng))
    return members


def query_rows(members: list[Member], device, gen: torch.Generator) -> torch.Tensor | None:
    """The step's attention query rows ``[Nq]`` (None: every row, or no live student needs them),
    drawn from ``gen`` once, exactly as each student alone draws them after its crops."""
    live = [m for m in members if m.stopped is None]
    needing = [m for m in live if m.tri.needs.attn]
    return (needing or live)[0].tri.query_rows(device, gen) if live else None


@contextlib.contextmanager
def own_rng(member: Member):
    """The member's CPU RNG stream while it steps: students do not draw from each other's."""
    with torch.random.fork_rng(devices=[]):
        if member.rng is not None:
            torch.set_rng_state(member.rng)
        yield
        member.rng = torch.get_rng_state()


def forward_backward(members: list[Member], x: torch.Tensor, y: torch.Tensor, query: torch.Tensor | None,
                     group: int = 1, sync: bool = True, autocast=contextlib.nullcontext,
                     targets: dict | None = None) -> dict[str, dict]:
    """One micro-batch for every live member: the shared frozen forwards (or ``targets`` read from the
    frozen-target cache), then each student's forward and backward (``loss / group``: the mean over an
    accumulation group of ``group`` micro-batches; outside the group's last one, ``sync`` False, DDP
    skips the all-reduce). ``x``: augmented clips ``[B,T,3,H,W]``, ``y``: ``[B]``, ``query``:
    attention query rows ``[Nq]`` (``[B,Nq]`` from the cache) or None. Returns each member's loss
    terms (``losses.distill_losses``' dict plus ``logits``) by name."""
    live = [m for m in members if m.stopped is None]
    if targets is None:
        with autocast():
            targets = shared_targets([m.tri for m in live], x, query)
    outs = {}
    for m in live:
        no_sync = getattr(m.tri.trainable, "no_sync", None)
        with own_rng(m), (no_sync() if (not sync and no_sync) else contextlib.nullcontext()):
            with autocast():
                out = m.tri(x, y, cached=targets, query_idx=query)
            (out["loss"] / group).backward()
        outs[m.name] = out
    return outs


def optimizer_steps(members: list[Member], grad_clip: float | None) -> None:
    """Each live member's optimizer (and schedule) step, at the end of an accumulation group."""
    for m in members:
        if m.stopped is not None:
            continue
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(m.tri.parameters(), grad_clip)
        m.optimizer.step()
        if m.scheduler is not None:
            m.scheduler.step()
        m.optimizer.zero_grad(set_to_none=True)


def peak_bytes(cfg, models: dict, size: int) -> int:
    """A worker's peak memory with ``size`` students (an estimate from the shapes, in bytes): the frozen
    models' weights once; per student its weights, gradients and AdamW moments (16 bytes a parameter,
    its projectors at the widest layer set included); one student's activations for backward at a time
    (students step one after another; ~34 bytes per token, width and block in 16-bit, twice that in
    fp32 on CPU: the usual transformer estimate, no attention matrix with SDPA); the shared targets."""
    from tmad_ray.recipe import parse_layer_set

    student, frozen = models["student"], [models[r] for r in ("teacher", "assistant") if r in models]
    sc = student.config
    grid = (cfg.data.num_frames // sc.tubelet_size) * (cfg.data.image_size // sc.patch_size) ** 2
    layers = max([len(cfg.distill.align_layers)] + [len(parse_layer_set(t)) for t in cfg.search.align_layer_sets])
    projectors = sum(layers * (sc.hidden_size + 1) * m.config.hidden_size for m in frozen)
    params = sum(p.numel() for p in student.parameters()) + projectors
    word = 2 if cfg.train.use_gpu else 4
    batch = cfg.train.batch_size
    activations = batch * grid * sc.hidden_size * sc.num_hidden_layers * 17 * word
    targets = sum(batch * grid * m.config.hidden_size * 4 * (layers + 1) for m in frozen)
    weights = sum(p.numel() for m in frozen for p in m.parameters()) * 4
    return int(weights + size * params * 16 + activations + targets)


def largest_fitting(cfg, models: dict, budget_bytes: float) -> int:
    """The most students whose ``peak_bytes`` fits in 90 % of ``budget_bytes`` (0: not even one)."""
    k = 0
    while k < 256 and peak_bytes(cfg, models, k + 1) <= 0.9 * budget_bytes:
        k += 1
    return k


def write_atomically(storage, path: str, text: str) -> None:
    """``text`` to ``path`` on Ray Train's storage (``storage``: its ``StorageContext``), all or nothing."""
    fs = storage.storage_filesystem
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(text.encode())
    fs.move(f"{path}.tmp", path)


def save_best(storage, m: Member, data_cfg, epoch: int, metrics: dict) -> None:
    """The student at its best epoch so far, as a transformers directory, to ``best/<trial>/`` beside
    the run's checkpoints (replacing the previous best): what the study exports if it wins."""
    import os
    import tempfile

    import pyarrow.fs as pafs

    from tmad_ray.train.export import export_student
    from tmad_ray.train.worker import STUDENT_DIR

    dest = f"{storage.experiment_fs_path}/{BEST_DIR}/{m.name}"
    with tempfile.TemporaryDirectory() as tmp:
        export_student(m.tri.core.student, data_cfg, os.path.join(tmp, STUDENT_DIR),
                       extra={"epoch": epoch, "val_accuracy": metrics.get("val_accuracy")})
        fs = storage.storage_filesystem
        if fs.get_file_info(dest).type != pafs.FileType.NotFound:
            fs.delete_dir(dest)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(os.path.join(tmp, STUDENT_DIR), dest, destination_filesystem=fs)

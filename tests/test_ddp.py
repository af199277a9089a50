"""DDP replicas stay identical: gradient accumulation with any number of steps, and α = 0.

Two real gloo processes run the training loop's own ``train_epoch`` (without Ray, which adds
nothing to what DDP does here) on different data per rank, then compare their parameters.
"""

import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tmad_ray.train.epoch import accumulation

CASES = [(steps, accum) for steps in (3, 4, 5) for accum in (1, 2, 3)]


class FakeShard:
    """``steps`` batches of random uint8 clips, different on every rank (what TrainShard yields)."""

    def __init__(self, steps: int, rank: int, batch: int = 2):
        self.steps = steps
        g = np.random.default_rng(100 + rank)
        self.data = [{"clip": g.integers(0, 255, (batch, 4, 20, 20, 3), dtype=np.uint8),
                      "label": g.integers(0, 4, batch), "video_id": np.array([f"r{rank}v{i}" for i in range(batch)]),
                      "view": np.zeros(batch, np.int32)} for _ in range(steps)]

    def batches(self, epoch):
        yield from self.data


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from tmad_ray.config import config_from_dict
    from tmad_ray.distill.trimodel import TriModel
    from tmad_ray.models.hf import video_config
    from tmad_ray.train.epoch import train_epoch
    from tmad_ray.train.metrics import replica_drift
    from tmad_ray.train.worker import RunLog, Worker, cosine_with_warmup, ddp_kwargs

    labels = ["A", "B", "C", "D"]

    def vit(depth, width, heads):
        return video_config(depth, width, heads, image_size=16, num_frames=4, patch_size=8, tubelet_size=2,
                            labels=labels)

    from transformers import VideoMAEForVideoClassification

    results = {}
    runs = [(s, a, 1.0) for s, a in CASES] + [(3, 2, 0.0)]  # the last: α = 0 (the classifier gets no gradient)
    for steps, accum, alpha in runs:
        cfg = config_from_dict({"data": {"image_size": 16, "num_frames": 4, "train_short_side": 20},
                                "distill": {"alpha": alpha, "beta": 1.0, "gamma": 0.0, "delta": 0.0,
                                            "align_layers": [-2]},
                                "train": {"grad_accum": accum, "batch_size": 2, "lr": 1e-2, "flip": True}})
        torch.manual_seed(0)
        student, teacher = VideoMAEForVideoClassification(vit(2, 16, 2)), VideoMAEForVideoClassification(vit(2, 24, 2))
        tri = TriModel(student, teacher, None, cfg.distill, labels)
        tri.wrap(lambda m: DistributedDataParallel(m, **ddp_kwargs(cfg)))
        opt = torch.optim.AdamW(tri.parameters(), lr=cfg.train.lr)
        sched = cosine_with_warmup(opt, 1, 100)
        gen = torch.Generator().manual_seed(rank)  # different crops per rank, as in training
        w = Worker(cfg, labels, rank, world, torch.device("cpu"), contextlib.nullcontext, tri, opt, sched,
                   train_shard=FakeShard(steps, rank), val_shard=None, targets=None, fault=None, run_log=RunLog(None))
        error = None
        try:
            for epoch in (1, 2):
                tr = train_epoch(w, epoch, gen)
        except RuntimeError as e:  # DDP's "Expected to have finished reduction ..." with α = 0
            error = str(e).splitlines()[0]
        results[f"{steps},{accum},{alpha}"] = {"drift": None if error else replica_drift(tri.trainable),
                                               "steps": None if error else tr["steps"],
                                               "optimizer_steps": int(sched.last_epoch), "error": error}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: destroying gloo's and autograd's C++ threads at exit
    # sometimes aborts a rank ("terminate called without an active exception") after all is done.
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.json"
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.parametrize("steps, accum", CASES)
def test_replicas_stay_identical_under_gradient_accumulation(ddp_results, steps, accum):
    r = ddp_results[f"{steps},{accum},1.0"]
    assert r["error"] is None and r["steps"] == steps
    assert r["drift"] == 0.0, f"ranks differ by {r['drift']} after 2 epochs of {steps} steps, grad_accum {accum}"
    assert r["optimizer_steps"] == 2 * -(-steps // accum)  # a short last group still makes its optimizer step


def test_alpha_zero_trains_with_two_workers(ddp_results):
    r = ddp_results["3,2,0.0"]
    assert r["error"] is None and r["drift"] == 0.0


def test_accumulation_groups():
    # (sync, micro-batches in the group) for 5 steps with grad_accum 2: groups {1,2}, {3,4}, {5}
    assert [accumulation(s, 5, 2) for s in range(1, 6)] == [(False, 2), (True, 2), (False, 2), (True, 2), (True, 1)]
    assert [accumulation(s, 4, 3) for s in range(1, 5)] == [(False, 3), (False, 3), (True, 3), (True, 1)]
    assert all(accumulation(s, 3, 1) == (True, 1) for s in (1, 2, 3))

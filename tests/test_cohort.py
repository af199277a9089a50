"""A cohort's students learn exactly as they would alone: the same batches, one frozen forward."""

import pytest
import torch

from conftest import EXPERIMENTS_DIR
from tmad_ray import recipe
from tmad_ray.config import load_config
from tmad_ray.distill import trimodel
from tmad_ray.models.hf import load_models
from tmad_ray.train import cohort
from tmad_ray.train.epoch import accumulation
from tmad_ray.train.worker import build_trimodel, param_groups

LABELS = ["A", "B1", "B2", "G"]
RECIPES = [
    {"alpha": 1.0, "beta": 0.5, "gamma": 0.3, "delta": 0.2, "temperature": 2.0, "align_layers": "-1,-2"},
    {"alpha": 0.7, "beta": 1.0, "gamma": 0.0, "delta": 0.0, "temperature": 4.0, "align_layers": "-1", "lr": 3e-3},
    {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0, "temperature": 1.0, "align_layers": "-1"},  # CE only
]


@pytest.fixture
def cfg(smoke_zoo, pretrained_student):
    # 32 of the 64 tokens' attention rows sampled per step: the query draw is shared too
    return load_config(EXPERIMENTS_DIR / "smoke.yaml", [*smoke_zoo, *pretrained_student,
                                                         "distill.attn_query_tokens=32"])


def batches(cfg, n):
    g = torch.Generator().manual_seed(5)
    d = cfg.data
    return [(torch.randn(4, d.num_frames, 3, d.image_size, d.image_size, generator=g),
             torch.randint(0, len(LABELS), (4,), generator=g)) for _ in range(n)]


def adamw(mcfg, tri):
    return torch.optim.AdamW(param_groups(tri, mcfg.train.weight_decay), lr=mcfg.train.lr)


def train_alone(cfg, params, data, grad_accum):
    """The single-trial path: the worker's own TriModel (its own teacher and assistant), its draws."""
    mcfg = recipe.apply(cfg, params)
    tri = build_trimodel(mcfg, LABELS)
    opt = adamw(mcfg, tri)
    gen = torch.Generator().manual_seed(11)
    losses = []
    for step, (x, y) in enumerate(data, start=1):
        query = tri.query_rows(x.device, gen)
        sync, group = accumulation(step, len(data), grad_accum)
        out = tri(x, y, query_idx=query)
        (out["loss"] / group).backward()
        losses.append(out["loss"].item())
        if sync:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tri, losses


def test_each_student_of_a_cohort_trains_bit_for_bit_as_it_does_alone(cfg):
    data = batches(cfg, 3)  # grad_accum 2: a group of two micro-batches, then a shorter one
    frozen = load_models(cfg, LABELS, ("teacher", "assistant"))
    members = cohort.build_members(cfg, RECIPES, LABELS, frozen, adamw)
    gen = torch.Generator().manual_seed(11)
    seen = {m.name: [] for m in members}
    calls = []
    orig = trimodel.frozen_targets

    def counting(model, *a, **kw):
        calls.append(model)
        return orig(model, *a, **kw)
    trimodel.frozen_targets = counting
    try:
        for step, (x, y) in enumerate(data, start=1):
            query = cohort.query_rows(members, x.device, gen)
            sync, group = accumulation(step, len(data), 2)
            for name, out in cohort.forward_backward(members, x, y, query, group, sync).items():
                seen[name].append(out["loss"].item())
            if sync:
                cohort.optimizer_steps(members, grad_clip=None)
    finally:
        trimodel.frozen_targets = orig
    assert len(calls) == 2 * len(data)  # one teacher and one assistant forward per batch, not per student
    for params, m in zip(RECIPES, members):
        tri, losses = train_alone(cfg, params, data, grad_accum=2)
        assert seen[m.name] == losses, m.name
        alone, together = tri.core.state_dict(), m.tri.core.state_dict()
        assert alone.keys() == together.keys()
        for k in alone:
            assert torch.equal(alone[k], together[k]), (m.name, k)
    # the students learned something different from each other (the comparison above is not vacuous)
    a, b = (m.tri.core.student.classifier.weight for m in members[:2])
    assert not torch.equal(a, b)


def test_a_stopped_student_is_left_alone_and_the_others_go_on(cfg):
    frozen = load_models(cfg, LABELS, ("teacher", "assistant"))
    members = cohort.build_members(cfg, RECIPES[:2], LABELS, frozen, adamw)
    members[0].stopped = "asha"
    before = {k: v.clone() for k, v in members[0].tri.core.state_dict().items()}
    (x, y), = batches(cfg, 1)
    # the live student needs no attention: the draw still happens (later crops stay aligned), no rows
    gen = torch.Generator().manual_seed(0)
    assert cohort.query_rows(members, x.device, gen) is None
    assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
    outs = cohort.forward_backward(members, x, y, None)
    cohort.optimizer_steps(members, grad_clip=1.0)
    assert list(outs) == [members[1].name]
    assert all(torch.equal(before[k], v) for k, v in members[0].tri.core.state_dict().items())


def test_students_must_share_frozen_models(cfg):
    frozen = load_models(cfg, LABELS, ("teacher", "assistant"))
    members = cohort.build_members(cfg, RECIPES[:1], LABELS, frozen, adamw)
    other = cohort.build_members(cfg, RECIPES[:1], LABELS, load_models(cfg, LABELS, ("teacher", "assistant")), adamw)
    (x, y), = batches(cfg, 1)
    with pytest.raises(ValueError, match="share one"):
        trimodel.shared_targets([members[0].tri, other[0].tri], x, None)

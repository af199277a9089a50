"""Each loss term against a plain reference (naive loops or hand values), zeros, and the T² factor."""

import math

import pytest
import torch

from tmad_ray.distill import losses



@pytest.fixture(autouse=True)
def float64_references():
    # references in float64 (the functions compute in float32); restored for other test modules
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def naive_layer_norm(x):
    out = torch.empty_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape[:-1]]):
        v = x[tuple(idx)]
        m = sum(v.tolist()) / len(v)
        var = sum((a - m) ** 2 for a in v.tolist()) / len(v)
        out[tuple(idx)] = (v - m) / math.sqrt(var + 1e-5)
    return out


def naive_kl_rows(p, q):
    """Mean over rows of sum_j p log(p/q), rows = every index but the last."""
    flat_p, flat_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    total = 0.0
    for pr, qr in zip(flat_p.tolist(), flat_q.tolist()):
        total += sum(a * math.log(a / b) for a, b in zip(pr, qr) if a > 0)
    return total / len(flat_p)


def softmax_list(v, t=1.0):
    e = [math.exp(a / t) for a in v]
    return [a / sum(e) for a in e]


def test_ce_by_hand_with_and_without_smoothing():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert losses.ce_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    # smoothing 0.2 over 2 classes: target (0.9, 0.1)
    rows = []
    for z, y in zip(logits.tolist(), labels.tolist()):
        logp = [math.log(p) for p in softmax_list(z)]
        target = [0.1, 0.1]
        target[y] = 0.9
        rows.append(-sum(t * lp for t, lp in zip(target, logp)))
    assert losses.ce_loss(logits, labels, 0.2).item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_feature_loss_matches_naive_layer_norm_and_mse():
    g = torch.Generator().manual_seed(0)
    proj = [torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)]
    tgt = [torch.randn(2, 5, 6, generator=g) * 7 + 3, torch.randn(2, 5, 6, generator=g)]
    want = sum(((p - naive_layer_norm(t)) ** 2).mean().item() for p, t in zip(proj, tgt)) / 2
    assert losses.feature_loss(proj, tgt).item() == pytest.approx(want, rel=1e-5)
    # zero when the projected student equals the normalized target, whatever the target's scale
    assert losses.feature_loss([naive_layer_norm(tgt[0])], [tgt[0]]).item() == pytest.approx(0, abs=1e-9)


def test_attention_map_matches_per_head_loops_and_query_sampling():
    g = torch.Generator().manual_seed(1)
    b, n, heads, dh = 2, 5, 3, 4
    q, k = torch.randn(b, n, heads * dh, generator=g), torch.randn(b, n, heads * dh, generator=g)
    want = torch.zeros(b, n, n)
    for bi in range(b):
        for i in range(n):
            for h in range(heads):
                scores = [sum(q[bi, i, h * dh + c].item() * k[bi, j, h * dh + c].item() for c in range(dh)) / math.sqrt(dh)
                          for j in range(n)]
                want[bi, i] += torch.tensor(softmax_list(scores)) / heads
    got = losses.attention_map(q, k, heads)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    idx = torch.tensor([4, 1])
    torch.testing.assert_close(losses.attention_map(q, k, heads, idx).double(), want[:, [4, 1]], atol=1e-5, rtol=1e-5)


def test_attention_loss_is_mean_kl_over_rows_and_layers_and_zero_on_equal_maps():
    g = torch.Generator().manual_seed(2)
    a_s = [torch.rand(2, 3, 4, generator=g).softmax(-1) for _ in range(2)]
    a_x = [torch.rand(2, 3, 4, generator=g).softmax(-1) for _ in range(2)]
    want = sum(naive_kl_rows(x, s) for s, x in zip(a_s, a_x)) / 2
    assert losses.attention_loss(a_s, a_x).item() == pytest.approx(want, rel=1e-5)
    assert losses.attention_loss(a_x, a_x).item() == pytest.approx(0, abs=1e-7)
    # different head counts are fine: maps are head-averaged before they meet
    q6, k6 = torch.randn(1, 8, 12, generator=g), torch.randn(1, 8, 12, generator=g)
    q2, k2 = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    assert losses.attention_loss([losses.attention_map(q6, k6, 6)], [losses.attention_map(q2, k2, 2)]).item() > 0


def naive_pool(tokens, grid, time, space):
    b, n, d = tokens.shape
    t, h, w = grid
    x = tokens.reshape(b, t, h, w, d)
    ft, fs = t // time, h // space
    out = torch.zeros(b, time, space, space, d)
    for ti in range(time):
        for yi in range(space):
            for xi in range(space):
                out[:, ti, yi, xi] = x[:, ti * ft:(ti + 1) * ft, yi * fs:(yi + 1) * fs, xi * fs:(xi + 1) * fs].mean((1, 2, 3))
    return out


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_pool_grid_and_relations_against_loops():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 4 * 4 * 4, 5, generator=g)
    grid = losses.pool_grid(tokens, (4, 4, 4), 2, 2)
    torch.testing.assert_close(grid.double(), naive_pool(tokens, (4, 4, 4), 2, 2), atol=1e-6, rtol=1e-6)
    sp, tm = losses.spatial_relations(grid).double(), losses.temporal_relations(grid).double()
    assert sp.shape == (2, 2, 4, 4) and tm.shape == (2, 4, 2, 2)
    cells = grid.reshape(2, 2, 4, 5)
    for bi in range(2):
        for t in range(2):
            for i in range(4):
                for j in range(4):
                    assert sp[bi, t, i, j].item() == pytest.approx(cos(cells[bi, t, i].tolist(), cells[bi, t, j].tolist()), abs=1e-5)
        for c in range(4):
            for t1 in range(2):
                for t2 in range(2):
                    assert tm[bi, c, t1, t2].item() == pytest.approx(cos(cells[bi, t1, c].tolist(), cells[bi, t2, c].tolist()), abs=1e-5)
    with pytest.raises(ValueError, match="grid"):
        losses.pool_grid(tokens[:, :10], (4, 4, 4), 2, 2)


def naive_soft_kd(zt, zs, temperature, scale=1.0):
    """T²·mean over rows of KL(σ(scale·z_t/T) ‖ σ(scale·z_s/T)), by hand."""
    total = 0.0
    for a, b in zip(zt.tolist(), zs.tolist()):
        p = softmax_list([scale * v for v in a], temperature)
        q = softmax_list([scale * v for v in b], temperature)
        total += sum(x * math.log(x / y) for x, y in zip(p, q))
    return temperature ** 2 * total / len(zt)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_relation_kd_and_logit_kd_by_hand_with_the_t_squared_factor(temperature):
    rt = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.5, 0.4]])
    rs = torch.tensor([[0.1, 0.7, 0.0], [0.3, -0.2, 0.6]])
    # relations (cosines) are sharpened by 1/τ_r = 10 before the temperature; logits are not
    want_rel = naive_soft_kd(rt, rs, temperature, scale=1 / 0.1)
    assert losses.RELATION_TAU == 0.1
    assert losses.relation_kd(rt, rs, temperature).item() == pytest.approx(want_rel, rel=1e-5)
    assert losses.logit_kd(rt, rs, temperature).item() == pytest.approx(naive_soft_kd(rt, rs, temperature), rel=1e-5)
    assert losses.relation_kd(rt, rt, temperature).item() == pytest.approx(0, abs=1e-6)


def test_the_temperature_changes_the_relational_term_and_its_gradient():
    """Over the search's range of T (1..8) the relational term and its gradient move by 2x or more
    (with cosines divided by T alone they moved by 10%: T was a dead dimension of the search)."""
    g = torch.Generator().manual_seed(6)
    teacher_grid = torch.randn(4, 2, 4, 4, 32, generator=g)
    student_grid = torch.randn(4, 2, 4, 4, 32, generator=g)
    values, grads = {}, {}
    for t in (1.0, 2.0, 4.0, 8.0):
        s = student_grid.clone().requires_grad_(True)
        v = losses.relation_kd(losses.spatial_relations(teacher_grid), losses.spatial_relations(s), t)
        v.backward()
        values[t], grads[t] = v.item(), s.grad.norm().item()
    ratio = lambda d: max(d.values()) / min(d.values())  # noqa: E731
    assert ratio(values) >= 2 and ratio(grads) >= 2, (values, grads)
    # the same features without τ_r: the old, nearly T-free term
    flat = {t: naive_soft_kd(losses.spatial_relations(teacher_grid).reshape(-1, 16),
                             losses.spatial_relations(student_grid).reshape(-1, 16), t) for t in (1.0, 8.0)}
    assert max(flat.values()) / min(flat.values()) < 1.5


def test_maps_and_relations_stay_fp32_under_bf16_autocast():
    """Training on GPUs runs under bf16 autocast; the distillation terms must not (autocast overrides
    .float() for matmuls: attention maps then moved by up to 17%)."""
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 96, 48, generator=g) * 3, torch.randn(2, 96, 48, generator=g) * 3
    tokens = torch.randn(2, 4 * 4 * 4, 48, generator=g)
    ref_map = losses.attention_map(q, k, 4)
    ref_grid = losses.pool_grid(tokens, (4, 4, 4), 4, 4)
    ref_sp, ref_tm = losses.spatial_relations(ref_grid), losses.temporal_relations(ref_grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_map = losses.attention_map(q, k, 4)
        got_grid = losses.pool_grid(tokens, (4, 4, 4), 4, 4)
        got_sp, got_tm = losses.spatial_relations(got_grid), losses.temporal_relations(got_grid)
        kd = losses.relation_kd(got_sp, got_sp.flip(-1), 2.0)
        # what a plain matmul does there: the control that shows autocast is on
        raw = (q @ k.transpose(-1, -2)).softmax(-1)
    assert raw.dtype == torch.bfloat16
    for got, ref in ((got_map, ref_map), (got_sp, ref_sp), (got_tm, ref_tm)):
        assert got.dtype == torch.float32
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3
    assert kd.dtype == torch.float32


def test_t_squared_keeps_the_gradient_scale_of_soft_targets():
    # Hinton's point: for large T the gradient of KL(σ(z_t/T)‖σ(z_s/T)) shrinks as 1/T²; T² undoes it.
    zt = torch.tensor([[1.0, -0.5, 0.3]])
    norms, raw = [], []
    for t in (8.0, 16.0):
        zs = torch.zeros(1, 3, requires_grad=True)
        losses.logit_kd(zt, zs, t).backward()
        norms.append(zs.grad.norm().item())
        raw.append(norms[-1] / t ** 2)
    assert norms[1] == pytest.approx(norms[0], rel=0.02)
    assert raw[1] == pytest.approx(raw[0] / 4, rel=0.02)


def frozen_inputs(g, n_layers=2, b=2, n=16, d=6):
    return {"feats": [torch.randn(b, n, d, generator=g) for _ in range(n_layers)],
            "attn": [torch.rand(b, n, n, generator=g).softmax(-1) for _ in range(n_layers)],
            "grid": torch.randn(b, 2, 2, 2, d, generator=g)}


def test_distill_losses_combines_weighted_terms():
    g = torch.Generator().manual_seed(4)
    student = {"logits": torch.randn(2, 4, generator=g),
               "proj": {"teacher": [torch.randn(2, 16, 6, generator=g) for _ in range(2)],
                        "assistant": [torch.randn(2, 16, 6, generator=g) for _ in range(2)]},
               "attn": [torch.rand(2, 16, 16, generator=g).softmax(-1) for _ in range(2)],
               "grid": torch.randn(2, 2, 2, 2, 5, generator=g)}
    teacher, assistant = frozen_inputs(g), frozen_inputs(g)
    teacher["logits"] = torch.randn(2, 4, generator=g)
    labels = torch.tensor([1, 3])
    out = losses.distill_losses(student, {"teacher": teacher, "assistant": assistant}, labels, alpha=0.5, beta=2.0,
                                gamma=0.3, delta=0.7, temperature=3.0, weights={"teacher": 1.0, "assistant": 0.8})
    wt, wa = 1.0, 0.8
    feat = wt * losses.feature_loss(student["proj"]["teacher"], teacher["feats"]) + \
        wa * losses.feature_loss(student["proj"]["assistant"], assistant["feats"])
    attn = wt * losses.attention_loss(student["attn"], teacher["attn"]) + \
        wa * losses.attention_loss(student["attn"], assistant["attn"])
    asym = wt * losses.relation_kd(losses.spatial_relations(teacher["grid"]), losses.spatial_relations(student["grid"]), 3.0) \
        + wa * losses.relation_kd(losses.temporal_relations(assistant["grid"]), losses.temporal_relations(student["grid"]), 3.0) \
        + wt * losses.logit_kd(teacher["logits"], student["logits"], 3.0)
    ce = losses.ce_loss(student["logits"], labels)
    for name, want in {"ce": ce, "feat": feat, "attn": attn, "asym": asym}.items():
        assert out[name].item() == pytest.approx(want.item(), rel=1e-5), name
    assert out["loss"].item() == pytest.approx((0.5 * ce + 2 * feat + 0.3 * attn + 0.7 * asym).item(), rel=1e-5)
    assert out["feat_w"].item() == pytest.approx(2 * feat.item(), rel=1e-5)
    assert {"feat_teacher", "feat_assistant", "attn_teacher", "asym_spatial", "asym_temporal", "kd_teacher"} <= set(out)
    assert "kd_assistant" not in out  # the assistant has no logits over the dataset's labels
    # a term whose weight is zero is not computed
    off = losses.distill_losses(student, {"teacher": teacher}, labels, alpha=1, beta=0, gamma=0, delta=0,
                                temperature=3.0, weights={"teacher": 1.0})
    assert set(off) == {"ce", "ce_w", "loss"}
    # relations off: δ is classic logit KD from the teacher alone (Hinton), nothing else
    kd = losses.distill_losses(student, {"teacher": teacher, "assistant": assistant}, labels, alpha=1.0, beta=0,
                               gamma=0, delta=1.0, temperature=3.0, weights={"teacher": 1.0, "assistant": 0.0},
                               relations=False)
    assert set(kd) == {"ce", "ce_w", "kd_teacher", "asym", "asym_w", "loss"}
    want = ce + losses.logit_kd(teacher["logits"], student["logits"], 3.0)
    assert kd["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_asym_term_depends_on_the_student():
    """The reference framework's 'asymmetric' term used only frozen features: a constant. Not here."""
    g = torch.Generator().manual_seed(5)
    teacher, assistant = frozen_inputs(g), frozen_inputs(g)
    grid = torch.randn(2, 2, 2, 2, 5, generator=g, requires_grad=True)
    student = {"logits": torch.randn(2, 4, generator=g), "grid": grid}
    kw = dict(alpha=0.0, beta=0.0, gamma=0.0, delta=1.0, temperature=2.0, weights={"teacher": 1.0, "assistant": 0.8})
    out = losses.distill_losses(student, {"teacher": teacher, "assistant": assistant}, torch.tensor([0, 1]), **kw)
    out["loss"].backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0
    other = losses.distill_losses({**student, "grid": torch.randn(2, 2, 2, 2, 5, generator=g)},
                                  {"teacher": teacher, "assistant": assistant}, torch.tensor([0, 1]), **kw)
    assert other["asym"].item() != pytest.approx(out["asym"].item(), rel=1e-3)
    # and it is zero when the student's relations equal the teacher's and the assistant's
    same = {"teacher": {"grid": grid.detach()}, "assistant": {"grid": grid.detach()}}
    zero = losses.distill_losses({"logits": student["logits"], "grid": grid.detach()}, same, torch.tensor([0, 1]), **kw)
    assert zero["asym"].item() == pytest.approx(0, abs=1e-6)

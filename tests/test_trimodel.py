"""Layer mapping, capture at aligned layers only, projectors, and where the gradients go."""

import pytest
import torch
from transformers import VideoMAEForVideoClassification, VideoMAEModel

from tmad_ray.config import config_from_dict
from tmad_ray.distill import losses
from tmad_ray.distill.trimodel import LayerError, TriModel, capture, map_layer, resolve_layer
from tmad_ray.models.hf import video_config

LABELS = ["A", "B1", "B2", "G"]


def cfg(depth, width, heads, labels=LABELS):
    return video_config(depth, width, heads, image_size=32, num_frames=4, patch_size=8, tubelet_size=2, labels=labels)


def distill(**kw):
    return config_from_dict({"distill": {"align_layers": [-1, -2], **kw}}).distill


def models(seed=0):
    torch.manual_seed(seed)
    student = VideoMAEForVideoClassification(cfg(2, 32, 2))
    teacher = VideoMAEForVideoClassification(cfg(4, 48, 4))          # dataset labels: teaches logits too
    assistant = VideoMAEForVideoClassification(cfg(3, 24, 3, labels=["l", "r", "u", "d", "x"]))
    return student, teacher, assistant


def clips(b=2, seed=1):
    return torch.randn(b, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_layer_mapping_and_errors():
    assert [map_layer(i, 4, 12) for i in (1, 2, 3, 4)] == [3, 6, 9, 12]
    assert [map_layer(i, 12, 4) for i in (1, 2, 3, 12)] == [1, 1, 1, 4]  # 1/3 -> 0 is clamped to the first block
    assert map_layer(1, 2, 3) == 2  # 1.5 rounds half up
    assert map_layer(3, 4, 6) == 5  # 4.5 rounds half up
    assert resolve_layer(-1, 4) == 4 and resolve_layer(-4, 4) == 1 and resolve_layer(2, 4) == 2
    for bad in (0, 5, -5):
        with pytest.raises(LayerError, match=rf"layer {bad} .*depth 4"):
            resolve_layer(bad, 4)
    with pytest.raises(LayerError, match="depth 2"):
        TriModel(*models(), distill(align_layers=[-3]), LABELS)


def test_hooked_attention_equals_the_eager_attention_of_that_layer():
    torch.manual_seed(0)
    fast = VideoMAEModel(cfg(3, 32, 4))
    config = cfg(3, 32, 4)
    config._attn_implementation = "eager"
    eager = VideoMAEModel(config)
    eager.load_state_dict(fast.state_dict())
    x = clips()
    with capture(fast, feat_layers=[2], attn_layers=[2, 3]) as store:
        fast(pixel_values=x)
    ref = eager(pixel_values=x, output_attentions=True).attentions
    for i in (2, 3):
        got = losses.attention_map(store["q"][i], store["k"][i], heads=4)
        torch.testing.assert_close(got, ref[i - 1].mean(1), atol=1e-5, rtol=1e-4)
    assert set(store["q"]) == {2, 3} and set(store["feats"]) == {2}
    # hooks are gone afterwards, and the model kept its fast attention
    assert all(not m._forward_hooks for m in fast.modules())
    assert fast.config._attn_implementation != "eager"


def test_frozen_models_map_layers_and_teach_what_they_can():
    tri = TriModel(*models(), distill(), LABELS)
    assert tri.layers == [2, 1]
    assert tri.frozen["teacher"].layers == [4, 2] and tri.frozen["assistant"].layers == [3, 2]  # round(1.5)=2
    assert tri.frozen["teacher"].teaches_logits and not tri.frozen["assistant"].teaches_logits
    out = tri(clips(), torch.tensor([0, 3]))
    assert {"ce", "feat", "attn", "asym", "kd_teacher", "asym_spatial", "asym_temporal", "loss"} <= set(out)
    assert out["logits"].shape == (2, 4)


def test_projectors_are_trainable_and_frozen_models_are_not_parameters():
    student, teacher, assistant = models()
    tri = TriModel(student, teacher, assistant, distill(), LABELS)
    names = {n for n, _ in tri.named_parameters()}
    assert any(n.startswith("trainable.projectors.teacher.1") for n in names)
    assert any(n.startswith("trainable.projectors.assistant.0") for n in names)
    assert all(n.startswith("trainable.") for n in names)          # teacher/assistant stay out of the optimizer
    p = tri.core.projectors
    assert p["teacher"][0].weight.shape == (48, 32) and p["assistant"][0].weight.shape == (24, 32)
    assert not any(q.requires_grad for q in teacher.parameters()) and not teacher.training
    # the exported student is the student alone
    assert not any("projectors" in k for k in tri.core.student.state_dict())


def test_weight_decay_spares_biases_and_norms():
    """AdamW's groups (``train.worker.param_groups``): with no gradient at all, a step still shrinks the
    decayed matrices, and leaves biases and LayerNorm gains exactly as they were."""
    from tmad_ray.train.worker import param_groups

    student, teacher, assistant = models()
    tri = TriModel(student, teacher, assistant, distill(), LABELS)
    decay, no_decay = param_groups(tri, 0.1)
    trainable = [p for p in tri.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) and no_decay["weight_decay"] == 0.0
    named = dict(tri.named_parameters())
    ln = named["trainable.student.videomae.encoder.layer.0.layernorm_before.weight"]
    bias = named["trainable.student.videomae.encoder.layer.0.attention.attention.query.bias"]
    w = named["trainable.student.videomae.encoder.layer.0.attention.attention.query.weight"]
    assert any(p is ln for p in no_decay["params"]) and any(p is bias for p in no_decay["params"])
    assert any(p is w for p in decay["params"])
    grouped = {id(p) for p in decay["params"] + no_decay["params"]}
    assert not any(id(q) in grouped for q in teacher.parameters())  # frozen: in no group
    before = {k: v.detach().clone() for k, v in (("ln", ln), ("bias", bias), ("w", w))}
    opt = torch.optim.AdamW([decay, no_decay], lr=0.5)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(ln, before["ln"]) and torch.equal(bias, before["bias"])
    assert torch.allclose(w, before["w"] * (1 - 0.5 * 0.1))

    (everything,) = param_groups(tri, 0.1, decay_all=True)  # train.decay_all_params: the old way, for ablations
    opt = torch.optim.AdamW([everything], lr=0.5)
    before = ln.detach().clone()
    opt.step()
    assert len(everything["params"]) == len(trainable) and torch.allclose(ln, before * (1 - 0.5 * 0.1))


@pytest.mark.parametrize("term", ["beta", "gamma", "delta"])
def test_each_term_reaches_the_student_and_never_the_frozen_models(term):
    student, teacher, assistant = models()
    weights = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0, term: 1.0}
    tri = TriModel(student, teacher, assistant, distill(**weights), LABELS)
    tri.train()
    out = tri(clips(), torch.tensor([0, 3]))
    assert out["loss"].item() > 0
    out["loss"].backward()
    grads = {n: p.grad for n, p in tri.core.named_parameters()}
    # the student's first block learns from every term (through the aligned layers)
    first = [g for n, g in grads.items() if n.startswith("student.videomae.encoder.layer.0.")]
    assert first and all(g is not None for g in first) and sum(g.abs().sum() for g in first) > 0
    projector_grads = [g for n, g in grads.items() if n.startswith("projectors.")]
    if term == "beta":
        assert projector_grads and all(g is not None and g.abs().sum() > 0 for g in projector_grads)
    else:
        assert not projector_grads  # no unused projector: DDP would wait for its gradient forever
    assert all(p.grad is None for m in (teacher, assistant) for p in m.parameters())


def test_zero_weights_skip_frozen_forwards_and_query_sampling_bounds_attention():
    tri = TriModel(*models(), distill(beta=0, gamma=0, delta=0), LABELS)
    assert tri.frozen == {} and not list(tri.core.projectors.parameters())
    tri = TriModel(*models(), distill(assistant_weight=0.0), LABELS)
    assert set(tri.frozen) == {"teacher"}
    tri = TriModel(*models(), distill(attn_query_tokens=5), LABELS)
    seen = {}
    orig = losses.attention_map

    def spy(q, k, heads, query_idx=None):
        a = orig(q, k, heads, query_idx)
        seen.setdefault(heads, []).append(a.shape)
        return a
    losses.attention_map = spy
    try:
        tri(clips(), torch.tensor([0, 1]))
    finally:
        losses.attention_map = orig
    # 2 aligned layers per model, 5 of the 32 query rows each; heads 2 (student), 4 (teacher), 3 (assistant)
    assert seen == {2: [(2, 5, 32)] * 2, 4: [(2, 5, 32)] * 2, 3: [(2, 5, 32)] * 2}


def test_feature_term_is_zero_when_projected_student_equals_the_target():
    student, teacher, assistant = models()
    tri = TriModel(student, teacher, None, distill(alpha=0, gamma=0, delta=0, align_layers=[-1]), LABELS)
    x = clips()
    with capture(teacher, [4], []) as t_store, torch.no_grad():
        teacher(pixel_values=x)
    target = torch.nn.functional.layer_norm(t_store["feats"][4], (48,))
    # a projector that outputs exactly the layer-normed target
    tri.core.projectors["teacher"][0] = _Const(target)
    assert tri(x, torch.tensor([0, 1]))["feat"].item() == pytest.approx(0, abs=1e-10)


class _Const(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, _x):
        return self.value


def test_relational_term_is_within_two_orders_of_the_feature_term_at_init():
    """At the toy default's shapes (16x48², patch 8: student 4x96, teacher 4x128, assistant 4x96), the
    relational term δ weighs must not vanish next to β's (it was ~1800x smaller before τ_r)."""
    torch.manual_seed(0)

    def vit(depth, width, heads, labels=LABELS):
        return VideoMAEForVideoClassification(video_config(depth, width, heads, image_size=48, num_frames=16,
                                                           patch_size=8, tubelet_size=2, labels=labels))

    tri = TriModel(vit(4, 96, 3), vit(4, 128, 4), vit(4, 96, 3, ["l", "r", "u", "d"]),
                   config_from_dict({}).distill, LABELS)
    with torch.no_grad():
        out = tri(torch.randn(8, 16, 3, 48, 48), torch.randint(0, 4, (8,)))
    relations = (out["asym_spatial"] + out["asym_temporal"]).item()
    assert 1e-2 <= relations / out["feat"].item() <= 1e2, (relations, out["feat"].item())


def test_a_relation_grid_of_one_cell_is_refused():
    """The model-level check (a hub student's patch size is known only once it loads); the config
    refuses what it can see already (test_config)."""
    student, teacher, assistant = models()
    for field, match in (("asym_space", "asym_space"), ("asym_time", "asym_time")):
        d = distill()
        setattr(d, field, 1)
        with pytest.raises(LayerError, match=match):
            TriModel(student, teacher, assistant, d, LABELS)
        d.delta = 0.0
        TriModel(student, teacher, assistant, d, LABELS)  # no relational term: nothing to refuse

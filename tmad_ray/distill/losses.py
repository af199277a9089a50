"""The distillation objective as pure functions: tensors in, tensors (or a dict of named terms) out.

``L = α·ce + β·feat + γ·attn + δ·asym`` (docs/guide.md, "Distillation", gives every term). Shapes: B batch, N tokens, D width,
C classes, H heads, T' × S × S the pooled grid of the relational term.

Every KL here is ``KL(target ‖ student)``: summed over the distribution axis, averaged over every
other axis (batch, query rows, relation rows), so its scale does not depend on the batch or the grid.

Everything here computes in fp32, also inside a bf16 ``torch.autocast`` region (training on GPUs):
autocast would otherwise run the matmuls of attention maps and relation matrices in bf16 whatever
their inputs are (``.float()`` does not stop it), and bf16's 8-bit mantissa moves a softmax over
hundreds of tokens by percents.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

# Relation "logits" are cosines in [-1, 1]: divided by T alone, their softmax is nearly flat for any
# T >= 1 and T has no effect. Scaled by 1/τ_r first (as in contrastive and relational distillation),
# they span [-10, 10], and T decides how peaked the relations are.
RELATION_TAU = 0.1


def fp32(fn):
    """Run ``fn`` with autocast off (CPU, and CUDA where there is one); ``fn`` casts its inputs to fp32."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), \
                (torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()):
            return fn(*args, **kwargs)
    return wrapper


@fp32
def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits [B,C]`` against ``labels [B]`` (int64)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@fp32
def kl_rows(target_probs: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` over the last axis, averaged over all others; ``0·log 0`` counts as 0."""
    p = target_probs.float()
    log_p = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    return (p * (log_p - student_logp.float())).sum(-1).mean()


@fp32
def feature_loss(student_proj: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over aligned layers of ``MSE(P(h_s), LN(h_x))``.

    ``student_proj[l]``: the student's tokens at layer l through its projector, ``[B,N,D_x]``.
    ``targets[l]``: the frozen model's tokens at the mapped layer, ``[B,N,D_x]``; layer-normed here
    without affine parameters so models of different scales compare.
    """
    if len(student_proj) != len(targets) or not targets:
        raise ValueError(f"feature_loss: {len(student_proj)} student layers for {len(targets)} targets")
    terms = [F.mse_loss(p.float(), F.layer_norm(t.float(), t.shape[-1:])) for p, t in zip(student_proj, targets)]
    return torch.stack(terms).mean()


@fp32
def attention_map(q: torch.Tensor, k: torch.Tensor, heads: int, query_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention probabilities from a layer's query and key projections.

    ``q, k``: ``[B,N,D]`` (outputs of the layer's query / key linears). ``query_idx``: optional
    rows to keep, ``[Nq]`` for the whole batch or ``[B,Nq]`` per clip, so memory is ``B·H·Nq·N``
    rather than ``B·H·N·N``. Returns ``[B,Nq,N]``: ``mean_h softmax(q_h k_hᵀ / sqrt(D/H))``, the
    probabilities the layer's attention uses.
    """
    b, n, d = q.shape
    dh = d // heads
    if query_idx is not None:
        q = q[:, query_idx] if query_idx.dim() == 1 else q[torch.arange(b, device=q.device)[:, None], query_idx]
    qh = q.reshape(b, q.shape[1], heads, dh).transpose(1, 2).float()
    kh = k.reshape(b, n, heads, dh).transpose(1, 2).float()
    scores = qh @ kh.transpose(-1, -2) * dh ** -0.5
    return scores.softmax(-1).mean(1)


@fp32
def attention_loss(student_maps: list[torch.Tensor], target_maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean over aligned layers of ``KL(A_x ‖ A_s)``, each ``[B,Nq,N]`` (rows are distributions)."""
    if len(student_maps) != len(target_maps) or not target_maps:
        raise ValueError(f"attention_loss: {len(student_maps)} student maps for {len(target_maps)} targets")
    terms = [kl_rows(a_x, a_s.float().clamp_min(1e-30).log()) for a_s, a_x in zip(student_maps, target_maps)]
    return torch.stack(terms).mean()


@fp32
def pool_grid(tokens: torch.Tensor, grid: tuple[int, int, int], time: int, space: int) -> torch.Tensor:
    """Average-pool tokens ``[B, T·H·W, D]`` (time-major, as VideoMAE orders them) to ``[B, time, space, space, D]``."""
    b, n, d = tokens.shape
    t, h, w = grid
    if n != t * h * w:
        raise ValueError(f"pool_grid: {n} tokens do not form a {t}x{h}x{w} grid")
    x = tokens.float().reshape(b, t, h, w, d).permute(0, 4, 1, 2, 3)
    x = F.adaptive_avg_pool3d(x, (min(time, t), min(space, h), min(space, w)))
    return x.permute(0, 2, 3, 4, 1)


@fp32
def spatial_relations(grid: torch.Tensor) -> torch.Tensor:
    """Per time step, cosine similarity between spatial cells: ``[B,T',S,S,D] -> [B,T',S²,S²]``."""
    b, t, s1, s2, d = grid.shape
    x = F.normalize(grid.float().reshape(b, t, s1 * s2, d), dim=-1)
    return x @ x.transpose(-1, -2)


@fp32
def temporal_relations(grid: torch.Tensor) -> torch.Tensor:
    """Per spatial cell, cosine similarity between time steps: ``[B,T',S,S,D] -> [B,S²,T',T']``."""
    b, t, s1, s2, d = grid.shape
    x = F.normalize(grid.float().reshape(b, t, s1 * s2, d).transpose(1, 2), dim=-1)
    return x @ x.transpose(-1, -2)


@fp32
def relation_kd(r_target: torch.Tensor, r_student: torch.Tensor, temperature: float,
                tau: float = RELATION_TAU) -> torch.Tensor:
    """``T²·KL(σ(R_x/(τ_r·T)) ‖ σ(R_s/(τ_r·T)))`` with a row-wise softmax σ; cosine relation matrices
    ``[..., M, M]``; τ_r fixed (``RELATION_TAU``), T the searched temperature."""
    return soft_kd(r_target / tau, r_student / tau, temperature)


@fp32
def soft_kd(z_target: torch.Tensor, z_student: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(σ(z_x/T) ‖ σ(z_s/T))`` over the last axis (the T² keeps gradients comparable across T)."""
    return temperature ** 2 * kl_rows((z_target.float() / temperature).softmax(-1),
                                      (z_student.float() / temperature).log_softmax(-1))


@fp32
def logit_kd(z_target: torch.Tensor, z_student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: ``T²·KL(σ(z_x/T) ‖ σ(z_s/T))`` over classes, logits ``[B,C]``."""
    return soft_kd(z_target, z_student, temperature)


@fp32
def distill_losses(student: dict, frozen: dict[str, dict], labels: torch.Tensor, *, alpha: float, beta: float,
                   gamma: float, delta: float, temperature: float, weights: dict[str, float],
                   label_smoothing: float = 0.0, relations: bool = True) -> dict[str, torch.Tensor]:
    """All terms of the objective for one batch, and their weighted total ``loss``.

    ``student``: ``logits [B,C]``, and when the terms need them ``proj`` (``{model: [P(h_s) per layer]}``),
    ``attn`` (``[A_s per layer]``, ``[B,Nq,N]``), ``grid`` (``[B,T',S,S,D_s]``).
    ``frozen``: per frozen model (``"teacher"``, ``"assistant"``) what it teaches: ``feats``
    (``[h_x per layer]``), ``attn``, ``grid``, and ``logits`` only when its id2label is the dataset's.
    ``weights``: ``w_t``/``w_a`` per model name. The relational term takes spatial relations from
    the teacher and temporal relations from the assistant; ``relations=False`` leaves δ to logit KD alone.
    Returns unweighted terms (``ce feat attn asym`` and per-model parts such as ``feat_teacher``),
    weighted terms (``ce_w ...``) and ``loss``; a term whose weight is 0 is not computed.
    """
    out: dict[str, torch.Tensor] = {"ce": ce_loss(student["logits"], labels, label_smoothing)}
    parts: dict[str, list[torch.Tensor]] = {"feat": [], "attn": [], "asym": []}
    for name, x in frozen.items():
        w = weights[name]
        if w == 0:
            continue
        if beta > 0:
            out[f"feat_{name}"] = feature_loss(student["proj"][name], x["feats"])
            parts["feat"].append(w * out[f"feat_{name}"])
        if gamma > 0:
            out[f"attn_{name}"] = attention_loss(student["attn"], x["attn"])
            parts["attn"].append(w * out[f"attn_{name}"])
        if delta > 0 and relations:
            if name == "teacher":
                out["asym_spatial"] = relation_kd(spatial_relations(x["grid"]), spatial_relations(student["grid"]),
                                                  temperature)
                parts["asym"].append(w * out["asym_spatial"])
            else:
                out["asym_temporal"] = relation_kd(temporal_relations(x["grid"]),
                                                   temporal_relations(student["grid"]), temperature)
                parts["asym"].append(w * out["asym_temporal"])
        if delta > 0 and x.get("logits") is not None:
            out[f"kd_{name}"] = logit_kd(x["logits"], student["logits"], temperature)
            parts["asym"].append(w * out[f"kd_{name}"])
    for term, ps in parts.items():
        if ps:
            out[term] = torch.stack(ps).sum()
    coef = {"ce": alpha, "feat": beta, "attn": gamma, "asym": delta}
    total = torch.zeros((), device=out["ce"].device)
    for term, c in coef.items():
        if term in out and c > 0:
            out[f"{term}_w"] = c * out[term]
            total = total + out[f"{term}_w"]
    out["loss"] = total
    return out

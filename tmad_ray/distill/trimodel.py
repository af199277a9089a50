"""Student + projectors (trainable) and teacher + assistant (frozen), with layer mapping and capture.

* Layers: ``align_layers`` are 1-based student block indices, negative from the end. Student block
  i of L_s maps to block ``round(i·L_x/L_s)`` (half up) of a frozen model with L_x blocks.
* Capture: forward hooks on the aligned blocks take their output tokens, and hooks on the query /
  key linears of the aligned blocks take Q and K, from which ``losses.attention_map`` rebuilds the
  head-averaged attention. Every block keeps its fast attention kernel (SDPA);
  ``output_attentions=True``, which forces eager attention in every block, is never used.
* ``Trainable`` (student + one projector per aligned layer and frozen model) is the only module
  DDP wraps and the optimizer sees; the frozen models run under ``no_grad`` in eval mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from tmad_ray.distill import losses
from tmad_ray.recipe import WEIGHTS
from tmad_ray.errors import UserError


class LayerError(UserError, ValueError):
    pass


def resolve_layer(index: int, depth: int) -> int:
    """A 1-based block index (negative from the end) as a positive 1-based index."""
    if index == 0 or not -depth <= index <= depth:
        raise LayerError(f"aligned layer {index} does not exist in a model of depth {depth} "
                         f"(use 1..{depth} or -1..-{depth}; -1 is the last block)")
    return index if index > 0 else depth + 1 + index


def map_layer(i: int, student_depth: int, frozen_depth: int) -> int:
    """Student block i (1-based) -> the frozen block at the same relative depth, ``round(i·L_x/L_s)`` half up."""
    j = (2 * i * frozen_depth + student_depth) // (2 * student_depth)
    return max(1, j)


def backbone(model: nn.Module) -> nn.Module:
    """The ``VideoMAEModel`` inside a classifier, or the model itself."""
    return getattr(model, "videomae", model)


def token_grid(config) -> tuple[int, int, int]:
    """Tokens per (time, height, width) of a VideoMAE config."""
    s = config.image_size // config.patch_size
    return config.num_frames // config.tubelet_size, s, s


@contextlib.contextmanager
def capture(model: nn.Module, feat_layers: list[int], attn_layers: list[int]):
    """Record block outputs ``[B,N,D]`` of ``feat_layers`` and Q/K ``[B,N,D]`` of ``attn_layers`` (1-based).

    Yields a dict filled during the forward: ``{"feats": {i: h}, "q": {i: q}, "k": {i: k}}``.
    """
    blocks = backbone(model).encoder.layer
    store: dict[str, dict[int, torch.Tensor]] = {"feats": {}, "q": {}, "k": {}}
    handles = []

    def keep(kind, i):
        def hook(_module, _inputs, output):
            store[kind][i] = output
        return hook

    for i in set(feat_layers):
        handles.append(blocks[i - 1].register_forward_hook(keep("feats", i)))
    for i in set(attn_layers):
        attn = blocks[i - 1].attention.attention
        handles.append(attn.query.register_forward_hook(keep("q", i)))
        handles.append(attn.key.register_forward_hook(keep("k", i)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def frozen_targets(model: nn.Module, pixel_values: torch.Tensor, layers: list[int], grid_shape, time_cells: int,
                   space_cells: int, attn: bool, query_idx: torch.Tensor | None, logits: bool,
                   half: bool = True) -> dict:
    """What a frozen model teaches at ``layers`` (1-based, its own numbering), batched:
    ``feats``/``grid``/``attn`` as ``{layer: [B, ...]}`` and ``logits [B,C]``, in fp16 for the target
    cache (``half``), else as computed (a cohort's shared targets, ``shared_targets``)."""
    cast = (lambda t: t.half()) if half else (lambda t: t)
    with capture(model, layers, layers if attn else []) as store:
        out = model(pixel_values=pixel_values)
    res = {"feats": {j: cast(store["feats"][j]) for j in layers},
           "grid": {j: cast(losses.pool_grid(store["feats"][j], grid_shape, time_cells, space_cells)) for j in layers}}
    if attn:
        heads = model.config.num_attention_heads
        res["attn"] = {j: cast(losses.attention_map(store["q"][j], store["k"][j], heads, query_idx)) for j in layers}
    if logits:
        res["logits"] = cast(out.logits)
    return res


@dataclass
class Needs:
    """Which terms are on (their weight > 0), so nothing unused is computed or created."""
    feat: bool
    attn: bool
    asym: bool

    @classmethod
    def from_config(cls, d) -> "Needs":
        return cls(feat=d.beta > 0, attn=d.gamma > 0, asym=d.delta > 0)


class Trainable(nn.Module):
    """Student and projectors: what DDP wraps, the optimizer updates and the checkpoint stores.

    ``forward(pixel_values [B,T,3,H,W], query_idx [Nq] | None)`` returns ``logits [B,C]``,
    ``proj`` ``{model: [B,N,D_x] per aligned layer}``, ``attn`` ``[B,Nq,N]`` per aligned layer and
    ``tokens`` of the last aligned layer ``[B,N,D_s]`` (whichever the objective needs).
    """

    def __init__(self, student: nn.Module, layers: list[int], frozen_widths: dict[str, int], needs: Needs):
        super().__init__()
        self.student = student
        self.layers = layers
        self.needs = needs
        width = student.config.hidden_size
        self.projectors = nn.ModuleDict({
            name: nn.ModuleList([nn.Linear(width, w) for _ in layers]) for name, w in frozen_widths.items()
        } if needs.feat else {})

    def forward(self, pixel_values: torch.Tensor, query_idx: torch.Tensor | None = None) -> dict:
        feat_layers = self.layers if (self.needs.feat or self.needs.asym) else []
        attn_layers = self.layers if self.needs.attn else []
        with capture(self.student, feat_layers, attn_layers) as store:
            logits = self.student(pixel_values=pixel_values).logits
        out = {"logits": logits}
        if self.needs.feat:
            out["proj"] = {name: [p(store["feats"][i]) for p, i in zip(ps, self.layers)]
                           for name, ps in self.projectors.items()}
        if self.needs.attn:
            heads = self.student.config.num_attention_heads
            out["attn"] = [losses.attention_map(store["q"][i], store["k"][i], heads, query_idx) for i in self.layers]
        if self.needs.asym:
            out["tokens"] = store["feats"][max(self.layers)]
        return out


class Frozen:
    """A frozen teacher or assistant: eval mode, no gradients, asked only for what the objective needs."""

    def __init__(self, model: nn.Module, student_layers: list[int], student_depth: int, needs: Needs,
                 teaches_logits: bool):
        self.model = model.eval().requires_grad_(False)
        depth = model.config.num_hidden_layers
        self.layers = [map_layer(i, student_depth, depth) for i in student_layers]
        self.last = map_layer(max(student_layers), student_depth, depth)
        self.needs = needs
        self.teaches_logits = teaches_logits and needs.asym

    @torch.no_grad()
    def targets(self, pixel_values: torch.Tensor, query_idx: torch.Tensor | None = None) -> dict:
        """``feats`` ``[B,N,D_x]`` per layer, ``attn`` ``[B,Nq,N]`` per layer, ``tokens`` ``[B,N,D_x]``, ``logits``."""
        feat_layers = (self.layers if self.needs.feat else []) + ([self.last] if self.needs.asym else [])
        attn_layers = self.layers if self.needs.attn else []
        with capture(self.model, feat_layers, attn_layers) as store:
            out = self.model(pixel_values=pixel_values)
        res: dict = {}
        if self.needs.feat:
            res["feats"] = [store["feats"][i] for i in self.layers]
        if self.needs.attn:
            heads = self.model.config.num_attention_heads
            res["attn"] = [losses.attention_map(store["q"][i], store["k"][i], heads, query_idx) for i in self.layers]
        if self.needs.asym:
            res["tokens"] = store["feats"][self.last]
        if self.teaches_logits:
            res["logits"] = out.logits
        return res

    def select(self, cached: dict) -> dict:
        """The cached targets this trial's layers need, shaped as ``targets`` returns them (grid pooled)."""
        res: dict = {}
        if self.needs.feat:
            res["feats"] = [cached["feats"][j] for j in self.layers]
        if self.needs.attn:
            res["attn"] = [cached["attn"][j] for j in self.layers]
        if self.needs.asym:
            res["grid"] = cached["grid"][self.last]
        if self.teaches_logits:
            res["logits"] = cached["logits"]
        return res


def same_labels(model: nn.Module, labels: list[str]) -> bool:
    """Whether a frozen model has a classifier whose id2label is the dataset's (then it teaches logits)."""
    if not hasattr(model, "classifier"):
        return False
    id2label = {int(k): v for k, v in (model.config.id2label or {}).items()}
    return id2label == dict(enumerate(labels))


class TriModel(nn.Module):
    """The whole objective for a batch of normalized clips.

    ``trainable`` is an ``nn.Module`` attribute (swap in its DDP wrapper with ``wrap``); the frozen
    models are plain attributes kept out of ``parameters()``, so the optimizer, DDP and the
    checkpoint never see them. ``forward(pixel_values [B,T,3,H,W], labels [B])`` -> the dict of
    ``losses.distill_losses`` plus ``logits``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, assistant: nn.Module | None, distill_cfg,
                 labels: list[str]):
        super().__init__()
        d = distill_cfg
        self.cfg = d
        self.needs = Needs.from_config(d)
        depth = student.config.num_hidden_layers
        self.layers = sorted({resolve_layer(i, depth) for i in d.align_layers}, reverse=True)
        weights = {"teacher": d.teacher_weight, "assistant": d.assistant_weight}
        any_term = self.needs.feat or self.needs.attn or self.needs.asym
        frozen_models = {n: m for n, m in (("teacher", teacher), ("assistant", assistant))
                         if m is not None and weights[n] > 0 and any_term}
        self.frozen = {n: Frozen(m, self.layers, depth, self.needs, same_labels(m, labels))
                       for n, m in frozen_models.items()}
        self.weights = {n: weights[n] for n in self.frozen}
        self.trainable: nn.Module = Trainable(student, self.layers, {n: m.config.hidden_size
                                                                      for n, m in frozen_models.items()}, self.needs)
        self.grid = token_grid(student.config)
        if self.needs.asym:
            from tmad_ray.schema import relation_grid_problem

            problem = relation_grid_problem(d.asym_time, d.asym_space, self.grid[0], min(self.grid[1:]))
            if problem:
                raise LayerError(f"distill.delta={d.delta}: {problem}")

    @property
    def core(self) -> Trainable:
        """The unwrapped trainable module (through a DDP wrapper if there is one)."""
        return getattr(self.trainable, "module", self.trainable)

    def wrap(self, fn) -> None:
        """Replace the trainable module by ``fn(trainable)``, e.g. ``ray.train.torch.prepare_model``."""
        self.trainable = fn(self.trainable)

    def target_layers(self) -> dict[str, set[int]]:
        """Per frozen model, the layers (its own numbering) whose targets this objective reads."""
        return {n: set(f.layers) | {f.last} for n, f in self.frozen.items()}

    def frozen_to(self, device) -> "TriModel":
        for f in self.frozen.values():
            f.model.to(device)
        return self

    def query_rows(self, device, gen: torch.Generator | None = None) -> torch.Tensor | None:
        """``attn_query_tokens`` attention query rows drawn from ``gen`` (a CPU generator; the training
        loop passes its per-epoch one, seeded by seed, rank and epoch, so a run resumed from a
        checkpoint draws the same rows as an unbroken one); None when every row is used."""
        n = self.grid[0] * self.grid[1] * self.grid[2]
        k = self.cfg.attn_query_tokens
        if k is None or k >= n:
            return None
        # drawn whether or not this recipe's γ is on, so that every recipe of a study (and every
        # student of a cohort) draws the same crops from ``gen`` afterwards
        rows = torch.randperm(n, generator=gen)[:k].to(device)
        return rows if self.needs.attn else None

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        time = self.cfg.asym_time or self.grid[0]
        return losses.pool_grid(tokens, self.grid, time, self.cfg.asym_space)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor, cached: dict | None = None,
                query_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``cached``: the frozen models' targets from the target cache (``targets.TargetReader``),
        ``{model: {"feats"|"attn"|"grid": {frozen layer: [B,...]}, "logits": [B,C]}}``, instead of
        running them; ``query_idx`` then gives the attention rows they were computed for."""
        if query_idx is None:
            query_idx = self.query_rows(pixel_values.device)
        student = self.trainable(pixel_values, query_idx)
        frozen = {}
        for name, f in self.frozen.items():
            if cached is not None:
                x = f.select(cached[name])
            else:
                x = f.targets(pixel_values, query_idx)
                if "tokens" in x:
                    x["grid"] = self._grid(x.pop("tokens"))
            frozen[name] = x
        if "tokens" in student:
            student["grid"] = self._grid(student.pop("tokens"))
        d = self.cfg
        out = losses.distill_losses(student, frozen, labels, **{k: getattr(d, k) for k in WEIGHTS},
                                    temperature=d.temperature, weights=self.weights,
                                    label_smoothing=d.label_smoothing, relations=d.relations)
        out["logits"] = student["logits"]
        return out


def shared_targets(tris: list[TriModel], pixel_values: torch.Tensor, query_idx: torch.Tensor | None) -> dict:
    """One forward of each frozen model for a cohort's students ``tris`` (which hold the same frozen
    model objects), at every layer any of them reads, shaped as the target cache's entries are read
    (``{model: {"feats"|"grid"|"attn": {layer: [B,...]}, "logits": [B,C]}}``): each student passes it
    as ``cached`` to its own forward. Kept as computed (fp32 on CPU), so a student's loss and
    gradients are exactly those it gets alone."""
    wanted: dict[str, dict] = {}
    for tri in tris:
        for name, f in tri.frozen.items():
            w = wanted.setdefault(name, {"model": f.model, "layers": set(), "attn": False, "logits": False})
            if w["model"] is not f.model:
                raise ValueError(f"a cohort's students must share one {name} model, not copies")
            w["layers"] |= set(f.layers) | {f.last}
            w["attn"] |= f.needs.attn
            w["logits"] |= f.teaches_logits
    if not wanted:
        return {}
    first = tris[0]
    grid, d = first.grid, first.cfg
    if any((t.grid, t.cfg.asym_time, t.cfg.asym_space) != (grid, d.asym_time, d.asym_space) for t in tris):
        raise ValueError("a cohort's students must share the token grid and distill.asym_time/asym_space")
    return {name: frozen_targets(w["model"], pixel_values, sorted(w["layers"]), grid, d.asym_time or grid[0],
                                 d.asym_space, w["attn"], query_idx, w["logits"], half=False)
            for name, w in wanted.items()}

"""Frozen-target cache (``distill.cache_targets: true``): the teacher's and assistant's forwards, once per study.

The frozen models see the same clips in every trial, so what they teach can be computed once and
read back: per cached train clip view and per augmentation k of ``distill.target_views`` fixed
augmentations (crop offset and flip, a function of video, view and k), the features at every
frozen layer any layer set of the search can map to, the pooled relation grids there, the
head-averaged attention maps there (for a fixed set of query rows per view when
``distill.attn_query_tokens`` is set) and the logits of a model that teaches them. All fp16.

Augmentation stays honest: with the cache on, training draws one of the K fixed augmentations
per clip and step (never a crop whose targets were not computed), so a trial sees K variants of
each view instead of fresh random crops. The entries live beside the clip cache under
``targets/<key>/``, where the key covers the models' weights (checksums), the layers, K, the grid,
the query rows and the tokenization: change any and the targets are computed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import torch

from tmad_ray.data.cache import ClipCache
from tmad_ray.distill import losses
from tmad_ray.distill.trimodel import capture, map_layer, resolve_layer, same_labels, token_grid
from tmad_ray.data.normalize import normalize

AUG_VERSION = 1


def _digest(*parts) -> bytes:
    return hashlib.sha256("#".join(map(str, parts)).encode()).digest()


def aug_params(video_id: str, view: int, k: int, side: int, size: int, flip: bool) -> tuple[int, int, bool]:
    """The k-th fixed augmentation of a cached view: crop offset (y, x) in a ``side``² clip and h-flip."""
    h = _digest("aug", AUG_VERSION, video_id, view, k)
    room = side - size + 1
    return (int.from_bytes(h[0:4], "little") % room, int.from_bytes(h[4:8], "little") % room,
            bool(flip and h[8] & 1))


def query_rows(video_id: str, view: int, k: int, n_tokens: int, n_query: int | None) -> torch.Tensor | None:
    """The fixed attention query rows of an augmented view (all rows when not sampled)."""
    if n_query is None or n_query >= n_tokens:
        return None
    seed = int.from_bytes(_digest("query", video_id, view, k)[:8], "little")
    return torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n_tokens, n_query, replace=False)))


def crop_flip(clips: torch.Tensor, params: list[tuple[int, int, bool]], size: int) -> torch.Tensor:
    """uint8 ``[B,T,S,S,3]`` -> normalized ``[B,T,3,size,size]`` with one (y, x, flip) per clip."""
    out = []
    for c, (y, x, f) in zip(clips, params):
        c = c[:, y:y + size, x:x + size]
        out.append(c.flip(2) if f else c)
    return normalize(torch.stack(out))


def candidate_layers(cfg, student_depth: int) -> list[int]:
    """Every student block (1-based) that the config's aligned layers or any searched layer set names."""
    from tmad_ray.config import parse_layer_set

    sets = [cfg.distill.align_layers] + [parse_layer_set(t) for t in cfg.search.align_layer_sets]
    return sorted({resolve_layer(i, student_depth) for s in sets for i in s})


def model_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TargetCache:
    """Target entries (one file per video) under ``<clip cache>/targets/<key>/``."""

    def __init__(self, clip_cache_uri: str, key: str):
        self.cache, self.key = ClipCache(clip_cache_uri), key
        self.prefix = f"targets/{key}"

    def __reduce__(self):
        return (TargetCache, (self.cache.uri, self.key))

    def _rel(self, entry_key: str) -> str:
        return f"{self.prefix}/{entry_key[:2]}/{entry_key}.pt"

    def write(self, entry_key: str, obj: dict) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.cache.write_blob(self._rel(entry_key), buf.getvalue())

    def read(self, entry_key: str) -> dict | None:
        blob = self.cache.read_blob(self._rel(entry_key))
        return None if blob is None else torch.load(io.BytesIO(blob), weights_only=True)

    def size_bytes(self) -> int:
        return self.cache.size_bytes(self.prefix)


@torch.no_grad()
def frozen_targets(model: torch.nn.Module, pixel_values: torch.Tensor, layers: list[int], grid_shape, time_cells: int,
                   space_cells: int, attn: bool, query_idx: torch.Tensor | None, logits: bool) -> dict:
    """What a frozen model teaches at ``layers`` (1-based, its own numbering), batched and fp16:
    ``feats``/``grid``/``attn`` as ``{layer: [B, ...]}`` and ``logits [B,C]``."""
    with capture(model, layers, layers if attn else []) as store:
        out = model(pixel_values=pixel_values)
    res = {"feats": {j: store["feats"][j].half() for j in layers},
           "grid": {j: losses.pool_grid(store["feats"][j], grid_shape, time_cells, space_cells).half() for j in layers}}
    if attn:
        heads = model.config.num_attention_heads
        res["attn"] = {j: losses.attention_map(store["q"][j], store["k"][j], heads, query_idx).half() for j in layers}
    if logits:
        res["logits"] = out.logits.half()
    return res


def plan(cfg, student_depth: int, frozen: dict[str, torch.nn.Module], labels: list[str]) -> dict:
    """What to compute for each frozen model, and the key of the whole cache."""
    d = cfg.distill
    cand = candidate_layers(cfg, student_depth)
    models = {}
    for name, m in frozen.items():
        depth = m.config.num_hidden_layers
        models[name] = {"digest": model_digest(m), "layers": sorted({map_layer(i, student_depth, depth) for i in cand}),
                        "logits": same_labels(m, labels)}
    grid = token_grid(next(iter(frozen.values())).config)
    spec = {"models": models, "student_depth": student_depth, "K": d.target_views, "flip": cfg.train.flip,
            "attn": cfg.search.gamma[1] > 0 or d.gamma > 0, "query": d.attn_query_tokens,
            "time": d.asym_time or grid[0], "space": d.asym_space, "grid": grid, "image": cfg.data.image_size,
            "aug": AUG_VERSION}
    spec["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return spec


def build_target_cache(cfg, report, frozen: dict[str, torch.nn.Module], student_depth: int, labels: list[str],
                       batch_size: int = 16, log=print) -> dict:
    """Compute the targets of every cached train view (skipping entries already there)."""
    spec = plan(cfg, student_depth, frozen, labels)
    store, clips_cache = TargetCache(cfg.storage.clip_cache, spec["key"]), ClipCache(cfg.storage.clip_cache)
    size, side = cfg.data.image_size, cfg.data.train_short_side
    n_tokens = spec["grid"][0] * spec["grid"][1] * spec["grid"][2]
    t0, computed, reused = time.perf_counter(), 0, 0
    for model in frozen.values():
        model.eval()
    for video_id, entry_key in sorted(report.entries.get("train", {}).items()):
        if store.cache.read_blob(store._rel(entry_key)) is not None:
            reused += 1
            continue
        _, clips = clips_cache.read_clips(entry_key)
        items = [(v, k) for v in range(len(clips)) for k in range(spec["K"])]
        params = [aug_params(video_id, v, k, side, size, spec["flip"]) for v, k in items]
        queries = [query_rows(video_id, v, k, n_tokens, spec["query"]) for v, k in items]
        entry = {"video_id": video_id, "items": items, "aug": params,
                 "query": None if queries[0] is None else torch.stack(queries)}
        src = torch.from_numpy(clips)
        for name, m in frozen.items():
            mp = spec["models"][name]
            parts = []
            for i in range(0, len(items), batch_size):
                x = crop_flip(src[[v for v, _ in items[i:i + batch_size]]], params[i:i + batch_size], size)
                q = None if entry["query"] is None else entry["query"][i:i + batch_size]
                parts.append(frozen_targets(m, x, mp["layers"], spec["grid"], spec["time"], spec["space"],
                                            spec["attn"], q, mp["logits"]))
            entry[name] = _cat(parts)
        store.write(entry_key, entry)
        computed += 1
    seconds = time.perf_counter() - t0
    stats = {"key": spec["key"], "videos": computed + reused, "computed": computed, "reused": reused,
             "views": (computed + reused) * cfg.data.train_views * spec["K"], "seconds": seconds,
             "bytes": store.size_bytes(), "spec": spec}
    log(f"frozen targets {spec['key']}: {computed} videos computed, {reused} reused in {seconds:.1f} s, "
        f"{stats['bytes'] / 2**20:.1f} MB")
    return stats


def _cat(parts: list[dict]) -> dict:
    out: dict = {}
    for key in parts[0]:
        if isinstance(parts[0][key], dict):
            out[key] = {j: torch.cat([p[key][j] for p in parts]) for j in parts[0][key]}
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


class TargetReader:
    """A worker's view of the target cache: per batch, pick an augmentation per clip, return the
    augmented clips and the targets stacked like ``Frozen.targets`` returns them."""

    def __init__(self, store: TargetCache, entries: dict[str, str], K: int):
        self.store, self.entries, self.K = store, entries, K
        self.loaded: dict[str, dict] = {}

    def _entry(self, video_id: str) -> dict:
        if video_id not in self.loaded:
            e = self.store.read(self.entries[video_id])
            if e is None:
                raise RuntimeError(f"no cached targets for {video_id} (cache {self.store.key}); the study builds "
                                   "them before training when distill.cache_targets is true")
            e["index"] = {tuple(it): n for n, it in enumerate(e["items"])}
            self.loaded[video_id] = e
        return self.loaded[video_id]

    def batch(self, video_ids, views, gen: torch.Generator, device) -> tuple[list, torch.Tensor | None, dict]:
        """(aug params per clip, query rows ``[B,Nq]`` or None, ``{model: {feats|attn|grid: {layer: [B,...]}, logits}}``)."""
        ks = torch.randint(0, self.K, (len(video_ids),), generator=gen).tolist()
        rows = []
        for vid, view, k in zip(video_ids, views, ks):
            e = self._entry(str(vid))
            rows.append((e, e["index"][(int(view), k)]))
        params = [e["aug"][i] for e, i in rows]
        query = None if rows[0][0]["query"] is None else torch.stack([e["query"][i] for e, i in rows]).to(device)
        out = {}
        for name in (n for n in ("teacher", "assistant") if n in rows[0][0]):
            m = {}
            for key, val in rows[0][0][name].items():
                if isinstance(val, dict):
                    m[key] = {j: torch.stack([e[name][key][j][i] for e, i in rows]).to(device).float() for j in val}
                else:
                    m[key] = torch.stack([e[name][key][i] for e, i in rows]).to(device).float()
            out[name] = m
        return params, query, out

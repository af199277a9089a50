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
``targets/<key>/``, where the key covers the models' weights (checksums) and configurations (head
counts shape the attention maps), the layers, K, the grid, the query rows, the tokenization, the
storage dtype and ``FORMAT`` (the entries' layout): change any and the targets are computed again;
caches of an older format are named once (each key's ``spec.json`` says what it was built from).

Size and memory: ``entry_bytes`` gives an entry's size from the plan, so the study prints the
whole cache's size first and refuses one above ``distill.target_cache_max_gb`` (at xd_violence's
shapes an entry is ~220 MB: this is a cache for small clips or slow frozen forwards, not for
thousands of 224² videos on GPUs). The build runs on the training workers' kind of device (Ray
tasks, a GPU each with ``train.use_gpu``); a worker's ``TargetReader`` keeps only its trial's
layers, in a least-recently-used store bounded by ``distill.target_cache_reader_mb``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections import OrderedDict

import numpy as np
import torch

from tmad_ray.data.augment import AUG_VERSION, aug_params, crop_flip
from tmad_ray.data.cache import ClipCache
from tmad_ray.distill.trimodel import frozen_targets, map_layer, resolve_layer, same_labels, token_grid
from tmad_ray.errors import UserError
from tmad_ray.storage import Storage


FORMAT = 2  # the entries' layout; raise it when what an entry holds or how it is computed changes
SPEC_FILE = "spec.json"


def _digest(*parts) -> bytes:
    return hashlib.sha256("#".join(map(str, parts)).encode()).digest()


def query_rows(video_id: str, view: int, k: int, n_tokens: int, n_query: int | None) -> torch.Tensor | None:
    """The fixed attention query rows of an augmented view (all rows when not sampled)."""
    if n_query is None or n_query >= n_tokens:
        return None
    seed = int.from_bytes(_digest("query", video_id, view, k)[:8], "little")
    return torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n_tokens, n_query, replace=False)))


def candidate_layers(cfg, student_depth: int) -> list[int]:
    """Every student block (1-based) that the config's aligned layers or any searched layer set names."""
    from tmad_ray.recipe import parse_layer_set

    sets = [cfg.distill.align_layers] + [parse_layer_set(t) for t in cfg.search.align_layer_sets]
    return sorted({resolve_layer(i, student_depth) for s in sets for i in s})


def model_digest(model: torch.nn.Module) -> str:
    """The weights and the configuration (the head count is not in the weights but shapes attention)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TargetCache:
    """Target entries (one file per video) under ``<clip cache>/targets/<key>/``."""

    def __init__(self, clip_cache_uri: str, key: str):
        self.uri, self.key = clip_cache_uri, key
        self.store = Storage(clip_cache_uri)

    def __reduce__(self):
        return (TargetCache, (self.uri, self.key))

    def _parts(self, entry_key: str) -> tuple[str, ...]:
        return "targets", self.key, entry_key[:2], f"{entry_key}.pt"

    def write(self, entry_key: str, obj: dict) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.store.write_bytes(buf.getvalue(), *self._parts(entry_key))

    def has(self, entry_key: str) -> bool:
        return self.store.is_file(*self._parts(entry_key))

    def read(self, entry_key: str) -> dict | None:
        blob = self.store.read_bytes(*self._parts(entry_key))
        return None if blob is None else torch.load(io.BytesIO(blob), weights_only=True)

    def size_bytes(self) -> int:
        return self.store.size_bytes("targets", self.key)


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
            "aug": AUG_VERSION, "dtype": "float16", "format": FORMAT}
    spec["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return spec


class TargetCacheError(UserError, RuntimeError):
    pass


def entry_bytes(spec: dict, frozen: dict[str, torch.nn.Module], views: int) -> int:
    """Bytes of one video's entry (fp16 tensors): per view and augmentation, for each frozen model, the
    features ``[N,D]`` and the pooled grid ``[T',S,S,D]`` at each of its layers, the attention maps
    ``[Nq,N]`` there, and its logits; plus the query rows. What ``build_target_cache`` checks first."""
    t, h, w = spec["grid"]
    n = t * h * w
    nq = n if spec["query"] is None else min(spec["query"], n)
    cells = min(spec["time"], t) * min(spec["space"], h) * min(spec["space"], w)
    per_item = 0 if spec["query"] is None or spec["query"] >= n else nq * 8
    for name, m in frozen.items():
        mp, width = spec["models"][name], m.config.hidden_size
        per_layer = n * width + cells * width + (nq * n if spec["attn"] else 0)
        per_item += 2 * (len(mp["layers"]) * per_layer + (m.config.num_labels if mp["logits"] else 0))
    return views * spec["K"] * per_item


def build_target_cache(cfg, report, frozen: dict[str, torch.nn.Module], student_depth: int, labels: list[str],
                       batch_size: int = 16, say=print, workers: int | None = None) -> dict:
    """Compute the targets of every cached train view (skipping entries already there).

    The size is printed first, and a cache larger than ``distill.target_cache_max_gb`` is refused.
    ``workers``: None computes here, in this process; a number runs that many Ray tasks, each with
    the resources of a training worker (a GPU with ``train.use_gpu``), the models travelling through
    the object store, so the frozen forwards run where training would run them.
    """
    spec = plan(cfg, student_depth, frozen, labels)
    store = TargetCache(cfg.storage.clip_cache, spec["key"])
    entries = sorted(report.entries.get("train", {}).items())
    per_video = entry_bytes(spec, frozen, cfg.data.cached_train_views)
    total, limit = per_video * len(entries), cfg.distill.target_cache_max_gb * 1e9
    say(f"frozen targets {spec['key']}: {len(entries)} videos x {per_video / 1e6:.1f} MB = {total / 1e9:.2f} GB "
        f"(distill.target_cache_max_gb={cfg.distill.target_cache_max_gb:g})")
    if total > limit:
        raise TargetCacheError(
            f"the frozen-target cache would take {total / 1e9:.1f} GB ({per_video / 1e6:.0f} MB per video), more "
            f"than distill.target_cache_max_gb={cfg.distill.target_cache_max_gb:g}. Shrink it (distill.target_views, "
            "distill.attn_query_tokens, fewer search.align_layer_sets), raise distill.target_cache_max_gb if the "
            "storage has room, or set distill.cache_targets=false (the frozen models then run in every step)")
    old = older_formats(cfg.storage.clip_cache, spec["key"])
    if old:
        say(f"frozen targets: {len(old)} cache(s) of an older format under {store.store.uri('targets')} are not used "
            f"(format {FORMAT} now): delete {', '.join(old)} to free the space")
    store.store.write_text(json.dumps(spec, sort_keys=True, indent=1), "targets", spec["key"], SPEC_FILE)
    todo = [(v, k) for v, k in entries if not store.has(k)]
    t0 = time.perf_counter()
    if todo and workers is None:
        compute_entries(frozen, spec, cfg, todo, "cpu", batch_size)
    elif todo:
        import ray

        t = cfg.train
        task = ray.remote(_compute_task).options(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0)
        models = ray.put(frozen)
        n = max(1, min(workers, len(todo)))
        ray.get([task.remote(models, spec, cfg.model_dump(), todo[i::n], batch_size) for i in range(n)])
    seconds = time.perf_counter() - t0
    stats = {"key": spec["key"], "videos": len(entries), "computed": len(todo), "reused": len(entries) - len(todo),
             "views": len(entries) * cfg.data.cached_train_views * spec["K"], "seconds": seconds,
             "bytes": store.size_bytes(), "estimated_bytes": total, "spec": spec}
    say(f"frozen targets {spec['key']}: {stats['computed']} videos computed, {stats['reused']} reused in "
        f"{seconds:.1f} s, {stats['bytes'] / 2**20:.1f} MB")
    return stats


def older_formats(clip_cache_uri: str, key: str) -> list[str]:
    """The other target caches beside this one whose ``spec.json`` is of another format, or absent."""
    store, old = Storage(clip_cache_uri), []
    for d in store.subdirs("targets"):
        if d == key:
            continue
        text = store.read_text("targets", d, SPEC_FILE) if store.is_file("targets", d, SPEC_FILE) else None
        if text is None or json.loads(text).get("format") != FORMAT:
            old.append(d)
    return old


def _compute_task(frozen: dict, spec: dict, cfg_dict: dict, todo: list, batch_size: int) -> None:
    """A Ray task's share of ``build_target_cache``: on the GPU Ray gave it, else the CPU."""
    from tmad_ray.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    compute_entries(frozen, spec, cfg, todo, "cuda" if torch.cuda.is_available() else "cpu", batch_size)


def compute_entries(frozen: dict[str, torch.nn.Module], spec: dict, cfg, todo: list[tuple[str, str]], device,
                    batch_size: int) -> None:
    """Write the target entry of each ``(video_id, clip-cache key)`` in ``todo``: frozen forwards on
    ``device`` (bf16 autocast on CUDA, as in training; the maps themselves in fp32), stored in fp16."""
    store, clips_cache = TargetCache(cfg.storage.clip_cache, spec["key"]), ClipCache(cfg.storage.clip_cache)
    size, side = cfg.data.image_size, cfg.data.train_short_side
    n_tokens = spec["grid"][0] * spec["grid"][1] * spec["grid"][2]
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    models = {name: m.to(device).eval() for name, m in frozen.items()}
    for video_id, entry_key in todo:
        _, clips = clips_cache.read_clips(entry_key)
        items = [(v, k) for v in range(len(clips)) for k in range(spec["K"])]
        params = [aug_params(video_id, v, k, side, size, spec["flip"]) for v, k in items]
        queries = [query_rows(video_id, v, k, n_tokens, spec["query"]) for v, k in items]
        entry = {"video_id": video_id, "items": items, "aug": params,
                 "query": None if queries[0] is None else torch.stack(queries)}
        src = torch.from_numpy(clips)
        for name, m in models.items():
            mp = spec["models"][name]
            parts = []
            for i in range(0, len(items), batch_size):
                x = crop_flip(src[[v for v, _ in items[i:i + batch_size]]], params[i:i + batch_size], size)
                q = None if entry["query"] is None else entry["query"][i:i + batch_size].to(device)
                with autocast:
                    out = frozen_targets(m, x.to(device), mp["layers"], spec["grid"], spec["time"], spec["space"],
                                         spec["attn"], q, mp["logits"])
                parts.append(_to_cpu(out))
            entry[name] = _cat(parts)
        store.write(entry_key, entry)


def _to_cpu(tree):
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree.cpu()


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
    augmented clips and the targets stacked like ``Frozen.targets`` returns them.

    ``keep``: per frozen model, the layers this trial uses (``TriModel.target_layers``); an entry
    loses every other layer as it is read. Entries stay in memory up to ``budget_mb``, least
    recently used first out, so memory does not grow with the dataset."""

    def __init__(self, store: TargetCache, entries: dict[str, str], K: int, keep: dict[str, set[int]] | None = None,
                 budget_mb: float = 1024):
        self.store, self.entries, self.K, self.keep = store, entries, K, keep
        self.budget = budget_mb * 2**20
        self.loaded: OrderedDict[str, dict] = OrderedDict()
        self.bytes = 0
        self.reads = 0

    def _entry(self, video_id: str) -> dict:
        if video_id in self.loaded:
            self.loaded.move_to_end(video_id)
            return self.loaded[video_id]
        e = self.store.read(self.entries[video_id])
        self.reads += 1
        if e is None:
            raise RuntimeError(f"no cached targets for {video_id} (cache {self.store.key}); the study builds "
                               "them before training when distill.cache_targets is true")
        if self.keep is not None:
            for name in ("teacher", "assistant"):
                if name in e and name not in self.keep:
                    del e[name]
                elif name in e:
                    for key in ("feats", "grid", "attn"):
                        if key in e[name]:
                            e[name][key] = {j: v for j, v in e[name][key].items() if j in self.keep[name]}
        e["index"] = {tuple(it): n for n, it in enumerate(e["items"])}
        e["nbytes"] = _nbytes(e)
        self.loaded[video_id] = e
        self.bytes += e["nbytes"]
        while self.bytes > self.budget and len(self.loaded) > 1:
            _, old = self.loaded.popitem(last=False)
            self.bytes -= old["nbytes"]
        return e

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


def _nbytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0

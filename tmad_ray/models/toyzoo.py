"""The toy zoo: small pretrained frozen models for the embedded default (``tmad-ray zoo``).

* **teacher**: a small VideoMAE classifier trained on the synthetic labels (A, B1, B2, G) on clips
  the generator draws with other seeds than the dataset's, saved with ``save_pretrained``, so it
  teaches features and logits and loads like any transformers checkpoint.
* **assistant**: a small ViT trained on another motion task of the same generator, the
  direction in which the whole scene drifts (left, right, up, down): motion-centric, as SSV2 is
  for the real assistant. It is saved **in AMD's checkpoint format** (``{'model': sd, 'args':
  Namespace}``, fused qkv, q/v biases) with its ``VideoMAEConfig`` beside it, so the default run
  goes through the real AMD loading and conversion.
* **student** (when ``models.toy_zoo.student`` is set): a small ViT pretrained the way VideoMAE-base
  is, as a masked autoencoder (tube masking, 75 % of tubes hidden) on **unlabeled** clips of the
  direction task: no label and no video of the embedded task, and none of its motions (fights,
  shots, flashes) were seen before fine-tuning, so what the student gains on the task it learns
  there. It is saved with ``save_pretrained`` as ``VideoMAEForPreTraining`` (encoder + decoder, no
  classifier), exactly as ``MCG-NJU/videomae-base`` is on the hub, and loaded through
  ``models.student.name`` with a new classifier for the task's labels. Its targets are the hidden
  patches' pixels, not VideoMAE's per-patch normalized pixels: the generator's per-frame sensor
  noise dominates a normalized 8x8 patch, and with those targets the loss stayed at 0.99 of the
  patch variance (nothing learned); with pixels it falls from 0.080 to 0.019 in 3 epochs.

All are deterministic from the seed and take a few minutes on 2 cores. The teacher is scored
on the dataset's val split (decoded from the MP4s), the assistant on held-out generated clips.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tmad_ray.data.clips import ViewSpec, crop_offsets, decode_views, resize_frames, sample_train_indices
from tmad_ray.data.manifest import load_manifest
from tmad_ray.data.augment import normalize
from tmad_ray.data.synthetic import CLASSES, make_scene, render_video
from tmad_ray.models.hf import video_config

DIRECTIONS = ["down", "left", "right", "up"]
TEACHER_ARCH = dict(depth=4, width=128, heads=4)
ASSISTANT_ARCH = dict(depth=4, width=96, heads=3)
SEED_OFFSET = 10_000  # generated training clips never share seeds with the dataset's videos


# ------------------------------------------------------------------------ training clips


def direction_scene(direction: str, rng: np.random.Generator, height: int, width: int, frames: int):
    """A class-A scene whose objects all drift together in ``direction`` (1-2 px/frame, wrapping)."""
    scene = make_scene("A", rng, height, width, frames)
    step = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}[direction]
    speed = rng.uniform(1.0, 2.0) * min(height, width) / 64
    shift = np.arange(frames)[:, None] * speed * np.array(step, float)
    size = np.array([height, width], float)
    scene.pair = np.mod(scene.pair + shift[:, None, :], size)
    scene.particle = np.mod(scene.particle + shift, size)
    return scene


def _clip_from_video(video: np.ndarray, spec: ViewSpec, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """One clip as the data pipeline makes it: sampled frames, resized; random or centre crop."""
    idx = sample_train_indices(len(video), spec.num_frames, spec.sampling, spec.sampling_rate, rng)
    frames = resize_frames(video[idx], spec.train_short_side if augment else spec.image_size)
    h, w = frames.shape[1:3]
    if augment:
        y, x = int(rng.integers(0, h - spec.image_size + 1)), int(rng.integers(0, w - spec.image_size + 1))
    else:
        (y, x), = crop_offsets(h, w, spec.image_size, 1)
    return frames[:, y:y + spec.image_size, x:x + spec.image_size]


def make_clips(task: str, n_per_class: int, seed: int, spec: ViewSpec, size: tuple[int, int], frames: int,
               augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` generated clips per class of ``task`` ("labels" or "direction")."""
    names = list(CLASSES) if task == "labels" else DIRECTIONS
    clips, labels = [], []
    for ci, name in enumerate(names):
        for i in range(n_per_class):
            rng = np.random.default_rng([SEED_OFFSET + seed, 7 if task == "direction" else 3, ci, i])
            scene = make_scene(name, rng, *size, frames) if task == "labels" else direction_scene(name, rng, *size, frames)
            clips.append(_clip_from_video(render_video(scene), spec, rng, augment))
            labels.append(ci)
    return np.stack(clips), np.array(labels)


# ------------------------------------------------------------------------------ training


def fit(model, n: int, loss_of, epochs: int, rng: np.random.Generator, lr: float = 1e-3, batch_size: int = 16,
        betas: tuple[float, float] = (0.9, 0.999), say=print, what: str = "loss") -> list[float]:
    """Plain single-process training of ``model`` on ``n`` items (AdamW, warmup + cosine, clipping):
    ``loss_of(indices)`` gives a batch's loss. Returns the mean loss of each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.05)
    steps = epochs * math.ceil(n / batch_size)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for epoch in range(epochs):
        order, total, t0 = rng.permutation(n), 0.0, time.perf_counter()
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = loss_of(idx)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        say(f"  epoch {epoch + 1}/{epochs}: {what} {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def train_classifier(model, clips: np.ndarray, labels: np.ndarray, epochs: int, seed: int, lr: float = 1e-3,
                     batch_size: int = 16, flip: bool = True, say=print) -> None:
    """A classifier on labeled clips; flips only where labels allow it."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def loss_of(idx):
        x = normalize(clips[idx])
        if flip:
            mask = torch.as_tensor(rng.random(len(idx)) < 0.5)
            x[mask] = x[mask].flip(-1)
        return F.cross_entropy(model(pixel_values=x).logits, torch.as_tensor(labels[idx]))
    fit(model, len(clips), loss_of, epochs, rng, lr, batch_size, say=say)


@torch.no_grad()
def accuracy(model, clips: np.ndarray, labels: np.ndarray, batch_size: int = 32) -> float:
    model.eval()
    preds = [model(pixel_values=normalize(clips[i:i + batch_size])).logits.argmax(-1)
             for i in range(0, len(clips), batch_size)]
    return float((torch.cat(preds).numpy() == labels).mean())


# ------------------------------------------------------------------- AMD checkpoint format


def to_amd_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers VideoMAE classifier -> AMD's key names (fused qkv, q_bias / v_bias)."""
    sd = model.state_dict()
    out = {"patch_embed.proj.weight": sd["videomae.embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["videomae.embeddings.patch_embeddings.projection.bias"],
           "fc_norm.weight": sd["fc_norm.weight"], "fc_norm.bias": sd["fc_norm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(model.config.num_hidden_layers):
        p = f"videomae.encoder.layer.{i}."
        att = p + "attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [sd[att + "query.weight"], sd[att + "key.weight"], sd[att + "value.weight"]])
        out[f"blocks.{i}.attn.q_bias"] = sd[att + "query.bias"]
        out[f"blocks.{i}.attn.v_bias"] = sd[att + "value.bias"]
        pairs = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
        for amd_name, hf_name in pairs.items():
            for t in ("weight", "bias"):
                out[f"blocks.{i}.{amd_name}.{t}"] = sd[f"{p}{hf_name}.{t}"]
    return {k: v.detach().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------- zoo


def build_zoo(cfg, out: str | Path, seed: int = 0, clips_per_class: int = 200, epochs: int = 12, say=print) -> dict:
    """Train both models for ``cfg``'s tokenization and write ``out/{teacher/, assistant.pth, ...}``."""
    from transformers import VideoMAEForVideoClassification

    out = Path(out)
    d = cfg.data
    z = cfg.models.toy_zoo
    if d.synthetic is None:
        raise ValueError("the toy zoo is for the synthetic dataset: the config has no data.synthetic")
    spec = ViewSpec.from_config(d, "train")
    size, frames = (d.synthetic.size, d.synthetic.size), d.synthetic.frames
    # the zoo's tokenization; a config without a toy_zoo section (tests) uses its preset student's
    patch, tubelet = (z.patch_size, z.tubelet_size) if z is not None else (cfg.models.student.patch_size,
                                                                         cfg.models.student.tubelet_size)
    tok = dict(image_size=d.image_size, num_frames=d.num_frames, patch_size=patch, tubelet_size=tubelet)
    labels = sorted(CLASSES)  # the dataset's label order (labels come sorted from train)
    result = {"seed": seed, "clips_per_class": clips_per_class, "epochs": epochs, "tokenization": tok}

    t0 = time.perf_counter()
    say(f"teacher: {TEACHER_ARCH}, {clips_per_class} generated clips per class, {epochs} epochs")
    x, y = make_clips("labels", clips_per_class, seed, spec, size, frames, augment=True)
    # make_clips numbers classes in CLASSES order; the teacher's id2label is the sorted order.
    remap = np.array([labels.index(c) for c in CLASSES])
    y = remap[y]
    torch.manual_seed(seed)
    teacher = VideoMAEForVideoClassification(video_config(**TEACHER_ARCH, **tok, labels=labels))
    train_classifier(teacher, x, y, epochs, seed, say=say)
    manifest = load_manifest(d.root, d.label_mode, d.val_fraction, d.split_seed)
    if manifest.labels != labels:
        raise ValueError(f"dataset labels {manifest.labels} differ from the synthetic classes {labels}")
    eval_spec = ViewSpec.from_config(d.model_copy(update={"eval_clips": 1, "eval_crops": 1}), "eval")
    val = [(decode_views(r.abspath(manifest.root), eval_spec)[0], manifest.label2id[r.label])
           for r in manifest.rows["val"]]
    vx, vy = np.stack([v for v, _ in val]), np.array([l for _, l in val])
    result["teacher"] = {"val_accuracy": accuracy(teacher, vx, vy), "val_clips": len(vy),
                         "train_accuracy": accuracy(teacher, x, y), "arch": TEACHER_ARCH}
    teacher.save_pretrained(out / "teacher")
    say(f"  teacher val accuracy (dataset val split, {len(vy)} videos): {result['teacher']['val_accuracy']:.3f}")

    say(f"assistant: {ASSISTANT_ARCH}, direction of motion {DIRECTIONS}")
    x, y = make_clips("direction", clips_per_class // 2, seed, spec, size, frames, augment=True)
    hx, hy = make_clips("direction", 25, seed + 1, spec, size, frames, augment=False)
    torch.manual_seed(seed + 1)
    a_config = video_config(**ASSISTANT_ARCH, **tok, labels=DIRECTIONS)
    assistant = VideoMAEForVideoClassification(a_config)
    train_classifier(assistant, x, y, epochs, seed + 1, flip=False, say=say)  # a flip would swap left/right
    result["assistant"] = {"val_accuracy": accuracy(assistant, hx, hy), "val_clips": len(hy),
                           "task": "direction of motion", "classes": DIRECTIONS, "arch": ASSISTANT_ARCH}
    torch.save({"model": to_amd_state_dict(assistant),
                "args": argparse.Namespace(model="toy_vit", input_size=d.image_size, num_frames=d.num_frames,
                                           nb_classes=len(DIRECTIONS), seed=seed)}, out / "assistant.pth")
    (out / "assistant_config.json").write_text(a_config.to_json_string())
    say(f"  assistant val accuracy (held-out generated clips): {result['assistant']['val_accuracy']:.3f}")

    if z is not None and z.student is not None:
        result["student"] = pretrain_student(z.student, tok, spec, size, frames, seed, out / "student", say)

    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "zoo.json").write_text(json.dumps(result, indent=1))
    return result


def pretrain_student(st, tok: dict, spec: ViewSpec, size, frames: int, seed: int, out: Path, say=print) -> dict:
    """Masked-autoencoder pretraining of a ``st.depth x st.width`` ViT on ``st.clips`` unlabeled clips of
    the direction task (seeds apart from the assistant's), saved with ``save_pretrained`` to ``out``."""
    from transformers import VideoMAEForPreTraining

    say(f"student: {st.depth} blocks x {st.width}, masked-autoencoder pretraining on {st.clips} unlabeled "
        f"direction-task clips, {st.epochs} epochs, {st.mask_ratio:.0%} of tubes masked")
    per_class = max(1, st.clips // len(DIRECTIONS))
    x, _ = make_clips("direction", per_class, seed + 2, spec, size, frames, augment=True)  # labels unused
    config = video_config(st.depth, st.width, st.heads, **tok)
    dec = max(32, st.width // 2)  # a small decoder: it is thrown away after pretraining
    config.update({"norm_pix_loss": False, "decoder_hidden_size": dec, "decoder_num_hidden_layers": 1,
                   "decoder_num_attention_heads": 2, "decoder_intermediate_size": 2 * dec})
    torch.manual_seed(seed + 2)
    model = VideoMAEForPreTraining(config)
    rng = np.random.default_rng(seed + 2)
    t, side = tok["num_frames"] // tok["tubelet_size"], tok["image_size"] // tok["patch_size"]
    n_space = side * side
    n_mask = int(round(st.mask_ratio * n_space))
    t0 = time.perf_counter()

    def loss_of(idx):
        # tube masking: the same spatial patches hidden at every time step (VideoMAE's)
        keep = np.stack([rng.permutation(n_space) < n_mask for _ in idx])
        return model(pixel_values=normalize(x[idx]), bool_masked_pos=torch.as_tensor(np.tile(keep, (1, t)))).loss
    losses = fit(model, len(x), loss_of, st.epochs, rng, lr=1.5e-3, betas=(0.9, 0.95), say=say,
                 what="reconstruction loss")
    model.eval().save_pretrained(out)
    say(f"  student pretrained in {time.perf_counter() - t0:.0f} s: {out} (no classifier: fine-tuning adds one)")
    return {"task": "masked autoencoding, unlabeled direction-task clips", "clips": len(x), "epochs": st.epochs,
            "mask_ratio": st.mask_ratio, "reconstruction_loss": [round(v, 4) for v in losses],
            "arch": {"depth": st.depth, "width": st.width, "heads": st.heads}}


def ensure_toy_zoo(cfg, say=print) -> None:
    """Build the toy zoo the config points at when the config asks for one and it is missing."""
    z = cfg.models.toy_zoo
    if z is None:
        return
    record = Path(z.dir) / "zoo.json"
    if not record.is_file():
        say(f"toy zoo missing at {z.dir}: training it (once)")
        build_zoo(cfg, z.dir, seed=z.seed, clips_per_class=z.clips_per_class, epochs=z.epochs, say=say)
    elif z.student is not None and not (Path(z.dir) / "student" / "config.json").is_file():
        # a zoo made before it had a pretrained student: add the student, keep the rest
        say(f"toy zoo at {z.dir} has no pretrained student: pretraining it (once)")
        d = cfg.data
        tok = dict(image_size=d.image_size, num_frames=d.num_frames, patch_size=z.patch_size,
                   tubelet_size=z.tubelet_size)
        result = json.loads(record.read_text())
        result["student"] = pretrain_student(z.student, tok, ViewSpec.from_config(d, "train"),
                                             (d.synthetic.size, d.synthetic.size), d.synthetic.frames, z.seed,
                                             Path(z.dir) / "student", say)
        record.write_text(json.dumps(result, indent=1))

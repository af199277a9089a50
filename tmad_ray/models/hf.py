"""Teacher, student and assistant as transformers VideoMAE models.

* teacher: a hub name or a local ``save_pretrained`` directory. ``MCG-NJU/videomae-base`` is a
  self-supervised checkpoint without a classifier: it is loaded as ``VideoMAEModel`` and teaches
  features only. A checkpoint fine-tuned on the dataset's labels (same id2label) also teaches logits.
* student: a hub name / local directory (its classifier is re-made for the dataset's labels), a
  size preset (``vit-tiny``, ``vit-s``, ``vit-b``) or explicit depth / width / heads (trained from
  scratch, which is what a preset means).
* assistant: an AMD checkpoint, converted strictly (``amd.py``).

All three must tokenize alike (patch, tubelet, frames, image size); ``check_tokenization`` says
which model differs in what, before any training starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel

from tmad_ray.errors import UserError
from tmad_ray.models import amd

STUDENT_PRESETS = {"vit-tiny": (12, 192, 3), "vit-s": (12, 384, 6), "vit-b": (12, 768, 12)}  # depth, width, heads


class ModelError(UserError, RuntimeError):
    pass


def video_config(depth: int, width: int, heads: int, *, image_size: int, num_frames: int, patch_size: int,
                 tubelet_size: int, labels: list[str] | None = None) -> VideoMAEConfig:
    """A VideoMAE classifier config in the VideoMAE / AMD recipe (mean pooling, eps 1e-6)."""
    labels = labels or []
    return VideoMAEConfig(
        image_size=image_size, patch_size=patch_size, num_channels=3, num_frames=num_frames,
        tubelet_size=tubelet_size, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, hidden_act="gelu", qv_bias=True, layer_norm_eps=1e-6, use_mean_pooling=True,
        num_labels=max(len(labels), 1), id2label={i: n for i, n in enumerate(labels)} or None,
        label2id={n: i for i, n in enumerate(labels)} or None,
    )


def _how_to_provide(name: str) -> str:
    if Path(name).is_dir():
        return (f"{name} is a local directory: write it again with save_pretrained (config.json and "
                "model.safetensors, complete), or point models.teacher.name / models.student.name at one that is")
    return (f"Provide it as a local directory written by save_pretrained (set models.teacher.name / "
            f"models.student.name to that directory), or download it once where there is internet "
            f"(`hf download {name}`) and copy the Hugging Face cache (~/.cache/huggingface) here, "
            f"or set HF_HUB_OFFLINE=0 if this machine can reach the hub")


def _cannot_load(name: str, e: Exception) -> ModelError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelError(f"cannot load model {name!r}: {reason}. {_how_to_provide(name)}")


def _resolve_config(name: str) -> VideoMAEConfig:
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is a directory without config.json: not a save_pretrained model directory")
    try:
        return VideoMAEConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _cannot_load(name, e) from None


def _from_pretrained(cls, name: str, **kwargs):
    """``cls.from_pretrained`` with every way a model directory can be broken (no weights, a truncated
    safetensors file, a foreign file) turned into one ``ModelError`` that says what to do."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(name, output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        raise _cannot_load(name, e) from None


def load_teacher(name: str) -> torch.nn.Module:
    """``VideoMAEForVideoClassification`` when the checkpoint has a classifier, else ``VideoMAEModel``."""
    config = _resolve_config(name)
    with_head = any("ForVideoClassification" in a for a in (config.architectures or []))
    cls = VideoMAEForVideoClassification if with_head else VideoMAEModel
    model, info = _from_pretrained(cls, name)
    if info.get("missing_keys"):
        raise ModelError(f"{name}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:10]} "
                         "(they would be random; refusing)")
    return model.eval()


def build_student(student_cfg, data_cfg, labels: list[str]) -> VideoMAEForVideoClassification:
    """The trainable student with a classifier for ``labels``. A pretrained one (``name``) keeps its
    backbone and gets a new classifier (and ``fc_norm`` when its checkpoint has none, as VideoMAE's
    pretraining checkpoints do); ``model.reinitialized`` names those modules."""
    s = student_cfg
    if s.name is not None:
        _resolve_config(s.name)  # a clear error when it cannot be found
        model, info = _from_pretrained(
            VideoMAEForVideoClassification, s.name, id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
        # Only the classifier (new labels) and its norm may be new; a missing backbone weight is an error.
        mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]
        new = [k for k in [*info.get("missing_keys", []), *mismatched]
               if not k.startswith(("classifier.", "fc_norm."))]
        if new:
            raise ModelError(f"student {s.name}: backbone weights missing from the checkpoint: {new[:10]}")
        # what starts from scratch (a new head for these labels): the study says it once, describe_models
        model.reinitialized = sorted({k.split(".")[0] for k in [*info.get("missing_keys", []), *mismatched]})
        return model
    depth, width, heads = STUDENT_PRESETS[s.size] if s.size else (s.depth, s.width, s.heads)
    config = video_config(depth, width, heads, image_size=data_cfg.image_size, num_frames=data_cfg.num_frames,
                          patch_size=s.patch_size, tubelet_size=s.tubelet_size, labels=labels)
    return VideoMAEForVideoClassification(config)


def load_assistant(models_cfg, data_cfg) -> torch.nn.Module:
    """The AMD assistant: ``path`` if set, else the zoo file (downloaded and verified)."""
    a = models_cfg.assistant
    if a.path is not None:
        if not os.path.isfile(a.path):
            raise ModelError(f"assistant checkpoint not found: {a.path} (models.assistant.path). "
                             "Fetch a zoo checkpoint with `tmad-ray fetch-assistant --arch vit-s --dataset ssv2`.")
        path = Path(a.path)
        if a.sha256 is not None and amd.sha256_file(path) != a.sha256:
            raise ModelError(f"assistant checkpoint {path} does not match models.assistant.sha256")
    else:
        entry = amd.zoo_entry(a.arch, a.dataset, a.kind)
        path = amd.fetch(entry.url, Path(models_cfg.cache_dir) / entry.filename, sha256=a.sha256,
                         file_id=entry.file_id)
    sd, _ = amd.load_amd_file(path)
    pretrain = a.kind == "pretrain"
    config = amd.target_config(sd, a.arch, a.config, data_cfg.image_size, data_cfg.num_frames, pretrain)
    return amd.build_converted(sd, config, pretrain=pretrain)


def check_tokenization(models: dict[str, torch.nn.Module], data_cfg) -> None:
    """All models must cut clips into the same tokens as the data produces; raise listing differences."""
    want = {"image_size": data_cfg.image_size, "num_frames": data_cfg.num_frames}
    first = None
    problems = []
    for role, model in models.items():
        c = model.config
        got = {"image_size": c.image_size, "num_frames": c.num_frames, "patch_size": c.patch_size,
               "tubelet_size": c.tubelet_size}
        for k, v in want.items():
            if got[k] != v:
                problems.append(f"{role}: {k}={got[k]} but data.{k}={v}")
        if first is None:
            first = (role, got)
        else:
            for k in ("patch_size", "tubelet_size"):
                if got[k] != first[1][k]:
                    problems.append(f"{role}: {k}={got[k]} but {first[0]} has {first[1][k]}")
    if problems:
        raise ModelError("the models do not share one tokenization:\n  " + "\n  ".join(problems))


def load_models(cfg, labels: list[str], roles: tuple[str, ...] = ("teacher", "assistant", "student")) -> dict:
    """The models of ``roles`` (in that order: the student is seeded by whoever seeds before it),
    each through its loader, checked for one tokenization. The one loader of the driver (all three,
    before any trial) and the training workers (the student and the frozen models the recipe uses)."""
    loaders = {"teacher": lambda: load_teacher(cfg.models.teacher.name),
               "assistant": lambda: load_assistant(cfg.models, cfg.data),
               "student": lambda: build_student(cfg.models.student, cfg.data, labels)}
    models = {role: loaders[role]() for role in roles}
    check_tokenization(models, cfg.data)
    return models


def frozen_roles(distill) -> tuple[str, ...]:
    """The frozen models a recipe needs: none when no distillation term is on, else those with weight."""
    if not (distill.beta > 0 or distill.gamma > 0 or distill.delta > 0):
        return ()
    return tuple(role for role, w in (("teacher", distill.teacher_weight), ("assistant", distill.assistant_weight))
                 if w > 0)

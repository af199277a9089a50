"""The AMD assistant: model zoo, verified download, and strict conversion to transformers.

AMD ("Asymmetric Masked Distillation", CVPR 2024) ships VideoMAE-style ViTs as PyTorch files:
``{'module': sd}`` (DeepSpeed, often fp16) or ``{'model': sd, 'args': argparse.Namespace, ...}``.
``convert_state_dict`` maps their keys onto ``transformers``' VideoMAE with a table of rules plus
the split of the fused ``qkv`` projection, and every key must be accounted for: an unknown,
missing or mis-shaped key is an error that lists them (the reference framework matched keys by
name, so no AMD weight ever loaded).

Key facts (checked against AMD's model code): ``qkv.weight`` ``[3D, D]`` splits by rows into
query/key/value; AMD's biases are ``q_bias`` and ``v_bias`` (the key has none); input is
``B,C,T,H,W`` where transformers takes ``B,T,C,H,W``. The head count is not in the weights: it
comes from the architecture (ViT-S: 384 wide, 6 heads; ViT-B: 768, 12) or an explicit config.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import VideoMAEConfig

from tmad_ray.errors import UserError

# ------------------------------------------------------------------------------------ zoo


@dataclass(frozen=True)
class ZooEntry:
    arch: str  # vit-s | vit-b
    dataset: str  # ssv2 | k400
    kind: str  # finetune | pretrain
    file_id: str  # Google Drive
    top1: float | None
    num_labels: int  # 0 for pretraining (encoder only)

    @property
    def url(self) -> str:
        """Google Drive, or ``$TMAD_RAY_ZOO_MIRROR/<filename>`` (an internal mirror for clusters
        that cannot reach Drive)."""
        mirror = os.environ.get("TMAD_RAY_ZOO_MIRROR")
        if mirror:
            return f"{mirror.rstrip('/')}/{self.filename}"
        return f"https://drive.google.com/uc?id={self.file_id}"

    @property
    def filename(self) -> str:
        return f"amd_{self.arch.replace('-', '')}_{self.dataset}_{self.kind}.pth"


ZOO = {
    (e.arch, e.dataset, e.kind): e
    for e in [
        ZooEntry("vit-s", "ssv2", "finetune", "1ynDyu3K_INoZjaNLzFIaYCo6kjBOwG__", 70.2, 174),
        ZooEntry("vit-b", "ssv2", "finetune", "1zc3ITIp4rR-dSelH0KaqMA9ahyju7sV2", 73.3, 174),
        ZooEntry("vit-s", "k400", "finetune", "1dJZKPHD9bYUl0UKH2qLca5JSTengJ8nq", None, 400),
        ZooEntry("vit-b", "k400", "finetune", "1zVMMVQoODUa_OlC40d8lvI1fgZPoqPjd", None, 400),
        ZooEntry("vit-s", "ssv2", "pretrain", "12hEVVdrFv0VNAIqAIZ0UTeicn-tm4jva", None, 0),
        ZooEntry("vit-b", "ssv2", "pretrain", "13EOb--vymBQpLNbztcN7wkdxXJiVfyXa", None, 0),
    ]
}

ARCHS = {"vit-s": (384, 6), "vit-b": (768, 12)}  # width, heads; depth 12 for both


def zoo_entry(arch: str, dataset: str, kind: str = "finetune") -> ZooEntry:
    try:
        return ZOO[(arch, dataset, kind)]
    except KeyError:
        known = ", ".join(f"{a}/{d}/{k}" for a, d, k in ZOO)
        raise KeyError(f"no AMD checkpoint {arch}/{dataset}/{kind} in the zoo; known: {known}") from None


# ------------------------------------------------------------------------------ download


class FetchError(UserError, RuntimeError):
    exit_code = 1  # the network or the host: may work on a second try


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manual_instructions(url: str, dest: Path, file_id: str | None = None) -> str:
    lines = ["Download it by hand and place it at the destination, then run the command again:"]
    if file_id:
        lines.append(f"  file id:     {file_id}")
    lines += [f"  URL:         {url}", f"  destination: {dest}"]
    return "\n".join(lines)


def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, file_id: str | None = None,
          timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (gdown), atomically, and verify it; returns ``dest``.

    A complete file is reused: ``dest.sha256`` records its checksum at download time and is
    checked on every later use (and against ``sha256`` when given). A failed or truncated
    download leaves nothing behind and raises ``FetchError`` with the manual-download steps.
    """
    import gdown

    dest = Path(dest)
    record = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        actual = sha256_file(dest)
        recorded = record.read_text().split()[0] if record.is_file() else None
        expected = sha256 or recorded
        if expected is not None and actual != expected:
            raise FetchError(f"checksum of {dest} is {actual}, expected {expected}: the file is corrupt or "
                             f"not the one that was downloaded. Delete it to download again.\n"
                             + manual_instructions(url, dest, file_id))
        if recorded is None:
            record.write_text(f"{actual}  {dest.name}\n")
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private directory beside dest: gdown keeps partial files of its own for resuming, and
    # all of them go with it; the rename into place stays on one filesystem.
    workdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent))
    part = workdir / dest.name
    hasher = hashlib.sha256()
    try:
        try:
            out = gdown.download(url=url, output=str(part), quiet=True, hasher=hasher, timeout=timeout)
        except Exception as e:  # gdown raises requests / gdown errors; all mean "not downloaded"
            raise FetchError(f"download of {url} failed: {type(e).__name__}: {e}") from None
        if out is None or not part.is_file() or part.stat().st_size == 0:
            raise FetchError(f"download of {url} failed: nothing was received")
        actual = hasher.hexdigest()
        if sha256 is not None and actual != sha256:
            raise FetchError(f"download of {url} has checksum {actual}, expected {sha256}")
        _check_torch_file(part)
        record.write_text(f"{actual}  {dest.name}\n")
        os.replace(part, dest)
    except FetchError as e:
        raise FetchError(f"{e}\n{manual_instructions(url, dest, file_id)}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return dest


def _check_torch_file(path: Path) -> None:
    """A torch.save file is a zip archive whose central directory is at the end: a truncated
    download lacks it. (Legacy pickles are accepted as they are.)"""
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise FetchError(f"download of {path.name} is truncated (its zip directory is missing)")
    if magic[:2] not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        raise FetchError(f"download is not a PyTorch checkpoint (starts with {magic!r}); "
                         "Google Drive may have returned an HTML page (quota or permission)")


# ---------------------------------------------------------------------------- conversion


class ConversionError(UserError, ValueError):
    pass


def amd_config(arch: str, num_labels: int, image_size: int = 224, num_frames: int = 16, patch_size: int = 16,
               tubelet_size: int = 2, pretrain: bool = False) -> VideoMAEConfig:
    """The transformers config of an AMD ViT (depth 12, eps 1e-6, mean pooling unless pretrain)."""
    if arch not in ARCHS:
        raise ConversionError(f"unknown AMD architecture {arch!r}; known: {list(ARCHS)} (or pass an explicit config)")
    width, heads = ARCHS[arch]
    return VideoMAEConfig(
        image_size=image_size, patch_size=patch_size, num_channels=3, num_frames=num_frames,
        tubelet_size=tubelet_size, hidden_size=width, num_hidden_layers=12, num_attention_heads=heads,
        intermediate_size=4 * width, hidden_act="gelu", qv_bias=True, layer_norm_eps=1e-6,
        use_mean_pooling=not pretrain, num_labels=max(num_labels, 1) if not pretrain else 1,
    )


def load_amd_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """Read an AMD checkpoint safely: tensors, containers and ``argparse.Namespace`` only."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise ConversionError(f"{path} is empty (0 bytes): download it again (tmad-ray fetch-assistant)")
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise ConversionError(f"{path} is truncated (its zip directory is missing): download it again "
                              "(tmad-ray fetch-assistant)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds here; the reason goes in the message
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(f"cannot read {path} as a PyTorch checkpoint (weights_only=True): {reason}. "
                                  "Only tensors and argparse.Namespace are accepted; a truncated or foreign file "
                                  "is refused") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    for wrapper in ("module", "model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            return obj[wrapper], obj.get("args")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ConversionError(f"{path}: no state dict under 'module', 'model' or 'state_dict' (keys: {sorted(obj)[:10]})")


# (pattern on the AMD key after prefixes are stripped, replacement on the transformers key of
# VideoMAEModel; the classifier-level keys are handled in `_target_key`).
RULES = [
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layer.\1.layernorm_before.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layer.\1.layernorm_after.\2"),
    (r"^blocks\.(\d+)\.attn\.q_bias$", r"encoder.layer.\1.attention.attention.query.bias"),
    (r"^blocks\.(\d+)\.attn\.v_bias$", r"encoder.layer.\1.attention.attention.value.bias"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"encoder.layer.\1.output.dense.\2"),
    (r"^norm\.(weight|bias)$", r"layernorm.\1"),
]
HEAD_RULES = [
    (r"^fc_norm\.(weight|bias)$", r"fc_norm.\1"),
    (r"^head\.(weight|bias)$", r"classifier.\1"),
]
QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")
DECODER = re.compile(r"^(decoder\.|encoder_to_decoder\.|mask_token$|decoder_pos_embed$|generator\.|projector)")


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def target_config(amd_sd: dict[str, torch.Tensor], arch: str | None = None, config_json: str | None = None,
                  image_size: int = 224, num_frames: int = 16, pretrain: bool = False) -> VideoMAEConfig:
    """The transformers config to convert into: an explicit VideoMAEConfig JSON, or ``arch`` with
    the label count read from the checkpoint's head (the head count is never in the weights)."""
    if config_json is not None:
        config = VideoMAEConfig.from_json_file(config_json)
        config.use_mean_pooling = config.use_mean_pooling and not pretrain
        return config
    heads = [v for k, v in amd_sd.items() if _strip(k) == "head.weight"]
    num_labels = int(heads[0].shape[0]) if heads else 1
    return amd_config(arch, num_labels, image_size=image_size, num_frames=num_frames, pretrain=pretrain)


def convert_state_dict(amd_sd: dict[str, torch.Tensor], config: VideoMAEConfig, pretrain: bool = False,
                       drop_decoder: bool = False) -> dict[str, torch.Tensor]:
    """AMD state dict -> a state dict for ``VideoMAEForVideoClassification(config)``
    (``pretrain=True``: for ``VideoMAEModel(config)``, from the ``encoder.*`` keys).

    Pure: tensors in, tensors out (fp32). Raises ``ConversionError`` listing every key that no
    rule explains; ``validate`` then checks the result against the target model.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    prefix = "" if pretrain else "videomae."
    width = config.hidden_size
    for raw_key, tensor in amd_sd.items():
        key = _strip(raw_key)
        if pretrain:
            if DECODER.match(key) and drop_decoder:
                continue
            if not key.startswith("encoder."):
                unknown.append(raw_key)
                continue
            key = key[len("encoder."):]
            if key.startswith("projection_heads"):  # AMD's distillation projectors: not part of the encoder
                continue
        elif key.startswith("encoder."):
            key = key[len("encoder."):]
        tensor = tensor.float() if tensor.is_floating_point() else tensor

        m = QKV.match(key)
        if m:
            if tensor.shape != (3 * width, width):
                unknown.append(f"{raw_key} (shape {tuple(tensor.shape)}, expected {(3 * width, width)})")
                continue
            base = f"{prefix}encoder.layer.{m.group(1)}.attention.attention"
            for i, name in enumerate(("query", "key", "value")):
                out[f"{base}.{name}.weight"] = tensor[i * width:(i + 1) * width].clone()
            continue
        for pattern, repl in RULES:
            if re.match(pattern, key):
                out[prefix + re.sub(pattern, repl, key)] = tensor
                break
        else:
            for pattern, repl in HEAD_RULES if not pretrain else []:
                if re.match(pattern, key):
                    out[re.sub(pattern, repl, key)] = tensor
                    break
            else:
                unknown.append(raw_key)
    if unknown:
        raise ConversionError(f"{len(unknown)} AMD key(s) have no rule: {unknown[:20]}"
                              + (" (pass drop_decoder / --drop-decoder to drop a pretraining decoder)"
                                 if any(DECODER.match(_strip(k.split(' ')[0])) for k in unknown) else ""))
    return out


def validate(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every parameter of ``model`` must come from the checkpoint with the same shape, and nothing more."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:12]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:12]}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {shapes[:12]}")
        raise ConversionError("the converted checkpoint does not fit the target model; " + "; ".join(parts))


def build_converted(amd_sd: dict[str, torch.Tensor], config: VideoMAEConfig, pretrain: bool = False,
                    drop_decoder: bool = False):
    """A transformers model with the AMD weights loaded strictly (eval mode)."""
    from transformers import VideoMAEForVideoClassification, VideoMAEModel

    converted = convert_state_dict(amd_sd, config, pretrain=pretrain, drop_decoder=drop_decoder)
    model = VideoMAEModel(config) if pretrain else VideoMAEForVideoClassification(config)
    validate(converted, model)
    model.load_state_dict(converted, strict=True)
    if not pretrain:
        model.fc_norm.eps = config.layer_norm_eps  # transformers builds fc_norm with eps 1e-5; AMD used 1e-6
    return model.eval()

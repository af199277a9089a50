"""The models' subcommands: ``tmad-ray zoo`` (the toy teacher and assistant of the embedded default),
``fetch-assistant`` (an AMD zoo checkpoint, verified and cached) and ``convert-amd``."""

from __future__ import annotations

from pathlib import Path

from tmad_ray.config import load_config
from tmad_ray.errors import UserError


def cmd_convert_amd(args) -> int:
    from tmad_ray.models import amd

    sd, _ = amd.load_amd_file(args.ckpt)
    config = amd.target_config(sd, args.arch, args.config, args.image_size, args.num_frames, args.pretrain)
    model = amd.build_converted(sd, config, pretrain=args.pretrain, drop_decoder=args.drop_decoder)
    model.save_pretrained(args.out_dir)
    kind = "VideoMAEModel" if args.pretrain else "VideoMAEForVideoClassification"
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.ckpt} -> {args.out_dir} ({kind}, {n / 1e6:.1f}M parameters, every key mapped)")
    return 0


def cmd_zoo(args) -> int:
    from tmad_ray.data.synthetic import ensure_synthetic
    from tmad_ray.models.toyzoo import build_zoo

    cfg = load_config(args.config, args.overrides)
    z = cfg.models.toy_zoo
    if z is None:
        raise UserError("the config has no models.toy_zoo section (the toy zoo is for the embedded default)")
    ensure_synthetic(cfg.data)
    out = args.out or z.dir
    r = build_zoo(cfg, out, seed=z.seed, clips_per_class=z.clips_per_class, epochs=z.epochs)
    print(f"toy zoo in {out} ({r['seconds']:.0f} s): teacher val accuracy {r['teacher']['val_accuracy']:.3f} "
          f"(4 classes, chance 0.25); assistant ({r['assistant']['task']}) val accuracy "
          f"{r['assistant']['val_accuracy']:.3f} (chance 0.25)")
    return 0


def cmd_fetch_assistant(args) -> int:
    from tmad_ray.models import amd

    entry = amd.zoo_entry(args.arch, args.dataset, args.kind)
    dest = Path(args.dest or load_config(None).models.cache_dir) / entry.filename
    path = amd.fetch(entry.url, dest, sha256=args.sha256, file_id=entry.file_id)
    print(f"{path}\nsha256 {amd.sha256_file(path)}\n"
          f"use it with: models.assistant.path={path} models.assistant.arch={args.arch}"
          + (" models.assistant.kind=pretrain" if args.kind == "pretrain" else ""))
    return 0


def add_model_commands(sub, config_args) -> None:
    """``zoo``, ``fetch-assistant`` and ``convert-amd`` on the top-level subparsers ``sub``;
    ``config_args(parser)`` adds ``--config`` and overrides."""
    p = sub.add_parser("zoo", help="train the toy teacher and assistant of the embedded default")
    p.add_argument("--out", default=None, help="directory (default: models.toy_zoo.dir of the config)")
    config_args(p)
    p.set_defaults(fn=cmd_zoo)

    p = sub.add_parser("fetch-assistant", help="download an AMD zoo checkpoint (gdown), verified and cached")
    p.add_argument("--arch", choices=["vit-s", "vit-b"], required=True)
    p.add_argument("--dataset", choices=["ssv2", "k400"], default="ssv2")
    p.add_argument("--kind", choices=["finetune", "pretrain"], default="finetune")
    p.add_argument("--dest", default=None, help="directory (default: models.cache_dir, ~/.cache/tmad_ray)")
    p.add_argument("--sha256", default=None, help="expected checksum, when known")
    p.set_defaults(fn=cmd_fetch_assistant)

    p = sub.add_parser("convert-amd", help="convert an AMD checkpoint to a transformers directory")
    p.add_argument("ckpt")
    p.add_argument("out_dir")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", choices=["vit-s", "vit-b"])
    g.add_argument("--config", help="VideoMAEConfig JSON for other sizes (the head count is not in the weights)")
    p.add_argument("--pretrain", action="store_true", help="a pretraining checkpoint: encoder only -> VideoMAEModel")
    p.add_argument("--drop-decoder", action="store_true", help="drop a pretraining checkpoint's decoder keys")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-frames", type=int, default=16)
    p.set_defaults(fn=cmd_convert_amd)

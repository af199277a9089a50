"""``tmad-ray`` subcommands (also ``python -m tmad_ray``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from tmad_ray.config import load_config
from tmad_ray.errors import UserError


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help=f"experiment YAML (default: {default or 'experiments/default.yaml'})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")


def cmd_synth(args) -> int:
    from tmad_ray.data.synthetic import make_dataset

    params = make_dataset(args.out, seed=args.seed, videos_per_class=args.videos_per_class, size=args.size,
                          frames=args.frames, overwrite=args.overwrite)
    n = params["videos_per_class"] * len(params["classes"])
    print(f"wrote {n} videos ({params['height']}x{params['width']}, {params['frames']} frames, "
          f"classes {', '.join(params['classes'])}) to {args.out}")
    return 0


def cmd_data_check(args) -> int:
    from tmad_ray.data.check import check_dataset
    from tmad_ray.data.manifest import ManifestError

    cfg = load_config(args.config, args.overrides)
    try:
        report = check_dataset(args.root, label_mode=cfg.data.label_mode, max_bad_fraction=cfg.data.max_bad_fraction,
                               timeout_s=cfg.data.decode_timeout_s)
    except ManifestError as e:
        if args.json:
            print(json.dumps({"ok": False, "root": args.root, "videos": 0,
                              "problems": [{"path": args.root, "line": None, "file": None, "reason": str(e)}]}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def prepare_data(cfg, quiet: bool = False):
    """Generate the embedded dataset if the config asks for it, then fill the clip cache.

    Returns ``(manifest, report)``; the data report is written to ``<output_dir>/data_report.json``.
    """
    import ray

    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.data.pipeline import fill_cache
    from tmad_ray.data.synthetic import ensure_synthetic

    ensure_synthetic(cfg.data)
    manifest = load_manifest(cfg.data.root, cfg.data.label_mode, cfg.data.val_fraction, cfg.data.split_seed)
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
    report = fill_cache(manifest, cfg)
    out = Path(cfg.storage.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(report.as_dict(), indent=1))
    return manifest, report


def cmd_data_cache(args) -> int:
    from tmad_ray.data.pipeline import DataError, check_bad_fraction

    cfg = load_config(args.config, args.overrides)
    _, report = prepare_data(cfg, quiet=args.json)
    d = report.as_dict()
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        print(f"videos {d['videos']}: decoded {d['decoded']}, reused {d['reused']}, bad {d['bad']}; "
              f"{d['clips_written']} clips written in {d['seconds']:.1f} s ({d['clips_per_s']:.1f} clips/s)")
        print(f"cache: {d['cache']}")
        for p in report.bad:
            print(f"  bad: {p}")
    try:
        check_bad_fraction(report, cfg.data.max_bad_fraction)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def search_plan(cfg, manifest, report) -> str:
    """What a study of this config will run, in words."""
    from tmad_ray.tracking import redact, resolve_tracking_uri

    s, t, d = cfg.search, cfg.train, cfg.distill
    split_sizes = ", ".join(f"{k} {len(v)}" for k, v in manifest.rows.items())
    space = ", ".join(f"{k} {getattr(s, k)} (log)" for k in ("alpha", "beta", "gamma", "delta"))
    lines = [
        f"study {cfg.name!r}",
        f"  data      {manifest.root}: {split_sizes}; labels {manifest.labels}",
        f"  clips     {report.decoded} videos decoded, {report.reused} reused, {len(report.bad)} bad; "
        f"cache {report.cache}",
        f"  search    {s.num_samples} trials, {s.algorithm.upper()} (seed {s.seed}), "
        f"ASHA on epoch (grace {s.grace_period}, reduction {s.reduction_factor:g}, max {t.epochs}) "
        f"-> {s.mode} {s.metric}",
        f"  space     {space}, temperature {s.temperature}, layer sets {s.align_layer_sets}"
        + (f", lr {s.lr} (log)" if s.lr else ""),
        f"  trial     {t.num_workers} DDP workers x {t.cpus_per_worker:g} CPU{' + 1 GPU' if t.use_gpu else ''}, "
        f"{t.epochs} epochs, batch {t.batch_size}; defaults alpha={d.alpha} beta={d.beta} gamma={d.gamma} "
        f"delta={d.delta} T={d.temperature} layers={d.align_layers}",
        f"  tracking  {redact(resolve_tracking_uri(cfg.tracking))} (experiment {cfg.tracking.experiment!r})",
    ]
    return "\n".join(lines)


def load_models(cfg, labels: list[str]) -> dict:
    """Teacher, assistant and student through the normal loaders, checked for one tokenization."""
    from tmad_ray.models.hf import build_student, check_tokenization, load_assistant, load_teacher
    from tmad_ray.models.toyzoo import ensure_toy_zoo

    ensure_toy_zoo(cfg)
    models = {"teacher": load_teacher(cfg.models.teacher.name),
              "assistant": load_assistant(cfg.models, cfg.data),
              "student": build_student(cfg.models.student, cfg.data, labels)}
    check_tokenization(models, cfg.data)
    return models


def prepare_study(cfg):
    """Data cached once (bad fraction checked), every model loaded and, with ``distill.cache_targets``,
    the frozen models' targets computed once: (manifest, report, models)."""
    from tmad_ray.data.pipeline import check_bad_fraction

    manifest, report = prepare_data(cfg)
    check_bad_fraction(report, cfg.data.max_bad_fraction)
    models = load_models(cfg, manifest.labels)
    if cfg.distill.cache_targets:
        from tmad_ray.distill.targets import build_target_cache

        stats = build_target_cache(cfg, report, {"teacher": models["teacher"], "assistant": models["assistant"]},
                                   models["student"].config.num_hidden_layers, manifest.labels,
                                   workers=cfg.train.num_workers)
        report.targets_key = stats["key"]
    return manifest, report, models


def describe_models(models: dict) -> str:
    lines = []
    for role, m in models.items():
        c = m.config
        head = f"{c.num_labels} classes" if hasattr(m, "classifier") else "no classifier (features only)"
        lines.append(f"  {role:<9} {type(m).__name__}: {c.num_hidden_layers} blocks x {c.hidden_size} wide, "
                     f"{c.num_attention_heads} heads, {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, "
                     f"{head}")
    return "\n".join(lines)


def quiet_libraries() -> None:
    """What ``python tune.py`` prints is the plan, Tune's table and the results. The libraries' info
    logs, progress bars and deprecation notes stay out (``--verbose`` keeps them); the workers'
    output stays in Ray's logs (``log_to_driver=False``)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic", "ray", "ray.data", "ray.tune", "ray.train", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_tune(args) -> int:
    """The search: data cached once, then Tune + Optuna trials of Ray Train runs, tracked in MLflow."""
    from tmad_ray.cluster import init_ray, local_trials
    from tmad_ray.search.tuner import (TRIAL_CPU, StudyInterrupted, check_layer_sets, mlflow_ui_command, run_study,
                                       runs_url)
    from tmad_ray.tracking import check_tracking_store, resolve_tracking_uri

    resume = args.resume
    if isinstance(resume, str) and "=" in resume:  # `--resume key=value`: an override, not a study name
        args.overrides, resume = [resume, *args.overrides], True
    cfg = load_config(args.config, args.overrides)  # config errors stop here, before Ray starts
    check_tracking_store(resolve_tracking_uri(cfg.tracking))  # a dead server: seconds, not minutes after preparing
    if not args.verbose:
        quiet_libraries()
    # the cluster of `ray job submit`, else a local Ray
    resources = init_ray(cfg, local_trials(cfg), per_run_extra=TRIAL_CPU, worker_logs=args.verbose)
    if not args.verbose:
        quiet_libraries()  # again: Ray Data and Tune set their loggers' levels when they start
    from tmad_ray.distill.trimodel import token_grid

    manifest, report, models = prepare_study(cfg)
    check_layer_sets(cfg, models["student"].config.num_hidden_layers, token_grid(models["student"].config))
    print(search_plan(cfg, manifest, report))
    print(describe_models(models))
    if not args.verbose:
        print("  logs      the trials' own output: Ray's logs (/tmp/ray/session_latest/logs on each node; "
              "--verbose shows it here)")
    del models
    try:
        out = run_study(cfg, manifest, report, resources, resume=resume)
    except StudyInterrupted as e:
        again = (["--config", args.config] if args.config else []) + list(args.overrides)
        print(f"\ninterrupted: {e}\ncontinue it with: python tune.py {shlex.join(again + ['--resume', e.study])}",
              file=sys.stderr)
        return e.exit_code
    from tmad_ray.search.tuner import results_table, startup_summary

    print(f"\nstudy {out.name}: {len(out.rows)} trials")
    print(results_table(out.rows, cfg.search.metric))
    if out.best is None:
        print("no trial reported a result", file=sys.stderr)
        return 1
    b = out.best
    print(f"\nbest: trial #{b.get('trial_number')} ({b['trial']})  {cfg.search.metric} {b[cfg.search.metric]:.3f}  alpha={b['alpha']:.3g} "
          f"beta={b['beta']:.3g} gamma={b['gamma']:.3g} delta={b['delta']:.3g} T={b['temperature']:.2f} "
          f"layers={b['align_layers']}" + (f" lr={b['lr']:.3g}" if "lr" in b else ""))
    if out.pareto:
        from tmad_ray.search.tuner import objective_modes, pareto_table

        print("\nPareto front:\n" + pareto_table(out.pareto, objective_modes(cfg)[0]))
    startup = startup_summary(Path(cfg.storage.output_dir) / out.name / "trials")
    if startup:
        print(startup)
    print(f"best student: {out.best_student}")
    if out.model_version:
        name = cfg.tracking.registered_model
        print(f"registered: models:/{name}/{out.model_version} (alias models:/{name}@champion), an MLflow pyfunc "
              f"model: mlflow.pyfunc.load_model('models:/{name}@champion').predict(['video.mp4'])")
    print(f"MLflow parent run {out.parent_run_id}; open the UI with: {mlflow_ui_command(out.tracking_uri)}")
    print(f"  then: {runs_url(out.tracking_uri, out.experiment_id, cfg.search.metric, cfg.search.mode)}")
    return 0


def cmd_train(args) -> int:
    """One distillation run without search: prepare data and models, train on Ray Train, export."""
    import time

    from tmad_ray.cluster import init_ray
    from tmad_ray.train.loop import epoch_row
    from tmad_ray.train.run import fit

    cfg = load_config(args.config, args.overrides)
    name = args.name or f"{cfg.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(cfg)  # the cluster of `ray job submit`, else a local Ray sized for the run
    manifest, report, models = prepare_study(cfg)
    print(describe_models(models))
    del models
    outcome = fit(cfg, manifest, report, name)
    history = epoch_history(Path(cfg.storage.output_dir) / name / "train_log.jsonl")
    print(f"\nrun {name} ({cfg.train.num_workers} workers):")
    print("\n".join(epoch_row(m, header=i == 0) for i, m in enumerate(history)))
    best = outcome.best_metrics
    print(f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.3f}, macro-F1 {best['val_macro_f1']:.3f}")
    print(f"exported student: {outcome.student_dir}")
    print(f"evaluate it: tmad-ray eval {outcome.student_dir} --data {cfg.data.root} --split test")
    return 0


def epoch_history(log_path: Path) -> list[dict]:
    """The last record of each epoch in a run's log (an epoch redone after a restart counts once)."""
    by_epoch = {}
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "epoch_end":
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def cmd_eval(args) -> int:
    from tmad_ray.train.evaluate import evaluate_exported

    clips, crops = (int(v) for v in args.views.lower().split("x")) if args.views else (None, None)
    try:
        r = evaluate_exported(args.model_dir, args.data, args.split, clips, crops, args.label_mode, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['model']} on {r['root']} [{r['split']}], {r['videos']} videos, {r['views']} views each"
          + (f", {len(r['bad'])} bad skipped" if r["bad"] else ""))
    print(f"accuracy {r['accuracy']:.3f}   macro-F1 {r['macro_f1']:.3f}")
    for label, acc in r["per_class"].items():
        print(f"  {label:<12} {'-' if acc is None else f'{acc:.3f}'}")
    print(f"confusion matrix: {r['confusion_png']}")
    return 0


def cmd_bench_data(args) -> int:
    from tmad_ray.bench.data import run_data_bench

    cfg = load_config(args.config, args.overrides)
    run_data_bench(cfg, out=args.out, videos_per_class=args.videos_per_class, size=args.size,
                   frames=args.frames)
    return 0


def cmd_bench_step(args) -> int:
    from tmad_ray.bench.step import run_step_bench

    cfg = load_config(args.config, args.overrides)
    ks = [int(k) for k in args.attn_layers.split(",")] if args.attn_layers else None
    run_step_bench(cfg, out=args.out, steps=args.steps, warmup=args.warmup, attn_ks=ks, threads=args.threads)
    return 0


def cmd_bench_quality(args) -> int:
    from tmad_ray.bench.quality import run_quality_bench

    cfg = load_config(args.config, args.overrides)
    seeds = [int(x) for x in args.seeds.split(",")]
    variants = args.variants.split(",") if args.variants else None
    try:
        run_quality_bench(cfg, out=args.out, seeds=seeds, recipe=args.recipe, variants=variants)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_search(args) -> int:
    from tmad_ray.bench.search import run_search_bench

    cfg = load_config(args.config, args.overrides)
    run_search_bench(cfg, out=args.out, trials=args.trials, epochs=args.epochs)
    return 0


def cmd_bench_ttq(args) -> int:
    from tmad_ray.bench.time_to_quality import run_ttq_bench

    cfg = load_config(args.config, args.overrides)
    run_ttq_bench(cfg, out=args.out, seeds=[int(x) for x in args.seeds.split(",")])
    return 0


def cmd_bench_startup(args) -> int:
    from tmad_ray.bench.startup import run_startup_bench

    run_startup_bench(args.out, trials=args.trials)
    return 0


def cmd_bench_gpu(args) -> int:
    from tmad_ray.bench.gpu import run_gpu_bench

    run_gpu_bench(args.out, tiny=args.tiny, batch=args.batch, steps=args.steps)
    return 0


def cmd_rehearse(args) -> int:
    from tmad_ray.bench.rehearse import run_rehearsal

    run_rehearsal(args.out, work=args.dir, tiny=args.tiny, trials=args.trials)
    return 0


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
        print("error: the config has no models.toy_zoo section (the toy zoo is for the embedded default)",
              file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmad-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the embedded synthetic dataset (real H.264 MP4s)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos-per-class", type=int, default=24)
    p.add_argument("--size", default="64", help="frame size: 64 or HxW such as 240x320")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_synth)

    data = sub.add_parser("data", help="check a dataset or fill the clip cache").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("check", help="validate ROOT: every problem with file, line and reason")
    p.add_argument("root")
    p.add_argument("--json", action="store_true")
    _config_args(p)
    p.set_defaults(fn=cmd_data_check)
    p = data.add_parser("cache", help="decode the dataset of a config into the clip cache (once)")
    p.add_argument("--json", action="store_true")
    _config_args(p)
    p.set_defaults(fn=cmd_data_cache)

    p = sub.add_parser("zoo", help="train the toy teacher and assistant of the embedded default")
    p.add_argument("--out", default=None, help="directory (default: models.toy_zoo.dir of the config)")
    _config_args(p)
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

    p = sub.add_parser("tune", help="the search (same as python tune.py)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="STUDY",
                   help="continue the latest study of this config (or STUDY) after the driver died")
    p.add_argument("--verbose", action="store_true",
                   help="show the output of Ray's workers and the libraries' info logs here too")
    _config_args(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("train", help="one distillation run on Ray Train (no search); exports the best student")
    p.add_argument("--name", default=None, help="run name; an existing run of this name resumes")
    _config_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="multi-view evaluation of an exported student")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True, help="dataset ROOT")
    p.add_argument("--split", default="test")
    p.add_argument("--views", default=None, help="CxK: clips x crops per video (default: as trained)")
    p.add_argument("--label-mode", default=None, choices=["as_is", "first", "binary"])
    p.add_argument("--out", default=None, help="directory for confusion.png (default: MODEL_DIR/eval_SPLIT)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks (results as JSON)").add_subparsers(dest="bench_cmd", required=True)
    p = bench.add_parser("data", help="clips/s: per-step decode vs Ray Data decode vs clip cache")
    p.add_argument("--out", default="bench/data.json")
    p.add_argument("--videos-per-class", type=int, default=24)
    p.add_argument("--size", default="240x320")
    p.add_argument("--frames", type=int, default=64)
    _config_args(p)
    p.set_defaults(fn=cmd_bench_data)
    p = bench.add_parser("step", help="training step time and peak memory: student, tri-model, attention variants")
    p.add_argument("--out", default="bench/step.json")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn-layers", default=None, help="k values for attention at k layers, e.g. 1,2,4")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    _config_args(p)
    p.set_defaults(fn=cmd_bench_step)
    p = bench.add_parser("search", help="trials/hour of the system vs the reference framework's way, same trials")
    p.add_argument("--out", default="bench/search.json")
    p.add_argument("--trials", type=int, default=None, help="trials (default: the config's search.num_samples)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the config's)")
    _config_args(p)
    p.set_defaults(fn=cmd_bench_search)
    p = bench.add_parser("time-to-quality", help="best val accuracy against wall time and test accuracy of the "
                         "chosen recipe: tune.py vs the seed's way, same recipes, several seeds")
    p.add_argument("--out", default="bench/time_to_quality.json")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated search and training seeds")
    _config_args(p, "experiments/time_to_quality.yaml")
    p.set_defaults(fn=cmd_bench_ttq)
    p = bench.add_parser("startup", help="the floor under a trial's start-up: empty Ray Train trials under Ray's "
                         "defaults and under the search's settings, and the imports a fresh process pays")
    p.add_argument("--out", default="bench/startup.json")
    p.add_argument("--trials", type=int, default=4, help="empty trials per variant")
    p.set_defaults(fn=cmd_bench_startup)
    p = bench.add_parser("gpu", help="tri-model step at real sizes on one GPU: clips/s and MFU (--tiny: CPU)")
    p.add_argument("--out", default="bench/gpu.json")
    p.add_argument("--tiny", action="store_true", help="toy sizes, runs on CPU (what the tests run)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(fn=cmd_bench_gpu)
    p = sub.add_parser("rehearse", help="the xd_violence path end to end at real shapes (12 videos, 2 trials, 1 epoch)")
    p.add_argument("--out", default="bench/rehearse.json")
    p.add_argument("--dir", default="rehearse", help="working directory (data, models, caches, MLflow, outputs)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (what the tests run)")
    p.add_argument("--trials", type=int, default=2)
    p.set_defaults(fn=cmd_rehearse)
    p = bench.add_parser("quality", help="test accuracy: CE-only vs the searched distillation vs each term off")
    p.add_argument("--out", default="bench/quality.json")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipe", default="searched",
                   help="'searched' (the latest study's best.json), a best.json path, or 'config'")
    p.add_argument("--variants", default=None, help="subset, e.g. ce_only,distilled")
    _config_args(p)
    p.set_defaults(fn=cmd_bench_quality)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. What the user can fix comes out as one line (``error: ...``, exit 2; 1 for a
    download or a service that failed); a traceback only with ``--debug`` or ``TMAD_RAY_DEBUG=1``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TMAD_RAY_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # Overrides may come after options (`data check ROOT --json data.x=1`): collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split()) if len(str(e).splitlines()) == 1 else e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a failure nobody foresaw: still one line unless asked
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first}\n(run again with --debug, or TMAD_RAY_DEBUG=1, for the "
              "traceback)", file=sys.stderr)
        return 1

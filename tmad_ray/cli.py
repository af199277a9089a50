"""``tmad-ray`` subcommands (also ``python -m tmad_ray``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from tmad_ray import recipe
from tmad_ray.bench.cli import add_bench_commands
from tmad_ray.config import load_config
from tmad_ray.errors import UserError
from tmad_ray.models.cli import add_model_commands


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
        if not args.json:
            raise
        # --json promises one JSON document on stdout, whatever is wrong
        print(json.dumps({"ok": False, "root": args.root, "videos": 0,
                          "problems": [{"path": args.root, "line": None, "file": None, "reason": str(e)}]}))
        return 1
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_data_cache(args) -> int:
    from tmad_ray.data.pipeline import check_bad_fraction
    from tmad_ray.study import prepare_data

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
    check_bad_fraction(report, cfg.data.max_bad_fraction)  # too many bad videos: `error: ...`
    return 0


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
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we did


def cmd_tune(args) -> int:
    """The search: data cached once, then Tune + Optuna trials of Ray Train runs, tracked in MLflow."""
    from tmad_ray.cluster import init_ray, local_trials
    from tmad_ray.distill.trimodel import token_grid
    from tmad_ray.preflight import check_cluster
    from tmad_ray.search.driver import StudyInterrupted, check_layer_sets, run_study
    from tmad_ray.search.trial import TRIAL_CPU
    from tmad_ray.study import describe_models, prepare_study, search_plan
    from tmad_ray.tracking import check_tracking_store, resolve_tracking_uri

    resume = args.resume
    if isinstance(resume, str) and "=" in resume:  # `--resume key=value`: an override, not a study name
        args.overrides, resume = [resume, *args.overrides], True
    cfg = load_config(args.config, args.overrides)  # config errors stop here, before Ray starts
    if resume:  # the study's own config; a command line that says otherwise is refused
        from tmad_ray.search.driver import StudyError, study_name
        from tmad_ray.search.state import resumed_config
        from tmad_ray.storage import Storage

        resume, _ = study_name(cfg, resume)
        cfg, finished = resumed_config(cfg, Storage(cfg.storage.ray_results), resume, bool(args.overrides),
                                       StudyError)
        if finished:
            print(f"study {resume} has finished ({finished}): nothing to resume; its results are in "
                  f"{Path(cfg.storage.output_dir) / resume}. Start a new study without --resume.")
            return 0
    check_tracking_store(resolve_tracking_uri(cfg.tracking))  # a dead server: seconds, not minutes after preparing
    if not args.verbose:
        quiet_libraries()
    # the cluster of `ray job submit`, else a local Ray
    resources = init_ray(cfg, local_trials(cfg), per_run_extra=TRIAL_CPU, worker_logs=args.verbose)
    if not args.verbose:
        quiet_libraries()  # again: Ray Data and Tune set their loggers' levels when they start
    check_cluster(cfg, resolve_tracking_uri(cfg.tracking))  # several nodes: shared paths, a server (else rc 2)

    manifest, report, models = prepare_study(cfg, quiet=not args.verbose)
    check_layer_sets(cfg, models["student"].config.num_hidden_layers, token_grid(models["student"].config))
    print(search_plan(cfg, manifest, report))
    print(describe_models(models))
    if not args.verbose:
        print("  logs      the trials' own output: Ray's logs (/tmp/ray/session_latest/logs on each node; "
              "--verbose shows it here)")
    del models
    try:
        out = run_study(cfg, manifest, report, resources, resume=resume)
    except StudyInterrupted as e:  # not an error line: how to go on
        again = (["--config", args.config] if args.config else []) + list(args.overrides)
        print(f"\ninterrupted: {e}\ncontinue it with: python tune.py {shlex.join(again + ['--resume', e.study])}",
              file=sys.stderr)
        return e.exit_code
    return print_study(cfg, out)


def print_study(cfg, out) -> int:
    """The end of ``python tune.py``: the trials, the best, where the student and the runs are."""
    from tmad_ray.search.results import (mlflow_ui_command, objective_modes, pareto_table, results_table, runs_url,
                                         startup_summary)

    metric = cfg.search.metric
    print(f"\nstudy {out.name}: {len(out.rows)} trials")
    print(results_table(out.rows, metric))
    if out.best is None:
        print("no trial reported a result", file=sys.stderr)
        return 1
    b = out.best
    print(f"\nbest: trial #{b.get('trial_number')} ({b['trial']})  {metric} {b[metric]:.3f}  {recipe.short(b)}")
    if b.get(f"{metric}_mean") is not None:
        print(f"  its recipe's mean {metric} over {len(b[f'{metric}_runs'])} training seeds: {b[f'{metric}_mean']:.3f} "
              f"(the student of its best run is exported)")
    if out.pareto:
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
    print(f"  then: {runs_url(out.tracking_uri, out.experiment_id, metric, cfg.search.mode)}")
    return errored_trials(out.rows)


def errored_trials(rows: list[dict]) -> int:
    """A line per trial that failed (the rest of the study stands), and the exit status: 1 if any did."""
    failed = [r for r in rows if r["status"] == "ERROR"]
    for r in failed:
        print(f"error: trial #{r.get('trial_number')} ({r['trial']}) failed: {r.get('error') or 'no message'} "
              f"(its traceback: Tune's error.txt under the study's Ray results)", file=sys.stderr)
    return 1 if failed else 0


def cmd_train(args) -> int:
    """One distillation run without search: prepare data and models, train on Ray Train, export."""
    import time

    from tmad_ray.cluster import init_ray
    from tmad_ray.preflight import check_cluster
    from tmad_ray.study import describe_models, prepare_study
    from tmad_ray.tracking import resolve_tracking_uri
    from tmad_ray.train.metrics import epoch_row
    from tmad_ray.train.run import epoch_history, fit

    cfg = load_config(args.config, args.overrides)
    name = args.name or f"{cfg.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    # no "Loading weights" / "Writing model shards" bars from the workers: set before Ray starts them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    init_ray(cfg)  # the cluster of `ray job submit`, else a local Ray sized for the run
    check_cluster(cfg, resolve_tracking_uri(cfg.tracking))  # several nodes: every path shared (else rc 2)
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


def cmd_eval(args) -> int:
    from tmad_ray.train.evaluate import evaluate_exported

    clips, crops = (int(v) for v in args.views.lower().split("x")) if args.views else (None, None)
    r = evaluate_exported(args.model_dir, args.data, args.split, clips, crops, args.label_mode, args.out)
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


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order ``--help`` lists them.

    Long on purpose: one ``add_parser`` block per subcommand reads as the command line's reference;
    the models' and benchmarks' subcommands are added by their own packages."""
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

    add_model_commands(sub, _config_args)

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

    add_bench_commands(sub, _config_args)
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
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (what the user can fix, or a bug: one line either way)
        if debug:
            raise
        return print_error(e)


def print_error(e: Exception) -> int:
    """One line for ``e``, unwrapped through Ray's wrappers to its root cause; an unforeseen failure
    also leaves its whole traceback in a log file whose path is printed. Returns the exit status."""
    import tempfile
    import traceback

    from tmad_ray.errors import cause_chain, environment_problem

    chain = cause_chain(e)
    cause = chain[-1]
    known = cause if isinstance(cause, UserError) else environment_problem(cause)
    if known is not None:
        print(f"error: {' '.join(str(known).split()) if len(str(known).splitlines()) == 1 else known}",
              file=sys.stderr)
        return known.exit_code
    log = Path(tempfile.gettempdir()) / "tmad_ray" / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # the driver's traceback, then each wrapped failure as Ray reports it (with the worker's traceback)
    log.write_text("".join(traceback.format_exception(e)) + "".join(
        f"\n--- caused by {type(c).__name__}:\n{''.join(traceback.format_exception(c))}" for c in chain[1:]))
    text = " ".join(str(cause).split())[:300]
    where = f" ({type(e).__name__})" if cause is not e else ""
    print(f"error: {type(cause).__name__}: {text}{where}\nthe whole traceback: {log} (or run again with --debug)",
          file=sys.stderr)
    return 1

"""The ``tmad-ray bench ...`` and ``tmad-ray rehearse`` subcommands: arguments, then the benchmark."""

from __future__ import annotations

from tmad_ray.config import load_config


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

    if args.resummarize:
        from tmad_ray.bench.quality import resummarize

        resummarize(args.out)
        return 0
    cfg = load_config(args.config, args.overrides)
    seeds = [int(x) for x in args.seeds.split(",")]
    variants = args.variants.split(",") if args.variants else None
    run_quality_bench(cfg, out=args.out, seeds=seeds, recipe=args.recipe, variants=variants, parallel=args.parallel)
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


def cmd_bench_peer(args) -> int:
    from tmad_ray.bench.peer import run_peer_bench

    cfg = load_config(args.config, args.overrides)
    run_peer_bench(cfg, out=args.out, seeds=[int(x) for x in args.seeds.split(",")])
    return 0


def cmd_bench_grace(args) -> int:
    from tmad_ray.bench.grace import run_grace_bench

    run_grace_bench(args.runs, out=args.out, reduction_factor=args.reduction_factor)
    return 0


def cmd_bench_startup(args) -> int:
    from tmad_ray.bench.startup import run_startup_bench

    run_startup_bench(args.out, trials=args.trials)
    return 0


def cmd_bench_gpu(args) -> int:
    from tmad_ray.bench.gpu import run_gpu_bench

    run_gpu_bench(args.out, tiny=args.tiny, batch=args.batch, steps=args.steps)
    return 0


def cmd_bench_cohort(args) -> int:
    from tmad_ray.bench.cohort import run_cohort_bench

    cfg = load_config(args.config, args.overrides)
    run_cohort_bench(cfg, out=args.out, steps=args.steps, rehearsal_steps=args.rehearsal_steps, threads=args.threads)
    return 0


def cmd_rehearse(args) -> int:
    from tmad_ray.bench.rehearse import run_rehearsal

    run_rehearsal(args.out, work=args.dir, tiny=args.tiny, trials=args.trials)
    return 0


def add_bench_commands(sub, config_args) -> None:
    """``bench`` (data, step, search, cohort, time-to-quality, peer, startup, gpu, quality) and ``rehearse`` on the
    top-level subparsers ``sub``; ``config_args(parser, default)`` adds ``--config`` and overrides."""
    bench = sub.add_parser("bench", help="benchmarks (results as JSON)").add_subparsers(dest="bench_cmd", required=True)
    p = bench.add_parser("data", help="clips/s: per-step decode vs Ray Data decode vs clip cache")
    p.add_argument("--out", default="bench/data.json")
    p.add_argument("--videos-per-class", type=int, default=24)
    p.add_argument("--size", default="240x320")
    p.add_argument("--frames", type=int, default=64)
    config_args(p)
    p.set_defaults(fn=cmd_bench_data)
    p = bench.add_parser("step", help="training step time and peak memory: student, tri-model, attention variants")
    p.add_argument("--out", default="bench/step.json")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn-layers", default=None, help="k values for attention at k layers, e.g. 1,2,4")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    config_args(p)
    p.set_defaults(fn=cmd_bench_step)
    p = bench.add_parser("search", help="trials/hour of the system vs the reference framework's way, same trials")
    p.add_argument("--out", default="bench/search.json")
    p.add_argument("--trials", type=int, default=None, help="trials (default: the config's search.num_samples)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the config's)")
    config_args(p)
    p.set_defaults(fn=cmd_bench_search)
    add_proof_commands(bench, config_args)
    p = bench.add_parser("startup", help="the floor under a trial's start-up: empty Ray Train trials under Ray's "
                         "defaults and under the search's settings, and the imports a fresh process pays")
    p.add_argument("--out", default="bench/startup.json")
    p.add_argument("--trials", type=int, default=4, help="empty trials per variant")
    p.set_defaults(fn=cmd_bench_startup)
    p = bench.add_parser("cohort", help="a cohort's training step at K = 1, 2, 4, 8 students: time per student, "
                         "the frozen forwards' share, peak memory, students/hour (embedded and rehearsal shapes)")
    p.add_argument("--out", default="bench/cohort.json")
    p.add_argument("--steps", type=int, default=5, help="timed steps at the embedded default's shapes")
    p.add_argument("--rehearsal-steps", type=int, default=2, help="timed steps at the rehearsal's shapes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    config_args(p)
    p.set_defaults(fn=cmd_bench_cohort)
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


def add_proof_commands(bench, config_args) -> None:
    """The benchmarks that compare whole pipelines (``quality``, ``time-to-quality``, ``peer``) and what
    the quality runs tell about early stopping (``grace``)."""
    p = bench.add_parser("quality", help="test accuracy with 95 %% CIs: the searched recipe vs CE-only fine-tuning, "
                                         "the reference framework's defaults, logit KD and one ablation per term")
    p.add_argument("--out", default="bench/quality.json")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--recipe", default="searched",
                   help="'searched' (the latest study of the config: its best.json), a best.json path, or 'config'")
    p.add_argument("--variants", default=None, help="subset, e.g. searched,reference_default (ce_only is always run); the training "
                        "set-up ablations reference_decay_all and reference_view_pool run only when named")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs side by side (default: as many as a study's trials here)")
    p.add_argument("--resummarize", action="store_true", help="recompute the statistics of --out from its runs")
    config_args(p, "experiments/quality.yaml")
    p.set_defaults(fn=cmd_bench_quality)
    p = bench.add_parser("time-to-quality", help="best val accuracy against wall time and test accuracy of the "
                         "chosen recipe: tune.py vs the seed's way, same recipes, several seeds")
    p.add_argument("--out", default="bench/time_to_quality.json")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated search and training seeds")
    config_args(p, "experiments/time_to_quality.yaml")
    p.set_defaults(fn=cmd_bench_ttq)
    p = bench.add_parser("peer", help="tune.py against a plain HF Trainer + Optuna pipeline on the same recipes, "
                         "models and losses: time to first reach fixed val accuracies, per-recipe parity, test")
    p.add_argument("--out", default="bench/peer.json")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated search and training seeds")
    config_args(p, "experiments/default.yaml")
    p.set_defaults(fn=cmd_bench_peer)
    p = bench.add_parser("grace", help="from runs trained to the end (the quality benchmark's): the earliest "
                         "epoch at which an ASHA cut keeps the eventual best recipe")
    p.add_argument("--runs", required=True, help="a glob of run directories, e.g. 'outputs/quality-quality-<stamp>-*'")
    p.add_argument("--reduction-factor", type=float, default=2.0)
    p.add_argument("--out", default="bench/grace.json")
    p.set_defaults(fn=cmd_bench_grace)

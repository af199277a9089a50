"""``tmad-ray bench startup``: the floor under a trial's start-up, with nothing of tmad_ray in it.

Each variant is a fresh local Ray in its own process (Ray's settings are read when it starts) that
runs Tune trials one at a time, each fitting a ``TorchTrainer`` whose loop only notes the time it
began: how long Ray Train takes from ``fit()`` to the workers' loop, and a whole empty trial from
one to the next, under Ray's defaults and under what the search sets. Plus the imports every
fresh process of a trial pays (measured each in a new interpreter).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from tmad_ray.bench import write_result

VARIANTS = {
    "ray_defaults_2_workers": {"workers": 2, "env": {}},
    "health_check_0.5s_2_workers": {"workers": 2, "env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}},
    "health_check_0.5s_1_worker": {"workers": 1, "env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}},
    "preload_torch_prestart_2_workers": {
        "workers": 2, "env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
        "system_config": {"preload_python_modules": ["torch", "ray.train.torch"], "enable_worker_prestart": True}},
}
MANAGED_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_worker_maximum_startup_concurrency")
IMPORTS = {"torch": "import torch", "ray.train.torch": "import ray.train.torch",
           "transformers VideoMAE": "import torch; from transformers import VideoMAEForVideoClassification",
           "mlflow": "import mlflow"}


def _empty_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"to_loop_s": time.time() - config["fit_at"]})


def _empty_trial(params: dict) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    TorchTrainer(_empty_loop, train_loop_config={"fit_at": time.time()},
                 scaling_config=ray.train.ScalingConfig(num_workers=params["workers"], resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"empty{params['i']}", storage_path=params["storage"],
                                                callbacks=[TuneReportCallback()])).fit()


def run_variant(name: str, trials: int) -> dict:
    """In this process: a fresh local Ray with the variant's settings, ``trials`` empty trials in a row."""
    import ray
    from ray import tune

    v = VARIANTS[name]
    for key in MANAGED_ENV:  # only what the variant names, whatever the calling shell (or init_ray) had set
        os.environ.pop(key, None)
    os.environ.update(v["env"])
    storage = tempfile.mkdtemp(prefix="bench_startup_")
    ray.init(address="local", num_cpus=v["workers"] + 2, include_dashboard=False, log_to_driver=False,
             _system_config=v.get("system_config"))
    time.sleep(3)  # Ray's own start-up settles
    t0 = time.perf_counter()
    grid = tune.Tuner(tune.with_resources(_empty_trial, {"CPU": 1}),
                      param_space={"i": tune.grid_search(list(range(trials))), "workers": v["workers"],
                                   "storage": storage},
                      tune_config=tune.TuneConfig(max_concurrent_trials=1),
                      run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
    wall = time.perf_counter() - t0
    ray.shutdown()
    to_loop = [r.metrics["to_loop_s"] for r in grid]
    return {"to_loop_s": to_loop, "to_loop_median_s": statistics.median(to_loop), "trial_wall_s": wall / trials}


def import_seconds(statement: str, repeats: int = 3) -> float:
    """Median wall seconds of a fresh interpreter running ``statement`` (the interpreter's own start removed)."""
    def once(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - t
    bare = statistics.median(once("pass") for _ in range(repeats))
    return statistics.median(once(statement) for _ in range(repeats)) - bare


def run_startup_bench(out: str, trials: int = 4, variants: list[str] | None = None, say=print,
                      import_repeats: int = 3) -> dict:
    results = {}
    for name in variants or list(VARIANTS):
        r = subprocess.run([sys.executable, "-m", "tmad_ray.bench.startup", name, str(trials)], capture_output=True,
                           text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"startup bench variant {name} failed:\n{r.stderr[-3000:]}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        say(f"  {name}: Ray Train fit -> loop {results[name]['to_loop_median_s']:.1f} s (median), "
            f"{results[name]['trial_wall_s']:.1f} s a trial")
    imports = {k: import_seconds(v, import_repeats) for k, v in IMPORTS.items()}
    result = {"benchmark": "startup", "trials_per_variant": trials, "variants": results, "imports_s": imports,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    lines = [f"empty trials (a TorchTrainer whose loop does nothing), {r['trials_per_variant']} in a row per variant, "
             f"one at a time; {r['machine']['cpus']} CPUs",
             "| variant | Ray Train fit() -> loop, median (per trial) | whole empty trial |",
             "|---|---|---:|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['to_loop_median_s']:.1f} s ({', '.join(f'{x:.1f}' for x in v['to_loop_s'])}) | "
                     f"{v['trial_wall_s']:.1f} s |")
    lines += ["", "| import in a fresh process | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["imports_s"].items()]
    return "\n".join(lines)


if __name__ == "__main__":  # one variant, in a process of its own: its result as the last line
    print(json.dumps(run_variant(sys.argv[1], int(sys.argv[2]))))

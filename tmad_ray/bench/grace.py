"""``tmad-ray bench grace``: when can early stopping judge a trial without cutting the eventual winner?

Reads runs that trained every epoch (the quality benchmark's: every recipe at every seed, to the last
epoch, validated each epoch) and asks, for each candidate grace period g: had a successive-halving
cut (ASHA's, with ``search.reduction_factor``) judged these recipes by their best val accuracy up to
epoch g, would the recipe that is best at the end have survived? Per g, over the seeds:

* ``winner_survives``: the fraction of seeds where the final winner is in the kept top 1/rf at g
  (ties with the cut-off value survive, as ASHA keeps them);
* ``rank_correlation``: the mean Spearman correlation between the recipes' best-so-far at g and
  their final best.

The recommended grace is the first epoch from which the winner survives on every seed. This is
the synchronous form of the cut; ASHA's asynchronous rungs compare a trial with those that reached
the rung before it, which with a handful of trials is no kinder.
"""

from __future__ import annotations

import glob
import math
import re
import statistics
from pathlib import Path

from tmad_ray.bench import write_result

RUN_NAME = re.compile(r"-(?P<recipe>[a-z_]+)-s(?P<seed>\d+)$")


def load_histories(run_dirs: list[Path]) -> dict[int, dict[str, list[float]]]:
    """``{seed: {recipe: [val accuracy of epoch 1, 2, ...]}}`` from ``<run>/train_log.jsonl``, the
    run named ``...-<recipe>-s<seed>`` (the quality benchmark's names)."""
    from tmad_ray.train.run import epoch_history

    out: dict[int, dict[str, list[float]]] = {}
    for d in run_dirs:
        m = RUN_NAME.search(d.name)
        log = d / "train_log.jsonl"
        if m is None or not log.is_file():
            continue
        vals = [e["val_accuracy"] for e in epoch_history(log)]
        if vals:
            out.setdefault(int(m["seed"]), {})[m["recipe"]] = vals
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return None if den == 0 else num / den


def grace_table(histories: dict[int, dict[str, list[float]]], reduction_factor: float = 2.0) -> list[dict]:
    """One row per candidate grace g (1 .. the shortest run's last epoch - 1)."""
    epochs = min(len(v) for runs in histories.values() for v in runs.values())
    rows = []
    for g in range(1, epochs):
        survives, rhos = [], []
        for runs in histories.values():
            names = sorted(runs)
            final = [max(runs[n][:epochs]) for n in names]
            at_g = [max(runs[n][:g]) for n in names]
            winner = max(range(len(names)), key=lambda i: final[i])
            keep = max(1, math.ceil(len(names) / reduction_factor))
            cutoff = sorted(at_g, reverse=True)[keep - 1]
            survives.append(at_g[winner] >= cutoff)
            rho = spearman(at_g, final)
            if rho is not None:
                rhos.append(rho)
        rows.append({"grace": g, "winner_survives": sum(survives) / len(survives),
                     "rank_correlation": statistics.mean(rhos) if rhos else None})
    return rows


def recommended(rows: list[dict]) -> int | None:
    """The first grace from which the winner survives on every seed, at every later grace too."""
    for i, row in enumerate(rows):
        if all(r["winner_survives"] == 1.0 for r in rows[i:]):
            return row["grace"]
    return None


def run_grace_bench(run_glob: str, out: str, reduction_factor: float = 2.0) -> dict:
    """The grace table of the runs whose directories match ``run_glob``, as JSON at ``out``."""
    dirs = [Path(p) for p in sorted(glob.glob(run_glob))]
    histories = load_histories(dirs)
    if not histories:
        raise FileNotFoundError(f"no runs named ...-<recipe>-s<seed> with a train_log.jsonl match {run_glob!r}: "
                                "point --runs at a quality benchmark's run directories")
    rows = grace_table(histories, reduction_factor)
    result = {"benchmark": "grace", "runs": run_glob, "reduction_factor": reduction_factor,
              "seeds": sorted(histories), "recipes": sorted(next(iter(histories.values()))),
              "epochs": min(len(v) for r in histories.values() for v in r.values()),
              "rows": rows, "recommended_grace": recommended(rows), "histories": {str(k): v for k, v in histories.items()}}
    table = "\n".join(["| grace (epochs) | final winner survives the cut (share of seeds) | rank correlation with the end |",
                       "|---:|---:|---:|"] +
                      [f"| {r['grace']} | {r['winner_survives']:.2f} | "
                       f"{'-' if r['rank_correlation'] is None else format(r['rank_correlation'], '.2f')} |" for r in rows] +
                      ["", f"recommended grace: {result['recommended_grace']}"])
    return write_result(result, out, table)

"""Before a study exports a student: its best recipes trained again on more seeds, and the recipe
with the best mean wins.

Each trial of a study trains its recipe once, on one training seed (the new head's initialization,
the data order, the crops). On few labeled videos that seed moves the best val accuracy more than
the recipes differ: measured on ``experiments/quality.yaml``, one recipe scored 0.31 to 0.535 test
accuracy across five seeds, more than the gap between the study's top trials. Exporting the single
best trial then picks a lucky seed as often as a good recipe. With ``search.confirm_top_k: k`` and
``search.confirm_seeds: n`` the driver trains the ``k`` best finished trials' recipes ``n`` more
times (seeds ``train.seed + 1000·i``) after the search, ranks the recipes by the mean of
``search.metric`` over their ``n + 1`` runs, and exports the winner's best run.

The confirmation runs are ordinary Ray Train runs under the study (``<study>/train/confirm-…``),
each an MLflow child run of the study tagged with the trial it confirms; a ``--resume`` reuses
the ones that finished. Optuna does not learn from them: they come after the search.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tmad_ray import recipe, tracking

SEED_STEP = 1000  # confirmation seeds: train.seed + 1000, + 2000, ... (far from any study's own seed)
CONFIRM_TAG = "tmad.confirm_run"  # a confirmation run's name; its trial is in CONFIRMS_TAG
CONFIRMS_TAG = "tmad.confirms_trial"


@dataclass
class Candidate:
    """One of the study's best trials and every run of its recipe: ``runs`` maps a Train run's name
    (the trial's own id first) to its best value of ``search.metric`` (None: the run failed)."""

    row: dict
    runs: dict[str, float | None] = field(default_factory=dict)

    def values(self) -> list[float]:
        return [v for v in self.runs.values() if v is not None]

    def mean(self) -> float:
        return statistics.mean(self.values())


def pick(candidates: list[Candidate], mode: str) -> tuple[Candidate, str]:
    """The recipe with the best mean over its runs, and its best run (the one to export)."""
    sign = 1 if mode == "max" else -1
    best = max((c for c in candidates if c.values()), key=lambda c: sign * c.mean())
    run = max((n for n, v in best.runs.items() if v is not None), key=lambda n: sign * best.runs[n])
    return best, run


def top_trials(rows: list[dict], metric: str, mode: str, k: int) -> list[dict]:
    """The ``k`` best trials that trained every epoch (a trial ASHA stopped was judged early)."""
    done = [r for r in rows if r.get(metric) is not None and r["status"] == "COMPLETED"]
    return sorted(done, key=lambda r: r[metric], reverse=mode == "max")[:k]


def confirm_top(cfg, rows: list[dict], study, client, concurrent: int, say=print) -> tuple[dict, str] | None:
    """Train the study's top recipes on more seeds; returns the winning trial's row (with
    ``<metric>_runs`` and ``<metric>_mean``) and the name of the Train run to export. ``study`` is the
    ``StudyContext`` the trials ran with. None when no trial finished every epoch."""
    s = cfg.search
    top = top_trials(rows, s.metric, s.mode, s.confirm_top_k)
    if not top:
        return None
    seeds = [cfg.train.seed + SEED_STEP * i for i in range(1, s.confirm_seeds + 1)]
    say(f"confirming the {len(top)} best recipes on {len(seeds)} more training seed(s) each "
        f"({len(top) * len(seeds)} runs, up to {concurrent} at a time): the study exports the best mean")
    candidates = [Candidate(r, {r["trial"]: r[s.metric]}) for r in top]
    jobs = [(c, seed) for c in candidates for seed in seeds]
    with ThreadPoolExecutor(max(1, concurrent)) as pool:
        for (c, seed), (name, value) in zip(jobs, pool.map(lambda job: confirm_run(cfg, study, client, job[0].row,
                                                                                 job[1], say), jobs)):
            c.runs[name] = value
    for c in candidates:
        c.row[f"{s.metric}_runs"] = c.values()
        c.row[f"{s.metric}_mean"] = c.mean() if c.values() else None
    winner, run = pick(candidates, s.mode)
    say(confirm_table(candidates, s.metric))
    return winner.row, run


def confirm_run(cfg, study, client, row: dict, seed: int, say=print) -> tuple[str, float | None]:
    """One confirmation run (reused when a ``--resume`` finds it finished): its name and its best
    value of ``search.metric``, None if it failed (said on the screen and in MLflow)."""
    from tmad_ray.search.results import train_summary
    from tmad_ray.train.run import build_trainer, non_finite_loss

    name = f"confirm-{row['trial']}-s{seed}"
    best, ran = train_summary(cfg, study.name, name)
    if best is not None and ran >= cfg.train.epochs:
        return name, float(best[cfg.search.metric])
    run_cfg = recipe.apply(cfg, recipe.of(row))
    run_cfg.train.seed = seed
    run_id = open_confirm_run(client, study, name, row, seed)
    trainer = build_trainer(run_cfg, study.manifest, study.report, name,
                            log_path=str(Path(study.trials_dir) / name / "train_log.jsonl"),
                            mlflow_run={"experiment_id": study.experiment_id, "study": study.name, "trial": name,
                                        "run_id": run_id, "queue": study.queue},
                            storage_path=study.train_storage)
    try:
        trainer.fit()
        best, _ = train_summary(cfg, study.name, name)
        if (why := non_finite_loss(Path(study.trials_dir) / name / "train_log.jsonl")) is not None:
            raise RuntimeError(why)
        if best is None:
            raise RuntimeError("it reported no checkpoint")
    except Exception as e:  # noqa: BLE001 (one failed confirmation leaves the others' verdict standing)
        say(f"confirmation run {name} (trial #{row.get('trial_number')}, seed {seed}) failed: "
            f"{str(e).splitlines()[0][:200]}; its recipe is judged on its other runs")
        client.set_tag(run_id, "error", str(e)[:500])
        client.set_terminated(run_id, status="FAILED")
        return name, None
    value = float(best[cfg.search.metric])
    client.log_metric(run_id, f"best_{cfg.search.metric}", value)
    client.set_terminated(run_id, status="FINISHED")
    say(f"  trial #{row.get('trial_number')}'s recipe on seed {seed}: best {cfg.search.metric} {value:.3f} "
        f"(the trial itself: {row[cfg.search.metric]:.3f})")
    return name, value


def open_confirm_run(client, study, name: str, row: dict, seed: int) -> str:
    """The confirmation run's MLflow child run (the same one again after a ``--resume``), with the
    recipe's params and the seed."""
    for r in tracking.find_runs(client, study.experiment_id, **{CONFIRM_TAG: name, tracking.STUDY_TAG: study.name}):
        client.update_run(r.info.run_id, status="RUNNING")
        return r.info.run_id
    number = row.get("trial_number")
    run_id = client.create_run(study.experiment_id, run_name=f"#{number} confirm seed {seed}", tags={
        tracking.PARENT_TAG: study.parent_run_id, tracking.STUDY_TAG: study.name, CONFIRM_TAG: name,
        CONFIRMS_TAG: row["trial"], tracking.NOTE_TAG: f"Trial #{number}'s recipe of study `{study.name}` trained "
                                                       f"again on training seed {seed}"}).info.run_id
    tracking.log_params(client, run_id, {**recipe.mlflow_params(recipe.of(row)), "trial_number": number, "seed": seed})
    return run_id


def confirm_table(candidates: list[Candidate], metric: str) -> str:
    lines = [f"| # | trial | {metric} per run (the trial's first) | mean |", "|---|---|---|---:|"]
    for c in candidates:
        runs = ", ".join("failed" if v is None else f"{v:.3f}" for v in c.runs.values())
        mean = f"{c.mean():.3f}" if c.values() else "-"
        lines.append(f"| {c.row.get('trial_number')} | {c.row['trial']} | {runs} | {mean} |")
    return "\n".join(lines)


def confirm_run_ids(client, study, name: str) -> dict[str, str]:
    """The study's confirmation runs' MLflow run ids, by their Train run's name."""
    if study is None:
        return {}
    return {r.data.tags[CONFIRM_TAG]: r.info.run_id
            for r in tracking.find_runs(client, study.experiment_id, **{tracking.STUDY_TAG: name})
            if CONFIRM_TAG in r.data.tags}

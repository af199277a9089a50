"""Cohort trials (``search.cohort_size: K``): Tune's trials are students, trained K at a time in one run.

Tune, Optuna and ASHA see exactly what they see without cohorts: one trial per recipe, one result
per epoch, a trial stopped at its rung's cut. What changes is where a trial trains. Its function
(``trial.trial_fn``) opens its MLflow run as always, then joins the study's ``CohortHub`` (an actor
named after the study, like the MLflow queue) and relays what the hub hands it to ``tune.report``.

The hub groups the trials that join into cohorts of up to K (a cohort starts when K have joined, or
``search.cohort_wait_s`` after the last one joined, fewer then; at most as many cohorts at once as
the cluster has room for), and runs each cohort as one Ray Train run
(``train.cohort_loop.cohort_loop_per_worker``) from a task of its own. Rank 0 of the run hands each
student's epoch to the hub, which keeps it for that student's trial.

Stopping: when Tune ends a trial (ASHA's cut, or a failure), the driver's ``CohortWatch`` callback
tells the hub. Before its next epoch, rank 0 asks the hub which students are still wanted; the hub
waits until every student's trial has either come back for its next epoch (``tune.report`` returns
only when Tune wants one) or been ended, so a stopped student never trains an epoch more and the
cohort's compute shrinks with it. A cohort whose students have all stopped ends.

Faults: a worker failure restarts the run from its last checkpoint, every live student in it (a
report said twice reaches a trial once). ``--resume``: the hub writes which trials form which
cohort (``cohorts.json`` beside Tune's state); a restored trial joins the cohort it was in, whose
run then resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import time

from tmad_ray.storage import Storage

COHORTS_FILE = "cohorts.json"   # in the study's results directory: {cohort: [trial ids]}
WANTED_TIMEOUT_S = 600.0        # how long a cohort waits for Tune's word on a student before going on


def actor_name(study: str) -> str:
    return f"tmad-cohorts-{study}"


class CohortHub:
    """The study's cohorts: who is in which, each student's reports on their way to its trial."""

    def __init__(self, study, size: int, wait_s: float, max_cohorts: int, results_root: str):
        self.study, self.size, self.wait_s, self.max_cohorts = study, size, wait_s, max_cohorts
        self.results = Storage(results_root)
        saved = self.results.read_bytes(study.name, COHORTS_FILE)
        self.cohorts: dict[str, list[str]] = json.loads(saved) if saved else {}  # every cohort ever formed
        self.running: set[str] = set()
        self.pending: dict[str, dict] = {}      # trial -> recipe, joined and waiting for a cohort
        self.last_join = 0.0
        self.reports: dict[str, dict[int, dict]] = {}  # trial -> epoch -> its report
        self.asked: dict[str, int] = {}         # trial -> the last epoch it has seen (it asks for the next)
        self.ended: dict[str, str] = {}         # trial -> why Tune ended it
        self.over: dict[str, str | None] = {}   # trial -> None: its cohort's run ended; else its error
        self.changed: asyncio.Condition | None = None
        self.former: asyncio.Task | None = None

    async def _notify(self) -> None:
        async with self._cond():
            self.changed.notify_all()

    def _cond(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def _wait(self, predicate, timeout: float | None = None) -> bool:
        async with self._cond():
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
                return True
            except asyncio.TimeoutError:
                return False

    # ---- the trials
    async def join(self, trial: str, params: dict) -> None:
        """A trial that wants to train ``params`` (its recipe); it then asks ``next`` for its epochs."""
        self.pending[trial] = params
        self.reports.pop(trial, None)  # a trial Tune restarts begins again from its cohort's checkpoint
        self.over.pop(trial, None)
        self.ended.pop(trial, None)
        self.asked[trial] = 0
        self.last_join = time.monotonic()
        if self.former is None:
            self.former = asyncio.get_running_loop().create_task(self._form())
        await self._notify()

    async def next(self, trial: str, after: int) -> dict:
        """The trial's first report after epoch ``after`` (``{"metrics": ...}``), or ``{"end": None}``
        when its cohort's run ended without one, or ``{"end": why}`` when it failed."""
        self.asked[trial] = max(self.asked.get(trial, 0), after)
        await self._notify()

        def ready():
            return any(e > after for e in self.reports.get(trial, {})) or trial in self.over
        await self._wait(ready)
        later = sorted(e for e in self.reports.get(trial, {}) if e > after)
        if later:
            return {"metrics": self.reports[trial][later[0]]}
        return {"end": self.over[trial]}

    # ---- the cohorts' runs (rank 0)
    async def report(self, cohort: str, trial: str, metrics: dict) -> None:
        self.reports.setdefault(trial, {})[int(metrics["epoch"])] = metrics
        await self._notify()

    async def wanted(self, cohort: str, epoch: int, trials: list[str]) -> dict[str, str]:
        """Which of ``trials`` (live students) Tune ended, with why: after their report of ``epoch``,
        waiting until each has come back for more or been ended (or ``WANTED_TIMEOUT_S``, then it goes
        on); with ``epoch`` 0, those ended so far, at once."""
        def known():
            return all(self.asked.get(t, 0) >= epoch or t in self.ended for t in trials)
        await self._wait(known, WANTED_TIMEOUT_S)
        return {t: f"Tune ended its trial ({self.ended[t]})" for t in trials if t in self.ended}

    # ---- the driver
    async def trial_ended(self, trial: str, status: str) -> None:
        self.ended[trial] = status
        await self._notify()

    def snapshot(self) -> dict:
        return {"cohorts": self.cohorts, "running": sorted(self.running), "pending": sorted(self.pending)}

    # ---- forming and running cohorts
    async def _form(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            members = self._next_cohort()
            if members is not None:
                self._launch(*members)

    def _next_cohort(self) -> tuple[str, list[str]] | None:
        """(name, trials) of the cohort to start now, or None: a restored trial goes back to its cohort
        (with those of it that came back); new trials start K at a time, or fewer once none has joined
        for ``wait_s``, while the cluster has room for another cohort."""
        if not self.pending or len(self.running) >= self.max_cohorts:
            return None
        quiet = time.monotonic() - self.last_join >= self.wait_s
        for name, trials in self.cohorts.items():
            back = [t for t in trials if t in self.pending]
            if back and name not in self.running and (len(back) == len(trials) or quiet):
                return name, back
        new = [t for t in self.pending if not any(t in ts for ts in self.cohorts.values())]
        if len(new) >= self.size or (new and quiet):
            return f"cohort_{len(self.cohorts):04d}", new[:self.size]
        return None

    def _launch(self, name: str, trials: list[str]) -> None:
        import ray

        recipes = {t: self.pending.pop(t) for t in trials}
        self.cohorts.setdefault(name, list(trials))
        self.results.write_text(json.dumps(self.cohorts, indent=1), self.study.name, COHORTS_FILE)
        self.running.add(name)
        hub = ray.get_runtime_context().current_actor
        task = ray.remote(num_cpus=0, max_retries=0)(run_cohort)
        ref = task.options(name=f"cohort:{self.study.name}:{name}").remote(self.study, name, recipes, hub)
        asyncio.get_running_loop().create_task(self._watch(name, list(recipes), ref))

    async def _watch(self, name: str, trials: list[str], ref) -> None:
        why = None
        try:
            await ref
        except Exception as e:  # noqa: BLE001 (said to each student's trial, which fails with it)
            why = f"cohort {name} failed: {str(e).strip().splitlines()[-1][:300]}"
        self.running.discard(name)
        for t in trials:
            self.over[t] = why
        await self._notify()


def run_cohort(study, name: str, recipes: dict[str, dict], hub) -> None:
    """One cohort's Ray Train run (resuming a run of the same name from its last checkpoint)."""
    from pathlib import Path

    from tmad_ray.config import config_from_dict
    from tmad_ray.train.run import build_trainer

    cfg = config_from_dict(study.cfg)
    trials_dir = Path(study.trials_dir)
    trainer = build_trainer(cfg, study.manifest, study.report, name=name,
                            log_path=str(trials_dir.parent / "cohorts" / name / "train_log.jsonl"),
                            mlflow_run={"experiment_id": study.experiment_id, "study": study.name,
                                        "queue": study.queue},
                            storage_path=study.train_storage, started_at=time.time(),
                            cohort={"recipes": recipes, "hub": hub, "trials_dir": str(trials_dir)})
    trainer.fit()


def start(study, size: int, wait_s: float, max_cohorts: int, results_root: str):
    """The study's hub, on the driver's node, holding no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(CohortHub)
    return actor.options(name=actor_name(study.name), scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote(study, size, wait_s, max_cohorts, results_root)


def join_and_relay(hub, trial: str, params: dict) -> None:
    """A trial's side: join a cohort, then hand each of its student's epochs to Tune until the run ends."""
    import ray
    import ray.tune

    ray.get(hub.join.remote(trial, params))
    after = 0
    while True:
        msg = ray.get(hub.next.remote(trial, after))
        if "metrics" not in msg:
            if msg["end"]:
                raise RuntimeError(msg["end"])
            return
        ray.tune.report(msg["metrics"])  # returns only if Tune wants the next epoch
        after = int(msg["metrics"]["epoch"])
        if "non_finite_loss" in msg["metrics"]:
            return


def watch(study: str):
    """A Tune callback for the driver: tells the study's hub each trial Tune ends (ASHA's cut, the
    end, an error), found by name (Tune pickles its callbacks, and ``--resume`` restores them)."""
    from ray.tune import Callback

    class CohortWatch(Callback):
        def _tell(self, trial, status: str) -> None:
            import ray

            try:
                ray.get_actor(actor_name(study)).trial_ended.remote(trial.trial_id, status)
            except ValueError:  # no hub (yet): nothing is waiting on this trial
                pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._tell(trial, "complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tell(trial, "error")

    return CohortWatch()


def cohort_of(results_root: str, study: str, trial: str) -> str | None:
    """The cohort a trial trained in (None: it trained alone)."""
    saved = Storage(results_root).read_bytes(study, COHORTS_FILE)
    for name, trials in (json.loads(saved) if saved else {}).items():
        if trial in trials:
            return name
    return None

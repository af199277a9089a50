"""The searcher and the scheduler of a new study, and its Optuna sampler in a form Tune can always pickle.

**What they learn from.** Optuna (and ASHA) are told each trial's ``best_<metric>``: its best epoch
so far, which is the epoch whose checkpoint is exported (``train.loop.best_so_far``), not its
latest. TPE draws ``startup_trials`` recipes at random, then models the results.

**Pickling.** Tune pickles its searcher when the ``Tuner`` is made (``tuner.pkl``) and at every
experiment checkpoint (``OptunaSearch.save``), and the searcher holds the Optuna study, which holds
the sampler. Whether a sampler pickles is Optuna's business and changes between releases: Optuna 5's
``NSGAIISampler`` keeps a ``threading.Lock`` for its generation cache and no longer pickles. So the
study gets a ``StudySampler``: it builds the sampler the config asks for and hands every call to it,
and it pickles as that sampler's state with its thread locks left out (they guard caches that are
rebuilt from the study's trials) and made anew on load. The random state is kept, so a restored
study samples on as if it had never stopped.
"""

from __future__ import annotations

import threading

import optuna
from optuna.samplers import BaseSampler

from tmad_ray.search.results import objective_modes
from tmad_ray.recipe import space_for

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


def build_sampler(algorithm: str, seed: int, startup_trials: int | None = None) -> BaseSampler:
    """``tpe`` (``startup_trials`` random trials first, then TPE models the results) or ``nsga2``."""
    if algorithm == "tpe":
        kwargs = {} if startup_trials is None else {"n_startup_trials": startup_trials}
        return optuna.samplers.TPESampler(seed=seed, **kwargs)
    if algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown search.algorithm {algorithm!r}: use tpe or nsga2")


class StudySampler(BaseSampler):
    """An Optuna sampler (``build_sampler``) that pickles whatever locks it holds."""

    def __init__(self, algorithm: str, seed: int, startup_trials: int | None = None):
        self.algorithm = algorithm
        self.inner = build_sampler(algorithm, seed, startup_trials)

    def __str__(self) -> str:
        return f"StudySampler({self.inner})"

    # ---- pickling: the inner sampler's attributes, locks left out and made anew
    def __getstate__(self) -> dict:
        state = dict(self.inner.__dict__)
        locks = sorted(k for k, v in state.items() if isinstance(v, _LOCK_TYPES))
        for k in locks:
            del state[k]
        return {"algorithm": self.algorithm, "cls": type(self.inner), "state": state, "locks": locks}

    def __setstate__(self, saved: dict) -> None:
        inner = saved["cls"].__new__(saved["cls"])
        inner.__dict__.update(saved["state"])
        for k in saved["locks"]:
            setattr(inner, k, threading.Lock())
        self.algorithm, self.inner = saved["algorithm"], inner

    # ---- the sampler's interface, handed on
    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def build_searcher(cfg):
    """The searcher and the scheduler of a new study. Both judge a trial by ``best_<metric>``, the best
    epoch so far (the one whose student would be exported), not by its latest epoch. The sampler is
    a ``StudySampler``: Tune pickles the searcher, and some Optuna samplers do not pickle by
    themselves."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    objectives, modes = objective_modes(cfg)
    if len(objectives) > 1:  # NSGA-II: ASHA stops on one metric; with several, every trial runs to the end
        sampler = StudySampler("nsga2", s.seed)
        return (OptunaSearch(space=space_for(s), metric=[f"best_{o}" for o in objectives], mode=modes,
                             sampler=sampler, points_to_evaluate=first_points(s)), FIFOScheduler())
    sampler = StudySampler(s.algorithm, s.seed, startup_trials(s))
    metric = f"best_{s.metric}"
    return (OptunaSearch(space=space_for(s), metric=metric, mode=s.mode, sampler=sampler,
                         points_to_evaluate=first_points(s)),
            ASHAScheduler(time_attr="epoch", metric=metric, mode=s.mode, max_t=cfg.train.epochs,
                          grace_period=min(s.grace_period, cfg.train.epochs), reduction_factor=s.reduction_factor))


def startup_trials(search_cfg) -> int:
    """TPE's random trials before it models the results: ``search.startup_trials``, or a third of the
    study (at least 2), so that most of a study is searched, not drawn at random (Optuna's own default
    of 10 would make a 9-trial study random search)."""
    s = search_cfg
    return s.startup_trials if s.startup_trials is not None else max(2, s.num_samples // 3)


def first_points(search_cfg) -> list[dict] | None:
    """``search.points_to_evaluate``: the study's first trials, as given (Optuna enqueues them; a layer
    set is its string, as the space samples it)."""
    return [{k: str(v) if k == "align_layers" else v for k, v in p.items()} for p in search_cfg.points_to_evaluate] \
        or None

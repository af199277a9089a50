"""The search space, define-by-run for Optuna, and how a sampled point becomes a run's config.

``define_space`` is a module-level function bound to plain bounds with ``functools.partial``, so
the searcher (and with it Tune's experiment checkpoint) pickles: a lambda would not.
"""

from __future__ import annotations

from functools import partial

from tmad_ray.schema import parse_layer_set

WEIGHTS = ("alpha", "beta", "gamma", "delta")


def bounds_of(search_cfg) -> dict:
    s = search_cfg
    b = {k: list(getattr(s, k)) for k in (*WEIGHTS, "temperature")}
    b["align_layers"] = list(s.align_layer_sets)
    if s.lr is not None:
        b["lr"] = list(s.lr)
    if s.student_depths:
        b["student_depth"] = list(s.student_depths)
    return b


def define_space(bounds: dict, trial) -> dict:
    """α, β, γ, δ log-uniform, T uniform, the aligned layers as a categorical over layer-set strings,
    the learning rate (log-uniform) and the student's depth when the config gives them. Returns the
    Optuna trial's number as a constant of the config (``trial_number``): runs, tables and Optuna's
    plots all name a trial by it."""
    for k in WEIGHTS:
        trial.suggest_float(k, *bounds[k], log=True)
    trial.suggest_float("temperature", *bounds["temperature"])
    trial.suggest_categorical("align_layers", bounds["align_layers"])
    if "lr" in bounds:
        trial.suggest_float("lr", *bounds["lr"], log=True)
    if "student_depth" in bounds:
        trial.suggest_categorical("student_depth", bounds["student_depth"])
    return {"trial_number": trial.number}


def space_for(search_cfg):
    return partial(define_space, bounds_of(search_cfg))


def distributions(search_cfg) -> dict:
    """The same space as Optuna distributions (to rebuild an Optuna study from Tune's results)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    b = bounds_of(search_cfg)
    d = {k: FloatDistribution(*b[k], log=True) for k in WEIGHTS}
    d["temperature"] = FloatDistribution(*b["temperature"])
    d["align_layers"] = CategoricalDistribution(b["align_layers"])
    if "lr" in b:
        d["lr"] = FloatDistribution(*b["lr"], log=True)
    if "student_depth" in b:
        d["student_depth"] = CategoricalDistribution(b["student_depth"])
    return d


def apply_params(cfg, params: dict):
    """A copy of ``cfg`` with a trial's sampled values in ``distill`` (and ``train.lr``)."""
    cfg = cfg.model_copy(deep=True)
    for k in (*WEIGHTS, "temperature"):
        if k in params:
            setattr(cfg.distill, k, float(params[k]))
    if "align_layers" in params:
        cfg.distill.align_layers = parse_layer_set(params["align_layers"])
    if "lr" in params:
        cfg.train.lr = float(params["lr"])
    if "student_depth" in params:
        if cfg.models.student.depth is None:
            raise ValueError("search.student_depths needs a student given as depth/width/heads")
        cfg.models.student.depth = int(params["student_depth"])
    return cfg

"""A distillation recipe, the thing a study searches: the loss weights α, β, γ, δ, the temperature
and the aligned layers (plus the student's learning rate and depth when the config searches them).

One module owns what the rest of the flow does with a recipe, as a plain dict of those keys (what
Optuna samples, what Tune's ``config`` and a results row hold):

* ``bounds_of`` / ``define_space`` / ``space_for`` / ``distributions``: the search space made
  from the config's ``search`` section, define-by-run for Optuna. ``define_space`` is a
  module-level function bound to plain bounds with ``functools.partial``, so the searcher (and
  with it Tune's experiment checkpoint) pickles: a lambda would not;
* ``apply``: a copy of a config with a recipe in it (``distill``, ``train.lr``, the student's depth);
* ``of`` / ``of_config``: the recipe in a results row or a trial's params, or in a config;
* ``short``: its name in run names and tables (``a=0.52 b=1.9 g=0.1 d=0.8 T=4.0 L=[-1,-3]``);
* ``mlflow_params`` / ``layers_param``: the values MLflow is given (a layer set never looks like a
  number there).

Layer sets are strings (``"-1,-2"``) in a recipe, as Optuna's categorical needs them, and lists of
block indices in a config (``parse_layer_set`` and ``layer_set_text`` turn one into the other). A new loss term
is a new entry of ``WEIGHTS`` here, its term in ``distill/losses.py``, its weight and bounds as
fields of ``schema``'s ``distill`` and ``search`` sections, and, when it needs student outputs the
others do not, their capture in ``distill/trimodel.py``; the space, tables, MLflow params, run
names and benchmarks follow from ``WEIGHTS``.
"""

from __future__ import annotations

from functools import partial


WEIGHTS = ("alpha", "beta", "gamma", "delta")  # log-uniform loss weights: ce, feat, attn, asym
KEYS = (*WEIGHTS, "temperature", "align_layers")  # every recipe has these
SEARCHABLE = (*KEYS, "lr", "student_depth")  # and a trial's params may add these


def parse_layer_set(text: str) -> list[int]:
    """``"-1,-4,-8"`` -> ``[-1, -4, -8]``; 0 is not a layer (indices are 1-based)."""
    try:
        layers = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"layer set {text!r} must be comma-separated integers") from e
    if not layers or 0 in layers:
        raise ValueError(f"layer set {text!r} must be non-empty 1-based (or negative) indices")
    return layers


def layer_set_text(layers: list[int]) -> str:
    """``[-1, -2]`` -> ``"-1,-2"``."""
    return ",".join(map(str, layers))


def bounds_of(search_cfg) -> dict:
    """The space's bounds as plain lists: ``{"alpha": [lo, hi], ..., "align_layers": [sets], ...}``."""
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


def apply(cfg, recipe: dict):
    """A copy of ``cfg`` with a recipe's values in ``distill`` (and ``train.lr``, the student's depth)."""
    cfg = cfg.model_copy(deep=True)
    for k in (*WEIGHTS, "temperature"):
        if k in recipe:
            setattr(cfg.distill, k, float(recipe[k]))
    if "align_layers" in recipe:
        cfg.distill.align_layers = parse_layer_set(recipe["align_layers"])
    if "lr" in recipe:
        cfg.train.lr = float(recipe["lr"])
    if "student_depth" in recipe:
        if cfg.models.student.depth is None:
            raise ValueError("search.student_depths needs a student given as depth/width/heads")
        cfg.models.student.depth = int(recipe["student_depth"])
    return cfg


def of(row: dict) -> dict:
    """The recipe in a results row or a trial's params (what ``apply`` takes): the keys it has."""
    return {k: row[k] for k in SEARCHABLE if row.get(k) is not None}


def of_config(cfg) -> dict:
    """The recipe a config trains as it is (its ``distill`` section)."""
    d = cfg.distill
    return {**{k: getattr(d, k) for k in (*WEIGHTS, "temperature")}, "align_layers": layer_set_text(d.align_layers)}


def layers_param(layers: str) -> str:
    """``"-1,-3"`` -> ``"[-1,-3]"``: MLflow's charts drop a run whose value of a param looks like a
    number when others do not, so no layer set may look like one (``"-1"`` would)."""
    return f"[{layers}]"


def mlflow_params(params: dict) -> dict:
    """``params`` as MLflow is given them: the layer set bracketed (``layers_param``)."""
    if params.get("align_layers") is None:
        return dict(params)
    return {**params, "align_layers": layers_param(params["align_layers"])}


def short(params: dict) -> str:
    """``a=0.52 b=1.9 g=0.1 d=0.8 T=4.0 L=[-1,-3]`` (plus ``lr=``, ``depth=`` when searched)."""
    parts = [f"{k[0]}={params[k]:.2g}" for k in WEIGHTS if params.get(k) is not None]
    if params.get("temperature") is not None:
        parts.append(f"T={params['temperature']:.1f}")
    if params.get("align_layers") is not None:
        parts.append(f"L={layers_param(params['align_layers'])}")
    if params.get("lr") is not None:
        parts.append(f"lr={params['lr']:.1e}")
    if params.get("student_depth") is not None:
        parts.append(f"depth={params['student_depth']}")
    return " ".join(parts)

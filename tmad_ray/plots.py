"""Every figure the package draws (matplotlib, headless): confusion matrices, the Pareto front,
Optuna's history and importance plots, and the benchmarks' figures (``save_figure``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers, CI or a cluster head
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure (tight layout, 100 dpi) to ``path`` and close it."""
    plt = _pyplot()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_confusion(cm: np.ndarray, labels: list[str], path: str, title: str = "confusion matrix") -> str:
    """Write the confusion matrix ``[C, C]`` (rows: true, columns: predicted) as a PNG, counts in the cells."""
    plt = _pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_pareto(rows: list[dict], front: list[dict], objectives: list[str], path: str) -> str:
    """The trials (grey) and the Pareto front (line) of the first two objectives: x = 2nd, y = 1st."""
    plt = _pyplot()
    x, y = objectives[1], objectives[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    ax.scatter([r[x] for r in done], [r[y] for r in done], color="#999999", label="trials")
    f = sorted(front, key=lambda r: r[x])
    ax.plot([r[x] for r in f], [r[y] for r in f], "o-", color="#3b75af", label="Pareto front")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    return save_figure(fig, path)


def optuna_plots(rows: list[dict], distributions: dict, metric: str, mode: str, out: str) -> list[str]:
    """Optimization history and parameter importance, from an Optuna study rebuilt from the trials'
    rows (``distributions``: Optuna's, by parameter name); [] when no trial finished."""
    plt = _pyplot()
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for r in rows:  # in trial-number order, failed ones too: the plots number trials as the runs do
        if any(r.get(k) is None for k in distributions):
            continue
        done = r[metric] is not None
        study.add_trial(optuna.trial.create_trial(
            params={k: r[k] for k in distributions}, distributions=distributions, value=r[metric] if done else None,
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    ovm.plot_optimization_history(study)
    paths = [_save_current(plt, Path(out) / "optuna_history.png")]
    if len(complete) >= 2 and len({t.value for t in complete}) > 1:
        try:
            ovm.plot_param_importances(study)
            paths.append(_save_current(plt, Path(out) / "optuna_importance.png"))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass  # importance is undefined when the trials carry no information (e.g. all equal)
    return paths


def _save_current(plt, path: Path) -> str:
    """Optuna draws on pyplot's current figure: size it, save it, close every figure."""
    fig = plt.gcf()
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close("all")
    return str(path)

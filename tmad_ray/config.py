"""Loading an experiment: a YAML file validated against ``tmad_ray.schema``, plus dotted overrides.

    cfg = load_config("experiments/default.yaml", ["train.epochs=3", "distill.alpha=0.5"])

Every section forbids unknown keys, so a typo fails before Ray starts, naming the key.
Relative paths are made absolute against the directory the command runs in (Tune moves the
working directory of trials); URIs (``s3://...``) are left as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tmad_ray.errors import UserError
from tmad_ray.schema import Config

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names every offending key."""


def _is_uri(p: str) -> bool:
    return "://" in p


def _absolute(p: str | None, base: Path) -> str | None:
    if p is None or _is_uri(p):
        return p
    return str((base / os.path.expanduser(p)).resolve())


def in_ray_job_copy(cwd: Path) -> bool:
    """True in the working directory of ``ray job submit --working-dir``: Ray's own copy of it under
    ``<ray temp>/session_*/runtime_resources/``, which Ray garbage-collects and which a later job
    with changed files does not reuse."""
    return "runtime_resources" in cwd.parts


def durable_base(cwd: Path) -> Path:
    """Where relative paths of what a run writes (outputs, caches, checkpoints, the default MLflow
    store, the generated dataset and toy zoo) are resolved: the working directory, except in a Ray
    job's temporary copy of it, where ``$TMAD_RAY_HOME`` (default ``~/tmad_ray``) takes its place so
    that the study's exports, registry and caches outlive the job."""
    if in_ray_job_copy(cwd):
        return Path(os.environ.get("TMAD_RAY_HOME") or "~/tmad_ray").expanduser().resolve()
    return cwd


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (``3``, ``[-1,-2]``, ``null``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "quote it or close its brackets, e.g. 'distill.align_layers=[-1,-2]'") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _yaml_problem(e: "yaml.YAMLError") -> str:
    """'<problem> at line L, column C' from a YAML error, in one line."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}".replace("\n", " ")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def config_from_dict(tree: dict, source: str = "<dict>", base: Path | None = None) -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    for key, value in (("data.root", cfg.data.root), ("storage.output_dir", cfg.storage.output_dir)):
        if _is_uri(value):  # decord opens local files; logs and the exported student are written as files
            raise ConfigError(f"invalid config ({source}):\n  {key}: {value} is a URI; it must be a local path (on a "
                              "cluster, a mount every node shares). URIs work for storage.clip_cache and "
                              "storage.ray_results")
    base = Path.cwd() if base is None else base
    keep = durable_base(base)  # what the run writes must outlive a Ray job's working directory
    cfg.data.root = _absolute(cfg.data.root, keep if cfg.data.synthetic is not None else base)
    cfg.models.cache_dir = _absolute(cfg.models.cache_dir, keep)
    for field in ("path", "config"):
        setattr(cfg.models.assistant, field, _absolute(getattr(cfg.models.assistant, field), base))
    if cfg.models.toy_zoo is not None:
        given = Path(_absolute(cfg.models.toy_zoo.dir, base))
        cfg.models.toy_zoo.dir = _absolute(cfg.models.toy_zoo.dir, keep)
        # The toy zoo's models are files that may not exist yet: paths (not hub names), moved with the zoo.
        for model, sub in ((cfg.models.teacher, "teacher"), (cfg.models.student, "student")):
            if model.name and (base / model.name).resolve() == given / sub:
                model.name = str(Path(cfg.models.toy_zoo.dir) / sub)
        for field in ("path", "config"):
            value = getattr(cfg.models.assistant, field)
            if value and not _is_uri(value) and Path(value).is_relative_to(given):
                setattr(cfg.models.assistant, field, str(Path(cfg.models.toy_zoo.dir) / Path(value).relative_to(given)))
    for field in ("clip_cache", "ray_results", "output_dir"):
        setattr(cfg.storage, field, _absolute(getattr(cfg.storage, field), keep))
    for model in (cfg.models.teacher, cfg.models.student):
        # A name that is an existing local directory is a path; anything else is a hub name.
        if model.name is not None and (base / model.name).is_dir():
            model.name = str((base / model.name).resolve())
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load an experiment YAML (default: experiments/default.yaml) and apply overrides."""
    path = Path(path) if path is not None else EXPERIMENTS_DIR / "default.yaml"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(tree, list(overrides or []))
    return config_from_dict(tree, source=str(path))

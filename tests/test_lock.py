"""requirements.lock: made from pyproject.toml's ranges, installed by the set-up, and impossible to let
drift: a dependency edited without ``make lock`` fails here (and in ``make lock-check``, which
``.ci/run`` calls first) with one line."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import lock  # noqa: E402  (tools/lock.py: standard library only, runs before the venv exists)


def pins(text: str) -> dict[str, str]:
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def copy_project(tmp_path: Path) -> Path:
    for f in ("pyproject.toml", "requirements.lock", "tools/lock.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    return tmp_path


def check(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(project / "tools/lock.py"), "check"], capture_output=True, text=True)


def test_the_lock_is_fresh_for_this_pyproject_python_and_platform():
    assert lock.problem() is None
    assert check(ROOT).returncode == 0


def test_a_dependency_edited_without_make_lock_fails_with_one_line(tmp_path):
    project = copy_project(tmp_path)
    py = project / "pyproject.toml"
    py.write_text(py.read_text().replace('"optuna>=4"', '"optuna>=4.2"'))
    out = check(project)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "pyproject.toml changed: run make lock\n"
    # a description or a pytest marker is not a dependency: no new lock needed
    project = copy_project(tmp_path / "again")
    py = project / "pyproject.toml"
    py.write_text(py.read_text().replace('version = "0.1.0"', 'version = "0.1.1"'))
    assert check(project).returncode == 0


def test_a_lock_for_another_python_or_platform_names_it_and_the_fix(tmp_path):
    project = copy_project(tmp_path)
    why = lock.problem(project / "requirements.lock", project / "pyproject.toml", python="3.13")
    assert why.splitlines() == [why]
    assert "locked for Python 3.11 and this is Python 3.13" in why and "make PY=python3.11" in why
    assert "make lock" in why
    why = lock.problem(project / "requirements.lock", project / "pyproject.toml", plat="darwin-arm64")
    assert "locked for linux-x86_64 and this is darwin-arm64" in why and "make lock" in why
    (project / "requirements.lock").unlink()
    assert check(project).stderr == "requirements.lock is missing: run make lock\n"


def test_every_pin_satisfies_the_ranges_of_pyproject():
    import tomllib

    locked = pins((ROOT / "requirements.lock").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [*project["project"]["dependencies"], *sum(project["project"]["optional-dependencies"].values(), []),
            *project["build-system"]["requires"]]
    for text in reqs:
        r = Requirement(text)
        name = r.name.lower().replace("_", "-")
        assert name in locked, f"{name} is not in requirements.lock"
        assert r.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} is outside {r.specifier}"


@pytest.mark.parametrize("package", ["torch", "ray", "optuna", "transformers", "mlflow", "pydantic", "numpy", "pytest"])
def test_the_set_up_installed_the_locked_versions(package):
    """``make venv`` installs from the lock: what this environment holds is what the lock says."""
    assert importlib.metadata.version(package) == pins((ROOT / "requirements.lock").read_text())[package]

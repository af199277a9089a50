"""The lock file's guard: ``requirements.lock`` records the dependency ranges of ``pyproject.toml`` it
was made from (a hash) and the Python it was made for; the set-up commands check both before they
install anything. Standard library only: it runs before the virtual environment exists.

    python3 tools/lock.py check    # exit 1 with one line when the lock is stale or not for this Python
    python3 tools/lock.py stamp    # after pip-compile (``make lock``): write the header lines

Both are what ``make lock-check`` and ``make lock`` call; a newcomer needs no other command.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
HASH_LINE = "# pyproject-deps-sha256: "
PYTHON_LINE = "# locked-for-python: "
PLATFORM_LINE = "# locked-for-platform: "


def this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def this_platform() -> str:
    import platform

    return f"{sys.platform}-{platform.machine().lower()}"


def deps_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """A hash of what the lock is resolved from: the project's dependencies, its extras, the Python
    range and the build requirements. Editing a description or a test marker leaves it alone."""
    import tomllib  # Python 3.11+; problem() names the Python first, so an older one gets that line

    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    basis = {"dependencies": sorted(project.get("dependencies", [])),
             "optional": {k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
             "requires-python": project.get("requires-python"),
             "build": sorted(data.get("build-system", {}).get("requires", []))}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def header_value(lock_text: str, prefix: str) -> str | None:
    for line in lock_text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def problem(lock: Path = LOCK, pyproject: Path = ROOT / "pyproject.toml", python: str | None = None,
            plat: str | None = None) -> str | None:
    """Why installing from the lock would be wrong here, in one line; None when it is right."""
    python, plat = python or this_python(), plat or this_platform()
    if not lock.exists():
        return f"{lock.name} is missing: run make lock"
    text = lock.read_text()
    locked_for = header_value(text, PYTHON_LINE)
    if locked_for != python:
        return (f"{lock.name} was locked for Python {locked_for} and this is Python {python}: "
                f"run the set-up with python{locked_for} (make PY=python{locked_for} ...), or run make lock "
                f"with this Python to lock for it")
    locked_on = header_value(text, PLATFORM_LINE)
    if locked_on != plat:
        return (f"{lock.name} was locked for {locked_on} and this is {plat}: run make lock here to lock for it, "
                f"or install without the lock (pip install torch, then pip install -e .)")
    if header_value(text, HASH_LINE) != deps_hash(pyproject):
        return "pyproject.toml changed: run make lock"
    return None


def stamp(lock: Path = LOCK) -> None:
    """Put the hash, this Python's version and this platform at the top of the lock pip-compile just wrote."""
    lines = [ln for ln in lock.read_text().splitlines()
             if not ln.startswith((HASH_LINE, PYTHON_LINE, PLATFORM_LINE))]
    head = [f"{HASH_LINE}{deps_hash()}", f"{PYTHON_LINE}{this_python()}", f"{PLATFORM_LINE}{this_platform()}"]
    lock.write_text("\n".join(head + lines) + "\n")


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        why = problem()
        if why:
            print(why, file=sys.stderr)
            return 1
        return 0
    if argv == ["stamp"]:
        stamp()
        return 0
    print("usage: python3 tools/lock.py check|stamp", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

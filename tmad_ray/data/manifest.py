"""Split files -> rows ``(path, label)``.

Layout::

    ROOT/train.csv  ROOT/val.csv  ROOT/test.csv  ROOT/videos/*.mp4

A line is ``<path relative to ROOT> <label>`` (whitespace-separated) or ``path,label``
(comma-separated, optional ``path,label`` header). Files are UTF-8, with or without a byte-order
mark. Blank lines and ``#`` comments are ignored. A split file is data, often from someone else:
a path that is absolute or resolves outside ROOT (after symlinks) is a problem, and the file is
never opened. The label set comes from the train rows that survive (a class whose every train
video is missing is not a class); a val/test label that train lacks is a problem naming the file
and the line. Without val.csv, val is a seeded stratified split of train.

Parsing never stops at the first problem: it collects them all (``Problem``), so ``data check``
can report everything at once and ``data cache`` can go on with the good rows. Training uses
``Manifest.raise_for_problems`` to refuse a dataset with line-level errors.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tmad_ray.errors import UserError

SPLITS = ("train", "val", "test")
NORMAL, VIOLENT = "normal", "violent"


@dataclass(frozen=True)
class Row:
    path: str  # relative to ROOT, as written in the split file
    label: str  # after label_mode
    split: str
    line: int  # 1-based line number in ``file``
    file: str  # the split file the row comes from (train.csv for a val split made from train)

    def abspath(self, root: str) -> str:
        return os.path.join(root, self.path)


@dataclass(frozen=True)
class Problem:
    path: str  # the video (relative to ROOT) or the split file
    reason: str
    split_file: str | None = None
    line: int | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "file": self.split_file, "reason": self.reason}

    def __str__(self) -> str:
        where = f"{self.split_file}:{self.line}: " if self.split_file else ""
        return f"{where}{self.path}: {self.reason}"


class ManifestError(UserError, ValueError):
    pass


@dataclass
class Manifest:
    root: str
    rows: dict[str, list[Row]]  # split -> rows
    labels: list[str]  # sorted label names; index = class id
    problems: list[Problem] = field(default_factory=list)
    val_from_train: bool = False
    empty_classes: list[str] = field(default_factory=list)  # in train.csv, but none of their videos is usable

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def all_rows(self) -> list[Row]:
        return [r for s in SPLITS for r in self.rows.get(s, [])]

    def raise_for_problems(self, limit: int = 20) -> None:
        if self.problems:
            shown = "\n  ".join(str(p) for p in self.problems[:limit])
            more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
            raise ManifestError(
                f"{len(self.problems)} problem(s) in dataset {self.root}:\n  {shown}{more}\n"
                f"Run `tmad-ray data check {self.root}` for the full report."
            )


def map_label(raw: str, mode: str) -> str:
    """XD-Violence codes: ``B2-G-0`` -> as_is ``B2-G-0``, first ``B2``, binary ``violent``."""
    if mode == "as_is":
        return raw
    first = raw.split("-")[0]
    if mode == "first":
        return first
    if mode == "binary":
        return NORMAL if first == "A" else VIOLENT
    raise ValueError(f"unknown label_mode {mode!r} (as_is | first | binary)")


def parse_split_file(path: Path) -> tuple[list[tuple[int, str, str]], list[Problem]]:
    """Lines of a split file -> ``[(line_no, video_path, raw_label)]`` and malformed-line problems."""
    entries, problems = [], []
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first path
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    for no, text in enumerate(content.splitlines(), start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        parts = [p.strip() for p in text.split(",")] if "," in text else text.split()
        if no == 1 and [p.lower() for p in parts] == ["path", "label"]:
            continue
        if len(parts) != 2 or not parts[0] or not parts[1]:
            problems.append(
                Problem(path=path.name, reason=f"malformed line {text[:80]!r}: expected '<path> <label>'",
                        split_file=path.name, line=no)
            )
            continue
        entries.append((no, parts[0], parts[1]))
    return entries, problems


def outside(root_real: str, path: str) -> bool:
    """Whether a split file's ``path`` is absolute or resolves (symlinks too) outside the real ``root_real``."""
    if os.path.isabs(path):
        return True
    full = os.path.realpath(os.path.join(root_real, path))
    return os.path.commonpath([full, root_real]) != root_real


def stratified_split(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Move ``fraction`` of each label's rows (at least one, never all) from train to val."""
    by_label: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_label[r.label].append(r)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: r.path)
        rng.shuffle(group)
        n_val = min(len(group) - 1, max(1, round(fraction * len(group)))) if len(group) > 1 else 0
        val += [Row(r.path, r.label, "val", r.line, r.file) for r in group[:n_val]]
        train += group[n_val:]
    return sorted(train, key=lambda r: r.line), sorted(val, key=lambda r: r.line)


def load_manifest(root: str | os.PathLike, label_mode: str = "as_is", val_fraction: float = 0.2,
                  split_seed: int = 0, check_files: bool = True) -> Manifest:
    """Read ROOT's split files. Raises ``ManifestError`` only when nothing can be read at all."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise ManifestError(f"dataset root not found: {root_p} (expected ROOT/train.csv, ROOT/videos/...)")
    if not (root_p / "train.csv").is_file():
        raise ManifestError(f"missing split file: {root_p / 'train.csv'} (each line: '<path> <label>')")

    rows: dict[str, list[Row]] = {}
    problems: list[Problem] = []
    root_real = os.path.realpath(root_p)
    listed_labels: set[str] = set()
    for split in SPLITS:
        split_path = root_p / f"{split}.csv"
        if not split_path.is_file():
            continue
        entries, bad = parse_split_file(split_path)
        problems += bad
        kept = []
        for no, p, raw in entries:
            row = Row(p, map_label(raw, label_mode), split, no, split_path.name)
            if split == "train":
                listed_labels.add(row.label)
            if outside(root_real, p):
                problems.append(Problem(path=p, reason="path outside the data root (absolute, '..' or a symlink "
                                        "out of it): not opened", split_file=row.file, line=no))
            elif check_files and not os.path.isfile(os.path.join(root_real, p)):
                problems.append(Problem(path=p, reason="missing video", split_file=row.file, line=no))
            else:
                kept.append(row)
        rows[split] = kept

    labels = sorted({r.label for r in rows["train"]})
    if not labels:
        raise ManifestError(f"{root_p / 'train.csv'} has no usable line")
    known = set(labels)
    for split in ("val", "test"):
        kept = []
        for r in rows.get(split, []):
            if r.label in known:
                kept.append(r)
            else:
                problems.append(Problem(path=r.path, reason=f"label {r.label!r} is not in train's labels {labels}",
                                        split_file=r.file, line=r.line))
        if split in rows:
            rows[split] = kept

    val_from_train = "val" not in rows
    if val_from_train:
        rows["train"], rows["val"] = stratified_split(rows["train"], val_fraction, split_seed)
    rows.setdefault("test", [])
    return Manifest(root=str(root_p.resolve()), rows=rows, labels=labels, problems=problems,
                    val_from_train=val_from_train, empty_classes=sorted(listed_labels - known))

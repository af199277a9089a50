"""``tmad-ray data check ROOT``: every problem of a dataset, with file, line and reason.

Line-level problems (malformed line, label unknown to train, missing video) come from the
manifest; each remaining video is opened and its first and last frames decoded in sandboxed
child processes (zero-byte, truncated, unreadable, zero-frame). ``ok`` is false when the
problems exceed ``max_bad_fraction`` of the listed videos.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tmad_ray.data.clips import BadVideo, probe_video
from tmad_ray.data.manifest import Problem, load_manifest
from tmad_ray.data.sandbox import Sandbox


@dataclass
class CheckReport:
    root: str
    videos: int  # lines of the split files (good and bad)
    problems: list[Problem]
    max_bad_fraction: float
    empty_classes: list[str] = field(default_factory=list)  # in train.csv, but without one usable train video

    @property
    def ok(self) -> bool:
        return len(self.problems) <= self.max_bad_fraction * max(self.videos, 1)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "root": self.root, "videos": self.videos,
                "max_bad_fraction": self.max_bad_fraction, "empty_classes": self.empty_classes,
                "problems": [p.as_dict() for p in self.problems]}

    def summary(self) -> str:
        head = (f"{self.root}: {self.videos} videos listed, {len(self.problems)} problem(s) "
                f"-> {'OK' if self.ok else 'FAIL'} (max_bad_fraction={self.max_bad_fraction})")
        empty = ([f"classes without a usable train video (not trained on): {', '.join(self.empty_classes)}"]
                 if self.empty_classes else [])
        return "\n".join([head] + [f"  {p}" for p in self.problems] + empty)


def _probe_all(paths: list[str], timeout_s: float, workers: int) -> list[str | None]:
    """Reason per path (None when fine), probing ``workers`` videos at a time."""
    workers = max(1, min(workers, len(paths)))
    boxes = [Sandbox() for _ in range(workers)]
    try:
        def probe_chunk(i):
            out = []
            for path in paths[i::workers]:
                try:
                    boxes[i].call(probe_video, path, timeout=timeout_s)
                    out.append(None)
                except BadVideo as e:
                    out.append(str(e))
            return out

        with ThreadPoolExecutor(workers) as pool:
            chunks = list(pool.map(probe_chunk, range(workers)))
    finally:
        for b in boxes:
            b.close()
    reasons: list[str | None] = [None] * len(paths)
    for i, chunk in enumerate(chunks):
        reasons[i::workers] = chunk
    return reasons


def check_dataset(root: str, label_mode: str = "as_is", max_bad_fraction: float = 0.05,
                  timeout_s: float = 120.0, workers: int | None = None) -> CheckReport:
    manifest = load_manifest(root, label_mode=label_mode)
    problems = list(manifest.problems)
    rows = manifest.all_rows()
    reasons = _probe_all([r.abspath(manifest.root) for r in rows], timeout_s, workers or os.cpu_count() or 1)
    usable = set()
    for row, reason in zip(rows, reasons):
        if reason is not None:
            problems.append(Problem(row.path, reason, row.file, row.line))
        elif row.split == "train" or (manifest.val_from_train and row.split == "val"):
            usable.add(row.label)
    empty = sorted((set(manifest.labels) | set(manifest.empty_classes)) - usable)
    # Every listed line counts, including those the manifest rejected.
    return CheckReport(root=manifest.root, videos=len(rows) + len(manifest.problems), problems=problems,
                       max_bad_fraction=max_bad_fraction, empty_classes=empty)

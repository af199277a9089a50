"""Benchmarks: each writes JSON and prints a table for docs/benchmarks.md."""

import json
import os
import platform
import time
from pathlib import Path


def write_result(result: dict, out: str, table: str) -> dict:
    """Print the table and write the JSON to ``out``."""
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def seed_facts(manifest, t_start: float, seeds: list[int]) -> dict:
    """What a per-seed benchmark's JSON says besides its runs: the split sizes, chance, its minutes so
    far, the seeds it set out to run (a benchmark cut short shows which it finished) and the machine."""
    return {"videos": {split: len(rows) for split, rows in manifest.rows.items()}, "chance": 1 / len(manifest.labels),
            "benchmark_minutes": (time.time() - t_start) / 60, "seeds_planned": seeds,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


def in_fresh_process(target, args: tuple, what: str) -> dict:
    """``target(*args, queue)`` in a spawned process, so that its peak memory is its own; returns what
    it put on the queue (``what`` names it in the error when the process fails)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{what} failed (exit code {p.exitcode})")
    return q.get()

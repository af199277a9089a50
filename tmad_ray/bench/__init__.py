"""Benchmarks: each writes JSON and prints a table for docs/benchmarks.md."""

import json
from pathlib import Path


def write_result(result: dict, out: str, table: str) -> dict:
    """Print the table and write the JSON to ``out``."""
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result

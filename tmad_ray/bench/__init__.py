"""Benchmarks: each writes JSON and prints a table for the README."""

import json
from pathlib import Path


def write_result(result: dict, out: str, table: str) -> dict:
    """Print the table and write the JSON to ``out``."""
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure (tight layout, 100 dpi) to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

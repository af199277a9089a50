"""bench step runs every variant in its own process and writes its table and JSON."""

import json

from tmad_ray.cli import main


def test_bench_step_writes_every_variant(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = main(["bench", "step", "--config", "experiments/smoke.yaml", "--out", str(out), "--steps", "1",
               "--warmup", "0", "--attn-layers", "1", "--threads", "1"])
    assert rc == 0
    r = json.loads(out.read_text())
    names = [row["name"] for row in r["rows"]]
    assert names == ["student", "forwards", "tri", "tri+attn@1", "tri+attn@1, output_attentions"]
    assert r["rows"][0]["vs_student"] == 1.0
    assert all(row["ms"] > 0 and row["peak_mb"] > 0 for row in r["rows"])
    assert "| tri+attn@1, output_attentions |" in capsys.readouterr().out


def test_bench_cohort_times_each_cohort_size_in_its_own_process(tmp_path):
    """The cohort benchmark's measurement on the smoke shapes (its rehearsal-shaped half is the same
    code at other sizes): every K, its frozen share, and students/hour from its own step time."""
    from tmad_ray.bench.cohort import measure
    from tmad_ray.config import load_config

    cfg = load_config("experiments/smoke.yaml", [f"data.root={tmp_path}"])
    r = measure(cfg, "smoke", clips=16, startup_s=10.0, steps=1, warmup=1, threads=1, sizes=(1, 2),
                say=lambda *a: None)
    assert [row["k"] for row in r["rows"]] == [1, 2]
    assert r["trial_steps"] == 2 * 2  # 16 clips over 2 workers in batches of 4, 2 epochs
    for row in r["rows"]:
        assert 0 < row["frozen_share"] < 1 and row["peak_mb"] > 0 and row["alone_s"] > 0
        assert row["students_per_hour"] == 3600 * row["k"] / (10.0 + r["trial_steps"] * row["step_s"])
        assert row["vs_alone"] == row["students_per_hour"] / (
            3600 * row["k"] / (row["k"] * 10.0 + r["trial_steps"] * row["alone_s"]))

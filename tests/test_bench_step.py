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

"""``tmad-ray rehearse --tiny``: the rehearsal's own path (XD-style data, a videomae-base-shaped teacher,
an AMD-format assistant, tune.py on xd_violence.yaml with 2 workers and grad_accum 2) at toy sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_the_rehearsal_runs_the_xd_violence_path(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "rehearse.json"
    r = subprocess.run([sys.executable, "-m", "tmad_ray", "rehearse", "--tiny", "--out", str(out),
                        "--dir", str(tmp_path / "work"), "--trials", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert len(res["trials"]) == 1  # one is enough at toy size; `make rehearse` runs two
    for t in res["trials"]:
        # 10 train videos over 2 ranks, batch 2: 3 steps a rank, the last accumulation group shorter
        assert t["train_steps"] == 3 and t["train_clips_per_rank"] == [5, 5]
        assert t["replica_drift"] == 0.0
        assert len(t["peak_memory_mb_per_rank"]) == 2 and min(t["peak_memory_mb_per_rank"]) > 100
        assert t["train_asym"] > 0 and t["train_attn"] > 0 and t["train_feat"] > 0
    assert res["mlflow_child_runs"] == 1 and set(res["mlflow_child_status"]) == {"FINISHED"}
    e = res["exported_student"]
    # label_mode first: B2-G-0 -> B2 and so on; the pipeline classifies a real video with the export
    assert e["labels"] == ["A", "B1", "B2", "G"] and e["pipeline_labels"] == ["A", "B1", "B2", "G"]
    assert "best:" in "\n".join(res["tune_tail"])

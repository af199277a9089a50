"""``tmad-ray rehearse``: the xd_violence path end to end at real shapes, on whatever machine this is.

Everything is the size users run except the number of videos and epochs:

* 12 H.264 videos of 320×240, 72 frames (the synthetic generator), labelled in XD-Violence's style
  (``A``, ``B1-0-0``, ``B2-G-0``, ``G-0-0``) and read with ``label_mode: first``; 16 frames × 224²,
  ``sampling: stride`` (rate 4): 1568 tokens per clip;
* teacher: a ViT-B directory shaped like ``MCG-NJU/videomae-base`` (``VideoMAEForPreTraining``, no
  classifier, so it teaches features only), random weights written with ``save_pretrained``;
  assistant: a ViT-S checkpoint in AMD's own layout (``{'module': sd}``, fp16, fused qkv, 174 SSV2
  classes), random, loaded through the converter; student: the ``vit-s`` preset;
* ``python tune.py --config experiments/xd_violence.yaml`` with 2 DDP workers, ``grad_accum: 2``,
  batch 2, 10 train videos (5 clips per rank: 3 steps, an odd count, the last group shorter),
  the train clips streamed (``hold_in_memory_mb: 0``, as XD-Violence's 12 GB per rank are),
  ``attn_query_tokens: 256``, aligned layers [-1,-2,-3]; a 2-trial study of 1 epoch, MLflow runs,
  the best student exported and loaded by ``pipeline("video-classification")``.

It records each trial's step time and peak memory per worker and the replicas' largest parameter
difference at the end (``replica_drift``, 0 when DDP keeps them identical), and writes them to
``bench/rehearse.json``. Random weights: the accuracies mean nothing; the point is that the real
shapes run, correctly, and what they cost. ``--tiny`` runs the same path at toy sizes (what CI tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tmad_ray.bench import write_result

REPO = Path(__file__).resolve().parents[2]
XD_STYLE = {"A": "A", "B1": "B1-0-0", "B2": "B2-G-0", "G": "G-0-0"}  # label_mode: first gives back the class
VAL = ("videos/B1_0000.mp4", "videos/G_0000.mp4")

REAL = {"size": "240x320", "frames": 72, "image_size": 224, "num_frames": 16, "sampling_rate": 4, "patch": 16,
        "teacher": (12, 768, 12), "assistant": "vit-s", "student": "{size: vit-s}", "layers": "[-1,-2,-3]",
        "layer_sets": "['-1', '-1,-2,-3', '-1,-4,-8']", "query": 256}
TINY = {"size": "48x64", "frames": 24, "image_size": 32, "num_frames": 8, "sampling_rate": 2, "patch": 8,
        "teacher": (3, 48, 2), "assistant": (3, 32, 2), "layers": "[-1,-2,-3]", "layer_sets": "['-1', '-1,-2,-3']",
        "student": "{depth: 3, width: 32, heads: 2, patch_size: 8, tubelet_size: 2}", "query": 16}


def make_data(root: Path, size: str, frames: int) -> None:
    """12 videos (3 per class); train: 10 of them, val: 2; labels in XD-Violence's style."""
    from tmad_ray.data.synthetic import make_dataset

    make_dataset(root, seed=0, videos_per_class=3, size=size, frames=frames)
    videos = sorted(p.relative_to(root).as_posix() for p in (root / "videos").glob("*.mp4"))
    label = {v: XD_STYLE[Path(v).stem.split("_")[0]] for v in videos}
    (root / "train.csv").write_text("".join(f"{v} {label[v]}\n" for v in videos if v not in VAL))
    (root / "val.csv").write_text("".join(f"{v} {label[v]}\n" for v in VAL))
    (root / "test.csv").unlink(missing_ok=True)


def make_models(out: Path, sizes: dict, image_size: int, num_frames: int, patch: int) -> dict:
    """The random teacher directory and AMD-format assistant checkpoint; returns the config overrides."""
    import argparse

    import torch
    from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification

    from tmad_ray.models.amd import amd_config
    from tmad_ray.models.toyzoo import to_amd_state_dict

    teacher_dir, assistant_path = out / "videomae-base-random", out / "amd_vit_s_ssv2_random.pth"
    overrides = [f"models.teacher.name={teacher_dir}", f"models.assistant.path={assistant_path}"]
    torch.manual_seed(0)
    if not (teacher_dir / "config.json").is_file():
        depth, width, heads = sizes["teacher"]
        # MCG-NJU/videomae-base's own config: self-supervised pretraining, no classifier, no mean pooling
        config = VideoMAEConfig(image_size=image_size, patch_size=patch, num_frames=num_frames, tubelet_size=2,
                                hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                intermediate_size=4 * width, qkv_bias=True, use_mean_pooling=False,
                                norm_pix_loss=True, decoder_num_hidden_layers=4, decoder_hidden_size=384,
                                decoder_num_attention_heads=6, decoder_intermediate_size=1536)
        VideoMAEForPreTraining(config).save_pretrained(teacher_dir)
    if sizes["assistant"] == "vit-s":
        a_config = amd_config("vit-s", 174, image_size=image_size, num_frames=num_frames, patch_size=patch)
        overrides.append("models.assistant.arch=vit-s")
    else:
        depth, width, heads = sizes["assistant"]
        a_config = amd_config("vit-s", 174, image_size=image_size, num_frames=num_frames, patch_size=patch)
        a_config.update({"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
                         "intermediate_size": 4 * width})
        (out / "assistant_config.json").write_text(a_config.to_json_string())
        overrides += ["models.assistant.arch=null", f"models.assistant.config={out / 'assistant_config.json'}"]
    if not assistant_path.is_file():
        sd = to_amd_state_dict(VideoMAEForVideoClassification(a_config))
        # as AMD's fine-tuned files come: DeepSpeed's {'module': ...} in fp16
        torch.save({"module": {k: v.half() for k, v in sd.items()}, "args": argparse.Namespace(model="vit_small")},
                   assistant_path)
    return overrides


def study_overrides(work: Path, sizes: dict, trials: int) -> list[str]:
    s = sizes
    return [
        "name=rehearse", f"data.root={work / 'data'}", "data.label_mode=first", "data.sampling=stride",
        f"data.num_frames={s['num_frames']}", f"data.sampling_rate={s['sampling_rate']}",
        f"data.image_size={s['image_size']}", "data.train_views=1", "data.eval_clips=1", "data.eval_crops=1",
        f"models.student={s['student']}",
        f"distill.align_layers={s['layers']}", f"distill.attn_query_tokens={s['query']}",
        "train.num_workers=2", "train.use_gpu=false", "train.cpus_per_worker=1", "train.epochs=1",
        "train.batch_size=2", "train.grad_accum=2", "train.hold_in_memory_mb=0",
        f"search.num_samples={trials}", "search.grace_period=1", f"search.align_layer_sets={s['layer_sets']}",
        "search.confirm_top_k=0",  # the path at real shapes, once per trial: no confirmation runs on top
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=rehearse",
        f"storage.clip_cache={work / 'cache'}", f"storage.ray_results={work / 'ray_results'}",
        f"storage.output_dir={work / 'outputs'}",
    ]


def run_rehearsal(out: str, work: str = "rehearse", tiny: bool = False, trials: int = 2, say=print) -> dict:
    sizes = TINY if tiny else REAL
    work_p = Path(work).resolve()
    work_p.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_data(work_p / "data", sizes["size"], sizes["frames"])
    overrides = make_models(work_p, sizes, sizes["image_size"], sizes["num_frames"], sizes["patch"])
    overrides += study_overrides(work_p, sizes, trials)
    setup_s = time.perf_counter() - t0
    cmd = [sys.executable, str(REPO / "tune.py"), "--config", str(REPO / "experiments" / "xd_violence.yaml"),
           *overrides]
    say(f"rehearsal in {work_p}: {' '.join(cmd[1:4])} ... ({len(overrides)} overrides)")
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work_p, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    study_s = time.perf_counter() - t1
    (work_p / "tune.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"tune.py failed (rc {proc.returncode}); its output is in {work_p / 'tune.log'}:\n"
                           + proc.stderr[-3000:])
    result = collect(work_p, proc.stdout, sizes["sampling_rate"])
    result.update({"tiny": tiny, "sizes": {k: v for k, v in sizes.items()}, "setup_s": round(setup_s, 1),
                   "study_s": round(study_s, 1), "cores": os.cpu_count()})
    return write_result(result, out, table(result))


def collect(work: Path, stdout: str, sampling_rate: int) -> dict:
    """What the study left: per trial its epoch records, the MLflow runs, the exported student's prediction."""
    import mlflow
    from transformers import pipeline

    from tmad_ray.tracking import PARENT_TAG, STUDY_TAG

    studies = sorted((work / "outputs").glob("rehearse-*/best.json"), key=lambda p: p.stat().st_mtime)
    if not studies:
        raise RuntimeError(f"the study left no best.json under {work / 'outputs'}")
    study_dir = studies[-1].parent
    trials = []
    for log_path in sorted(study_dir.glob("trials/*/train_log.jsonl")):
        events = [json.loads(line) for line in log_path.read_text().splitlines()]
        ends = [e for e in events if e["event"] == "epoch_end"]
        if not ends:
            continue
        e = ends[-1]
        trials.append({"trial": log_path.parent.name, "epochs": len(ends), "train_steps": e["train_steps"],
                       "train_clips_per_rank": e["train_clips_per_rank"], "step_s_per_rank": e["step_s_per_rank"],
                       "peak_memory_mb_per_rank": e["peak_memory_mb_per_rank"], "replica_drift": e["replica_drift"],
                       "epoch_s": round(e["epoch_s"], 1), "clips_per_s": round(e["clips_per_s"], 3),
                       "train_loss": e["train_loss"], "train_asym": e.get("train_asym"),
                       "train_attn": e.get("train_attn"), "train_feat": e.get("train_feat"),
                       "val_accuracy": e["val_accuracy"]})
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rehearse")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study_dir.name}'")
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    student = study_dir / "best_student"
    clf = pipeline("video-classification", model=str(student))
    video = work / "data" / VAL[0]
    pred = clf(str(video), frame_sampling_rate=sampling_rate)
    cfg = json.loads((student / "config.json").read_text())
    return {"study": study_dir.name, "trials": trials,
            "mlflow_child_runs": len(children), "mlflow_child_status": sorted(r.info.status for r in children),
            "exported_student": {"path": str(student), "layers": cfg["num_hidden_layers"],
                                 "width": cfg["hidden_size"], "labels": sorted(cfg["id2label"].values()),
                                 "pipeline_top": pred[0]["label"], "pipeline_labels": sorted(p["label"] for p in pred)},
            "tune_tail": stdout.strip().splitlines()[-12:]}


def table(r: dict) -> str:
    s = r["sizes"]
    head = (f"rehearsal ({'tiny' if r['tiny'] else 'real shapes'}): {s['num_frames']}x{s['image_size']}² clips, "
            f"teacher {s['teacher']}, assistant {s['assistant']}, student {s['student']}; 2 workers x 1 CPU, "
            f"batch 2, grad_accum 2; {r['cores']} cores; study {r['study_s']:.0f} s")
    lines = [head, "| trial | steps/rank | step s (rank 0, 1) | peak MB (rank 0, 1) | replica drift | epoch s | "
                   "train loss |", "|---|---:|---|---|---:|---:|---:|"]
    for t in r["trials"]:
        lines.append(f"| {t['trial']} | {t['train_steps']} | {', '.join(f'{x:.1f}' for x in t['step_s_per_rank'])} | "
                     f"{', '.join(f'{x:.0f}' for x in t['peak_memory_mb_per_rank'])} | {t['replica_drift']:.1e} | "
                     f"{t['epoch_s']:.0f} | {t['train_loss']:.3f} |")
    e = r["exported_student"]
    lines.append(f"MLflow: {r['mlflow_child_runs']} child runs {r['mlflow_child_status']}; exported student "
                 f"{e['layers']}x{e['width']}, labels {e['labels']}, pipeline top label {e['pipeline_top']}")
    return "\n".join(lines)

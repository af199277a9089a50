import os

# No test reaches a hub: huggingface_hub reads this when imported, so set it before anything is.
os.environ["HF_HUB_OFFLINE"] = "1"

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tmad_ray.config import EXPERIMENTS_DIR, load_config  # noqa: E402
from tmad_ray.data.synthetic import make_dataset  # noqa: E402
from mlflow_browser import free_port  # noqa: E402

# One auth mode for the driver and the local cluster it starts (Ray 2.59+ may enable tokens).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def ray_local():
    # Per module, and in modules whose subprocess tests come first: while two local Rays run on one
    # machine, Ray Train's placement-group cleaner cannot tell which cluster is its own ("Found
    # multiple active Ray instances") and a stopped trial's resources are never given back.
    import ray

    if not ray.is_initialized():
        # The State API address of this Ray, set before it starts as tmad_ray.cluster.init_ray does: with
        # another Ray on the machine (a study, a benchmark) the cleaner would otherwise not know its own.
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # The dashboard stays on: without it, trials that ASHA stops leak their placement groups (Ray 2.60: the dashboard runs the cleaner).
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # never the address of a stopped Ray for the next one


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small embedded dataset (4 classes x 4 videos, 32 px, 16 frames), shared read-only."""
    root = tmp_path_factory.mktemp("synth") / "ds"
    make_dataset(root, seed=0, videos_per_class=4, size=32, frames=16)
    return root


@pytest.fixture
def dataset_copy(synth_root, tmp_path) -> Path:
    """A private copy of the small dataset that a test may damage."""
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    return root


def smoke_config(tmp_path: Path, root: Path, *overrides: str):
    """experiments/smoke.yaml pointed at ``root`` with caches and outputs under ``tmp_path``."""
    return load_config(EXPERIMENTS_DIR / "smoke.yaml", [
        f"data.root={root}", "data.synthetic=null", f"storage.clip_cache={tmp_path / 'clips'}",
        f"storage.output_dir={tmp_path / 'out'}", f"storage.ray_results={tmp_path / 'ray'}", *overrides,
    ])


@pytest.fixture(scope="session")
def smoke_zoo(tmp_path_factory, synth_root) -> list[str]:
    """A toy zoo for the smoke tokenization, built once; returns the overrides that point at it."""
    from tmad_ray.models.toyzoo import build_zoo

    out = tmp_path_factory.mktemp("zoo")
    # with a masked-autoencoder pretrained student (smoke-sized), as the embedded default has
    cfg = load_config(EXPERIMENTS_DIR / "smoke.yaml", [
        f"data.root={synth_root}", "models.toy_zoo.student={depth: 2, width: 32, heads: 2, clips: 16, epochs: 1}"])
    build_zoo(cfg, out, seed=0, clips_per_class=8, epochs=1, say=lambda *a: None)
    return [f"models.toy_zoo.dir={out}", f"models.teacher.name={out / 'teacher'}",
            f"models.assistant.path={out / 'assistant.pth'}", f"models.assistant.config={out / 'assistant_config.json'}"]


@pytest.fixture(scope="session")
def pretrained_student(smoke_zoo) -> list[str]:
    """The override that fine-tunes the smoke zoo's pretrained student (a ``save_pretrained`` directory
    of ``VideoMAEForPreTraining``, as ``MCG-NJU/videomae-base`` is) instead of a from-scratch one."""
    zoo = Path(smoke_zoo[0].split("=", 1)[1])
    return [f"models.student={{name: {zoo / 'student'}}}"]

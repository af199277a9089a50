"""cluster.yaml passes Ray's own validator and keeps the promises the README makes about it."""

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_ray_up():
    cfg = prepare_config(load())
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert set(types) == {"head", "gpu_worker", "cpu_worker"}
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("c", "m"))


def test_the_validator_would_catch_a_mistake():
    bad = load()
    bad["available_node_types"]["head"]["node_cofnig"] = copy.deepcopy(bad["available_node_types"]["head"]["node_config"])
    with pytest.raises(Exception, match="node_cofnig"):
        validate_config(prepare_config(bad))


def test_image_matches_our_ray_and_the_package_is_installed():
    cfg = load()
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert cfg["file_mounts"] == {"/home/ray/tmad_ray": "."}
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -q -e /home/ray/tmad_ray" in setup


def test_nothing_is_exposed_publicly():
    head = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head          # reached with `ray dashboard cluster.yaml`
    assert "mlflow server" in head and "MLFLOW_TRACKING_URI=" in head
    assert "SecurityGroupIds" not in CLUSTER.read_text()  # Ray's default group opens SSH only

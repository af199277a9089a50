"""cluster.yaml passes Ray's own validator and keeps the promises docs/cluster.md makes about it."""

import copy
import subprocess
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


def head_mlflow_command() -> str:
    return next(c for c in load()["head_start_ray_commands"] if "mlflow server" in c)


def run_head_command(command: str, tmp_path) -> subprocess.CompletedProcess:
    """The head's MLflow command as Ray runs it (one bash -c), with a stand-in `mlflow` that records
    its arguments, and the head's folder moved under tmp_path."""
    import os
    import stat

    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/mlflow_args\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "mlflow").mkdir()
    command = command.replace("/home/ray/mlflow", str(tmp_path / "mlflow"))
    r = subprocess.run(["bash", "-c", command + " wait"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TMAD_S3_BUCKET": "env-bucket"})
    return r


def test_the_head_refuses_to_start_mlflow_until_the_bucket_is_named(tmp_path):
    """Ray never expands ${VARIABLES} in this file nor passes the user's environment to the head: the
    bucket is named in the file, and until it is, `ray up` fails at the head with a message."""
    command = head_mlflow_command()
    assert "${" not in CLUSTER.read_text().split("head_start_ray_commands")[1]
    refused = run_head_command(command, tmp_path)
    assert refused.returncode != 0 and "no S3 bucket named" in refused.stderr
    assert not (tmp_path / "mlflow_args").exists()


def test_the_named_bucket_is_where_mlflow_puts_its_artifacts(tmp_path):
    command = head_mlflow_command().replace("CHANGE-ME", "my-team-bucket")  # what a user's edit does
    ok = run_head_command(command, tmp_path)
    assert ok.returncode == 0, ok.stderr
    args = (tmp_path / "mlflow_args").read_text()
    assert "--artifacts-destination s3://my-team-bucket/mlflow" in args  # not the environment's, not a default
    assert "--host 0.0.0.0 --port 5000" in args


def test_workers_get_an_instance_profile_the_readme_says_how_to_create():
    types = load()["available_node_types"]
    for worker in ("gpu_worker", "cpu_worker"):
        assert types[worker]["node_config"]["IamInstanceProfile"] == {"Name": "tmad-ray-worker"}
    assert "IamInstanceProfile" not in types["head"]["node_config"]  # Ray's default profile (EC2 + S3)
    readme = (CLUSTER.parent / "docs" / "cluster.md").read_text()
    for step in ("aws iam create-role --role-name tmad-ray-worker", "aws iam create-instance-profile "
                 "--instance-profile-name tmad-ray-worker", "aws iam add-role-to-instance-profile",
                 "iam:PassRole"):
        assert step in readme, step


KUBERAY = CLUSTER.parent / "kuberay" / "rayjob.yaml"
# spec fields of ray.io/v1 RayJob, RayCluster head/worker groups (KubeRay 1.x CRDs)
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint", "entrypointNumCpus",
               "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata", "rayClusterSpec",
               "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
               "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished", "deletionStrategy"}
CLUSTER_SPEC = {"autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs"}
HEAD_SPEC = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_SPEC = {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
               "replicas", "scaleStrategy", "suspend", "template"}


def test_the_kuberay_rayjob_runs_the_same_study():
    job = yaml.safe_load(KUBERAY.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC and set(spec["rayClusterSpec"]) <= CLUSTER_SPEC
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"] == ray.__version__
    assert set(rc["headGroupSpec"]) <= HEAD_SPEC
    for group in rc["workerGroupSpecs"]:
        assert set(group) <= WORKER_SPEC and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # the entrypoint is tune.py on a config of this repository, with its storage on shared S3
    words = spec["entrypoint"].split()
    assert words[:3] == ["python", "tune.py", "--config"] and (CLUSTER.parent / words[3]).is_file()
    assert any(w.startswith("storage.clip_cache=s3://") for w in words)
    assert any(w.startswith("storage.ray_results=s3://") for w in words)
    # the files every pod must see are on the one shared volume, and every pod has the cloud identity
    pods = [g["template"]["spec"] for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]]
    assert {p["serviceAccountName"] for p in pods} == {"tmad-ray"}
    for pod in pods:
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts["/data"]] == "tmad-data"
    assert {"data.root=/data/processed_dataset", "storage.output_dir=/data/outputs"} <= set(words)
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in head["env"])
    gpu = next(g for g in rc["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    # every container runs the image the Dockerfile builds, on the Ray image of this Ray
    images = {c["image"] for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert images == {"CHANGE-ME/tmad-ray:latest"}
    dockerfile = (CLUSTER.parent / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile and "torch==2.13.0" in dockerfile


def run_init_command(tmp_path, efs_id: str | None) -> tuple[subprocess.CompletedProcess, str]:
    """The hosts' EFS command as Ray runs it (one bash -c), the user's edit applied, with stand-ins for
    sudo, mount, mountpoint and mount.nfs4 that record what they were asked, /mnt/shared under tmp_path."""
    import os
    import stat

    bins = tmp_path / "bin"
    bins.mkdir()
    for name, body in {"sudo": 'exec "$@"', "mount": f'echo "$@" >> {tmp_path}/mount_args',
                       "mountpoint": "exit 1", "mount.nfs4": "exit 0", "apt-get": f"echo apt >> {tmp_path}/apt"}.items():
        (bins / name).write_text(f"#!/bin/sh\n{body}\n")
        (bins / name).chmod((bins / name).stat().st_mode | stat.S_IEXEC)
    (command,) = load()["initialization_commands"]
    if efs_id:
        command = command.replace("CHANGE-ME", efs_id)
    command = command.replace("/mnt/shared", str(tmp_path / "shared"))
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": f"{bins}:{os.environ['PATH']}"})
    args = (tmp_path / "mount_args").read_text() if (tmp_path / "mount_args").exists() else ""
    return r, args


def test_every_host_mounts_the_named_efs_where_the_containers_see_it(tmp_path):
    cfg = load()
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    r, args = run_init_command(tmp_path, "fs-0123456789abcdef0")
    assert r.returncode == 0, r.stderr
    region = cfg["provider"]["region"]
    assert f"fs-0123456789abcdef0.efs.{region}.amazonaws.com:/ {tmp_path / 'shared'}" in args
    assert args.startswith("-t nfs4 -o nfsvers=4.1") and not (tmp_path / "apt").exists()
    assert (tmp_path / "shared").stat().st_mode & 0o1777 == 0o1777  # the container's user writes there


def test_without_an_efs_nothing_is_mounted_and_the_host_still_starts(tmp_path):
    r, args = run_init_command(tmp_path, None)
    assert r.returncode == 0 and args == "" and not (tmp_path / "shared").exists()

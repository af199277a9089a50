"""On a real two-node Ray (``ray.cluster_utils.Cluster``: two raylets on this machine) with an
S3-compatible object store on 127.0.0.1 (moto's server): the preflight refuses what a cluster cannot
run before anything is decoded, cached or tracked, and a study whose shared paths are all URIs runs
its training on node 2 and registers a student that loads. Both nodes share this machine's disk, so
node 2 is told to not see a directory (``preflight.HIDE_ENV`` in its environment): what a path on the
head's own disk looks like from another node."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import EXPERIMENTS_DIR, smoke_config
from mlflow_browser import free_port, mlflow_server
from tmad_ray.preflight import HIDE_ENV, PreflightError, check_cluster

pytestmark = pytest.mark.integration
BUCKET = "tmad"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, a bucket in it, and the AWS variables that point boto3, pyarrow and
    MLflow at it in this process (and so in the Ray nodes started after it); returns the endpoint."""
    import boto3

    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "moto's S3 server did not start"
                time.sleep(0.5)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3):
    import ray
    from ray.cluster_utils import Cluster

    head_only = tmp_path_factory.mktemp("head_disk")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    # node 2: room for a trial's 2 training workers, which ask for its "node2" resource, and for the trial's
    # own actor should Tune place it there too (else the workers wait for a CPU it holds)
    cluster.add_node(num_cpus=3, resources={"node2": 2}, env_vars={HIDE_ENV: str(head_only)})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield head_only
    ray.shutdown()
    cluster.shutdown()


def test_a_path_one_node_cannot_see_and_a_local_mlflow_are_refused_naming_key_node_and_fix(two_nodes, synth_root,
                                                                                         tmp_path):
    cfg = smoke_config(tmp_path, synth_root, f"storage.clip_cache={two_nodes / 'clips'}")
    with pytest.raises(PreflightError) as e:
        check_cluster(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    msg = str(e.value)
    assert msg.startswith("on this 2-node cluster: tracking.tracking_uri=sqlite:///") and "run an MLflow server" in msg
    assert f"storage.clip_cache={two_nodes / 'clips'} is not visible from node " in msg
    assert "give a URI (s3://..., gs://...) or a path on a mount every node shares" in msg
    assert "storage.ray_results" not in msg and "data.root" not in msg  # those both nodes see
    assert len(msg.splitlines()) == 1
    assert not (two_nodes / "clips").exists()  # the directory made for its marker is gone again


def test_paths_every_node_sees_and_a_tracking_server_pass(two_nodes, synth_root, tmp_path, capsys):
    cfg = smoke_config(tmp_path, synth_root)
    check_cluster(cfg, "http://user:secret@mlflow.internal:5000")
    out = capsys.readouterr().out
    assert out.startswith("preflight: 2 nodes see every local path (data.root, storage.clip_cache, ") and "secret" not in out
    assert not list((tmp_path / "clips").glob(".tmad_ray_preflight*"))


def test_uris_need_no_check(two_nodes, synth_root, tmp_path, capsys):
    cfg = smoke_config(tmp_path, synth_root, "storage.clip_cache=s3://bucket/clips", "storage.ray_results=s3://bucket/ray")
    check_cluster(cfg, "https://mlflow.internal")
    assert capsys.readouterr().out == ("preflight: 2 nodes see every local path (data.root, storage.output_dir); URIs: "
                                       "storage.clip_cache, storage.ray_results; MLflow at https://mlflow.internal\n")


def test_tune_on_two_nodes_stops_before_decoding_anything(two_nodes, synth_root, smoke_zoo, tmp_path, capsys,
                                                          monkeypatch):
    from pathlib import Path

    from tmad_ray.cli import main

    monkeypatch.chdir(tmp_path)
    clips = two_nodes / "tune_clips"
    rc = main(["tune", "--config", str(Path(__file__).resolve().parent.parent / "experiments" / "smoke.yaml"),
               f"data.root={synth_root}", "data.synthetic=null", f"storage.clip_cache={clips}",
               f"storage.output_dir={tmp_path / 'out'}", f"storage.ray_results={tmp_path / 'ray'}",
               f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *smoke_zoo])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: on this 2-node cluster: tracking.tracking_uri=sqlite:///"), err
    assert f"storage.clip_cache={clips} is not visible from node" in err and len(err.splitlines()) == 1
    assert not any(p.suffix == ".parquet" for p in clips.rglob("*"))  # nothing decoded
    assert not (tmp_path / "out").exists() and not (tmp_path / "ray").exists()


def test_a_study_on_object_storage_trains_on_node_2_and_its_student_loads_from_the_registry(
        two_nodes, s3, synth_root, smoke_zoo, pretrained_student, tmp_path, capsys, monkeypatch):
    """Clip cache and Tune's storage in S3, MLflow a server whose artifacts are in S3, the training
    workers on node 2 (``train.worker_resources``): node 2 reads the clip cache the head's decode
    wrote, writes its checkpoints to the bucket, and the registered student loads through the server."""
    import mlflow
    import pyarrow.fs as pafs

    from tmad_ray import tracking
    from tmad_ray.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow").mkdir()
    with mlflow_server(tmp_path / "mlflow", 300, ("--artifacts-destination", f"s3://{BUCKET}/mlflow")) as url:
        rc = main(["tune", "--config", str(EXPERIMENTS_DIR / "smoke.yaml"), f"data.root={synth_root}",
                   "data.synthetic=null", f"storage.clip_cache=s3://{BUCKET}/clips",
                   f"storage.ray_results=s3://{BUCKET}/ray_results", f"storage.output_dir={tmp_path / 'out'}",
                   f"tracking.tracking_uri={url}", "train.worker_resources={node2: 1}", "train.epochs=1",
                   *smoke_zoo, *pretrained_student])
        out, err = capsys.readouterr()
        assert rc == 0, err[-3000:]
        (preflight,) = [line for line in out.splitlines() if line.startswith("preflight: ")]
        assert preflight.startswith("preflight: 2 nodes see every local path (data.root, models.assistant.config, ")
        assert "storage.output_dir" in preflight and "URIs: storage.clip_cache, storage.ray_results" in preflight
        assert "2 DDP workers x 1 CPU + 1 node2" in out
        video = sorted((synth_root / "videos").glob("*.mp4"))[0]
        with tracking.fluent_tracking(url):
            version = mlflow.MlflowClient().get_model_version_by_alias("tmad_ray_student", "champion")
            model = mlflow.pyfunc.load_model("models:/tmad_ray_student@champion")
        assert model.predict([str(video)])["label"][0] in {"A", "B1", "B2", "G"}
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")  # AWS_ENDPOINT_URL: moto's server
    listed = {info.path.split("/")[1] for info in fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))}
    assert {"clips", "ray_results", "mlflow"} <= listed
    stored = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/mlflow", recursive=True))]
    # the registered model's files are in S3 (MLflow 3 keeps a logged model's files under its model id)
    models = [p for p in stored if p.endswith("/MLmodel")]
    assert version.source.startswith("models:/m-") and any(f"/models/{version.source[8:]}/" in p for p in models), (
        models, version.source)
    # the training ran on node 2: each trial's log names the node its rank 0 ran on
    import ray

    node2 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node2" in n["Resources"])
    logs = list((tmp_path / "out").glob("*/trials/*/train_log.jsonl"))
    starts = [json.loads(line) for log in logs for line in log.open() if '"event": "start"' in line]
    assert len(logs) == 2 and starts and {s["node"] for s in starts} == {node2}


def test_a_video_node_2_cannot_open_leaves_no_verdict_in_the_shared_cache(two_nodes, s3, synth_root, tmp_path):
    """A video on the head's own disk, decoded into the S3 clip cache first by a task on node 2 (which
    cannot see it) and then by one on the head: node 2 reports it with its node and writes nothing,
    so the head's decode is not refused by a "bad video" verdict in the shared cache."""
    import shutil

    import ray

    from tmad_ray.data.cache import ClipCache
    from tmad_ray.data.clips import ViewSpec

    video = two_nodes / "videos" / "only_on_the_head.mp4"
    video.parent.mkdir(exist_ok=True)
    shutil.copy(sorted((synth_root / "videos").glob("*.mp4"))[0], video)
    cache = ClipCache(f"s3://{BUCKET}/verdicts")
    spec = ViewSpec.from_config(smoke_config(tmp_path, synth_root).data, "train")
    batch = {"abspath": [str(video)], "key": ["ab" * 20], "video_id": ["videos/only_on_the_head.mp4"],
             "spec": [spec.__dict__]}
    def decode_once(cache_uri: str, batch: dict) -> dict:  # defined here: pickled by value for the workers
        from tmad_ray.data.pipeline import DecodeToCache

        udf = DecodeToCache(cache_uri, 60.0, [])
        try:
            return udf(batch)
        finally:
            udf.sandbox.close()

    decode = ray.remote(num_cpus=0.5)(decode_once)
    node2 = ray.get(decode.options(resources={"node2": 0.01}).remote(cache.uri, batch))
    assert node2["status"][0] == "unreadable" and "(node " in node2["detail"][0] and "not cached" in node2["detail"][0]
    assert cache.lookup("ab" * 20) == ("missing", None)  # no verdict for every later run and node
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    on_head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    head = ray.get(decode.options(scheduling_strategy=on_head).remote(cache.uri, batch))
    assert head["status"][0] == "decoded" and cache.lookup("ab" * 20)[0] == "clips"

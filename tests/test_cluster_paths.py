"""On a real two-node Ray (``ray.cluster_utils.Cluster``: two raylets on this machine), the preflight
refuses what a cluster cannot run before anything is decoded, cached or tracked. Both nodes share
this machine's disk, so node 2 is told to not see a directory (``preflight.HIDE_ENV`` in its
environment): what a path on the head's own disk looks like from another node."""

import pytest

from conftest import smoke_config
from tmad_ray.preflight import HIDE_ENV, PreflightError, check_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    head_only = tmp_path_factory.mktemp("head_disk")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"node2": 1}, env_vars={HIDE_ENV: str(head_only)})
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

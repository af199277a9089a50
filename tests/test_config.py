from pathlib import Path

import pytest

from tmad_ray.config import EXPERIMENTS_DIR, ConfigError, config_from_dict, load_config
from tmad_ray.recipe import parse_layer_set

EXPERIMENT_FILES = sorted(EXPERIMENTS_DIR.glob("*.yaml"))


def test_there_are_the_three_required_experiments():
    assert {"default.yaml", "smoke.yaml", "xd_violence.yaml"} <= {p.name for p in EXPERIMENT_FILES}


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    cfg = load_config(path)
    assert Path(cfg.data.root).is_absolute()
    assert cfg.data.train_short_side >= cfg.data.image_size
    for layer_set in cfg.search.align_layer_sets:
        parse_layer_set(layer_set)


def test_xd_violence_uses_real_models_and_gpus():
    cfg = load_config(EXPERIMENTS_DIR / "xd_violence.yaml")
    assert cfg.models.teacher.name == "MCG-NJU/videomae-base"
    assert (cfg.models.assistant.arch, cfg.models.assistant.dataset) == ("vit-s", "ssv2")
    assert cfg.models.student.name == "MCG-NJU/videomae-base"  # fine-tuned, as the reference framework does
    assert (cfg.data.num_frames, cfg.data.image_size) == (16, 224)
    assert cfg.train.use_gpu
    small = load_config(EXPERIMENTS_DIR / "xd_violence_small.yaml")
    assert small.models.student.name == "MCG-NJU/videomae-small-finetuned-kinetics"
    assert small.models.teacher == cfg.models.teacher and small.storage.output_dir != cfg.storage.output_dir


def test_the_embedded_default_fine_tunes_the_zoos_pretrained_student():
    cfg = load_config(None)
    zoo = Path(cfg.models.toy_zoo.dir)
    assert cfg.models.student.name == str(zoo / "student")  # a path in the zoo even before the zoo exists
    assert cfg.models.toy_zoo.student is not None


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(None, ["train.epochs=3", "distill.align_layers=[-1,-4]", "data.decode_concurrency=null",
                             "distill.attn_query_tokens=64", "search.lr=[1e-5, 1e-3]"])
    assert cfg.train.epochs == 3
    assert cfg.distill.align_layers == [-1, -4]
    assert cfg.data.decode_concurrency is None
    assert cfg.distill.attn_query_tokens == 64
    assert cfg.search.lr == [1e-5, 1e-3]


@pytest.mark.parametrize("override, key, words", [
    ("data.nmu_frames=3", "data.nmu_frames", "unknown key"),
    ("traing.epochs=3", "traing", "unknown key"),
    ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
    ("distill.alpha=high", "distill.alpha", "valid number"),
    ("data.sampling=random", "data.sampling", "'stride' or 'segment'"),
    ("data.val_fraction=1.5", "data.val_fraction", "less than 1"),
    ("search.beta=[2, 1]", "search.beta", "low <= high"),
    ("search.align_layer_sets=['-1,x']", "search.align_layer_sets", "comma-separated integers"),
    ("distill.align_layers=[0]", "distill.align_layers", "1-based"),
    ("data.train_short_side=16", "data", "train_short_side"),
    # relational term (δ > 0) on a grid of one cell: it would be exactly 0 whatever the student does
    ("distill.asym_space=1", "<root>", "distill.asym_space >= 2"),
    ("distill.asym_time=1", "<root>", "distill.asym_time >= 2"),
    ("data.num_frames=2", "<root>", "1 time step"),
    # never a NaN or an infinity: losses would be NaN every epoch, Optuna would overflow sampling
    ("train.lr=.inf", "train.lr", "finite number"),
    ("search.beta=[0.1, .inf]", "search.beta.1", "finite number"),
    ("distill.temperature=.nan", "distill.temperature", "finite number"),
    # read and written as local files: a URI there would become a local directory named "s3:"
    ("storage.output_dir=s3://b/out", "storage.output_dir", "is a URI; it must be a local path"),
    ("data.root=gs://b/videos", "data.root", "a mount every node shares"),
])
def test_bad_values_fail_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:  # a sized student: its tokenization is known before it loads
        load_config(None, [override, "models.student={depth: 4, width: 96, heads: 3, patch_size: 8}"])
    msg = str(e.value)
    assert f"  {key}" in msg and words in msg, msg


def test_a_one_cell_relation_grid_is_fine_when_the_relational_term_is_off():
    load_config(None, ["distill.asym_space=1", "distill.delta=0"])


def test_errors_list_every_bad_key_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.nmu_frames=3", "train.epochs=-1"])
    assert "data.nmu_frames: unknown key" in str(e.value)
    assert "train.epochs" in str(e.value)


@pytest.mark.parametrize("student", [
    {}, {"size": "vit-s", "name": "x"}, {"depth": 2, "width": 32}, {"depth": 2, "width": 30, "heads": 4},
])
def test_student_needs_exactly_one_consistent_source(student):
    with pytest.raises(ConfigError, match="models"):
        config_from_dict({"models": {"student": student}})


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["train.epochs.x=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("experiments/nope.yaml")


def test_paths_become_absolute_but_uris_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local_teacher").mkdir()
    cfg = config_from_dict({
        "data": {"root": "ds"},
        "storage": {"clip_cache": "s3://bucket/clips", "output_dir": "out"},
        "models": {"teacher": {"name": "local_teacher"}, "student": {"name": "MCG-NJU/videomae-base"}},
    })
    assert cfg.data.root == str(tmp_path / "ds")
    assert cfg.storage.output_dir == str(tmp_path / "out")
    assert cfg.storage.clip_cache == "s3://bucket/clips"
    assert cfg.models.teacher.name == str(tmp_path / "local_teacher")  # an existing dir is a path
    assert cfg.models.student.name == "MCG-NJU/videomae-base"  # anything else stays a hub name


def test_in_a_ray_jobs_working_directory_what_the_run_writes_goes_under_tmad_ray_home(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in Ray's temporary copy of the directory
    (``<ray temp>/session_*/runtime_resources/...``): outputs, caches, checkpoints, the default MLflow
    store and the generated dataset and toy zoo would vanish with it. They go under $TMAD_RAY_HOME;
    inputs shipped with the job (a dataset given by path, the config) stay where they are."""
    from tmad_ray.tracking import resolve_tracking_uri

    job = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    (job / "videos").mkdir(parents=True)
    home = tmp_path / "home"
    monkeypatch.setenv("TMAD_RAY_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(job)
    cfg = load_config(EXPERIMENTS_DIR / "default.yaml")  # relative paths; a generated dataset and toy zoo
    assert (cfg.storage.output_dir, cfg.storage.clip_cache) == (str(home / "outputs"), str(home / "cache" / "clips"))
    assert cfg.storage.ray_results.startswith(str(home))
    assert cfg.data.root == str(home / "data" / "synth")  # generated: written by the run
    assert cfg.models.toy_zoo.dir == str(home / "zoo")
    assert (cfg.models.teacher.name, cfg.models.student.name) == (str(home / "zoo" / "teacher"),
                                                                   str(home / "zoo" / "student"))
    assert cfg.models.assistant.path == str(home / "zoo" / "assistant.pth")
    assert cfg.models.assistant.config == str(home / "zoo" / "assistant_config.json")
    assert resolve_tracking_uri(cfg.tracking) == f"sqlite:///{home / 'mlflow.db'}"
    shipped = load_config(EXPERIMENTS_DIR / "default.yaml", ["data.root=videos", "data.synthetic=null"])
    assert shipped.data.root == str(job / "videos")  # read, not written: the job's copy is right

    monkeypatch.chdir(tmp_path)  # anywhere else the working directory is the base, as always
    cfg = load_config(EXPERIMENTS_DIR / "default.yaml")
    assert cfg.storage.output_dir == str(tmp_path / "outputs") and cfg.models.toy_zoo.dir == str(tmp_path / "zoo")
    assert resolve_tracking_uri(cfg.tracking) == f"sqlite:///{tmp_path / 'mlflow.db'}"

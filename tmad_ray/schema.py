"""Every key of an experiment: the sections of the YAML as pydantic v2 models, with defaults, bounds
and the checks that need several keys (``tmad_ray.config`` loads a file into ``Config``).

Every section forbids unknown keys, so a typo fails before Ray starts, naming the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tmad_ray.recipe import SEARCHABLE, parse_layer_set


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # NaN and inf refused


class SynthConfig(_Strict):
    """The embedded default dataset, generated into ``data.root`` when it is missing."""

    seed: int = 0
    videos_per_class: int = Field(24, ge=3)  # one each for train, val, test
    size: int = Field(64, ge=16, le=1024)
    frames: int = Field(32, ge=8, le=512)
    # videos per class in each split, instead of videos_per_class split 60/20/20
    per_split: dict[Literal["train", "val", "test"], int] | None = None


class DataConfig(_Strict):
    root: str = "data/synth"
    label_mode: Literal["as_is", "first", "binary"] = "as_is"
    # No val.csv: a seeded, stratified split of train (docs/guide.md, "Data").
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    num_frames: int = Field(16, ge=1, le=512)
    sampling: Literal["stride", "segment"] = "stride"
    sampling_rate: int = Field(4, ge=1)
    image_size: int = Field(224, ge=8)
    # Train views are stored as squares of this side so the worker can random-crop image_size.
    train_short_side: int | None = None
    # Temporal views per training video and epoch, drawn once per study (seeded) and cached.
    train_views: int = Field(2, ge=1, le=64)
    # A pool of views cached per video, train_views of them drawn each epoch (long videos); None: no pool.
    train_view_pool: int | None = Field(None, ge=1, le=256)
    eval_clips: int = Field(2, ge=1, le=32)
    eval_crops: Literal[1, 3] = 3
    seed: int = 0
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    decode_timeout_s: float = Field(120.0, gt=0)
    # Decode tasks (actors) in the Ray Data pipeline; None = every CPU Ray has.
    decode_concurrency: int | None = Field(None, ge=1)
    synthetic: SynthConfig | None = None

    @model_validator(mode="after")
    def _short_side(self) -> "DataConfig":
        if self.train_short_side is None:
            # The usual 256/224 ratio of video recipes.
            object.__setattr__(self, "train_short_side", round(self.image_size * 8 / 7))
        if self.train_view_pool is not None and self.train_view_pool < self.train_views:
            raise ValueError(f"data.train_view_pool ({self.train_view_pool}) must be >= data.train_views "
                             f"({self.train_views}): the pool is what each epoch's views are drawn from")
        if self.train_short_side < self.image_size:
            raise ValueError(
                f"data.train_short_side ({self.train_short_side}) must be >= data.image_size ({self.image_size})"
            )
        return self


    @property
    def cached_train_views(self) -> int:
        """Views cached per training video: the pool when there is one."""
        return self.train_view_pool or self.train_views


class TeacherConfig(_Strict):
    # A hub name (MCG-NJU/videomae-base) or a local directory written by save_pretrained.
    name: str = "MCG-NJU/videomae-base"


class AssistantConfig(_Strict):
    """An AMD checkpoint: from ``path`` if given, else from the zoo (downloaded with gdown)."""

    arch: Literal["vit-s", "vit-b"] | None = "vit-s"
    dataset: Literal["ssv2", "k400"] = "ssv2"
    kind: Literal["finetune", "pretrain"] = "finetune"
    path: str | None = None
    # A VideoMAEConfig JSON for sizes other than vit-s / vit-b (the head count is not in the weights).
    config: str | None = None
    sha256: str | None = None

    @model_validator(mode="after")
    def _arch_or_config(self) -> "AssistantConfig":
        if self.arch is None and self.config is None:
            raise ValueError("models.assistant needs `arch` (vit-s|vit-b) or `config` (a VideoMAEConfig JSON)")
        return self


class StudentConfig(_Strict):
    """Exactly one of: ``name`` (hub / local dir), ``size`` (preset), or depth+width+heads."""

    name: str | None = None
    size: Literal["vit-tiny", "vit-s", "vit-b"] | None = None
    depth: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=8)
    heads: int | None = Field(None, ge=1)
    patch_size: int = Field(16, ge=1)
    tubelet_size: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        explicit = [self.depth, self.width, self.heads]
        given = [self.name is not None, self.size is not None, any(v is not None for v in explicit)]
        if sum(given) != 1:
            raise ValueError("models.student needs exactly one of: name, size, or depth+width+heads")
        if any(v is not None for v in explicit):
            if not all(v is not None for v in explicit):
                raise ValueError("models.student: depth, width and heads go together")
            if self.width % self.heads:
                raise ValueError(f"models.student.width ({self.width}) must be divisible by heads ({self.heads})")
        return self


class ToyZooConfig(_Strict):
    """The toy zoo of the embedded default, trained into ``dir`` when it is missing (tmad-ray zoo)."""

    dir: str = "zoo"
    seed: int = 0
    clips_per_class: int = Field(200, ge=4)
    epochs: int = Field(12, ge=1)
    # the zoo's tokenization (the student's too when it is the zoo's pretrained one)
    patch_size: int = Field(8, ge=1)
    tubelet_size: int = Field(2, ge=1)
    # A pretrained student (``<dir>/student``), masked-autoencoder pretrained on unlabeled clips of the
    # generator's direction task: the embedded default fine-tunes it through models.student.name.
    student: "ToyStudentConfig | None" = None


class ToyStudentConfig(_Strict):
    depth: int = Field(4, ge=1)
    width: int = Field(96, ge=8)
    heads: int = Field(3, ge=1)
    clips: int = Field(400, ge=8)       # unlabeled pretraining clips (~25 s for 12 epochs on 2 cores)
    epochs: int = Field(12, ge=1)
    mask_ratio: float = Field(0.75, gt=0, lt=1)


ToyZooConfig.model_rebuild()


class ModelsConfig(_Strict):
    toy_zoo: ToyZooConfig | None = None
    teacher: TeacherConfig = TeacherConfig()
    assistant: AssistantConfig = AssistantConfig()
    student: StudentConfig = StudentConfig(size="vit-s")
    cache_dir: str = "~/.cache/tmad_ray"


class DistillConfig(_Strict):
    alpha: float = Field(1.0, ge=0)
    beta: float = Field(1.0, ge=0)
    gamma: float = Field(0.5, ge=0)
    delta: float = Field(0.5, ge=0)
    temperature: float = Field(4.0, gt=0)
    teacher_weight: float = Field(1.0, ge=0)
    assistant_weight: float = Field(0.8, ge=0)
    align_layers: list[int] = [-1, -2, -3]
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Query rows sampled for the attention term (None = all tokens).
    attn_query_tokens: int | None = Field(None, ge=1)
    # False: δ is logit KD alone (from frozen models whose classifier has the dataset's labels), no relations.
    relations: bool = True
    # Pooled token grid of the asymmetric relational term: time steps x (space x space) cells.
    asym_time: int | None = Field(None, ge=1)
    asym_space: int = Field(4, ge=1)
    cache_targets: bool = False
    # With cache_targets: K fixed augmentations (crop + flip) per cached view, each with its targets.
    target_views: int = Field(2, ge=1, le=16)
    # The study refuses to build a target cache larger than this (its size is printed first).
    target_cache_max_gb: float = Field(20.0, gt=0)
    # Each training worker keeps at most this much of the target cache in memory (least recently used first out).
    target_cache_reader_mb: int = Field(1024, ge=1)

    @field_validator("align_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v or 0 in v:
            raise ValueError("align_layers must be non-empty 1-based (or negative) block indices")
        return v


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)  # clips per worker per step: the global batch is this × num_workers
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    decay_all_params: bool = False  # True: biases and norms decay too (tmad_ray's old way; for ablations)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    flip: bool = True
    seed: int = 0
    max_failures: int = Field(2, ge=0)
    # A worker holds its clips in memory when they fit (a full permutation each epoch), else streams them.
    hold_in_memory_mb: int = Field(2048, ge=0)
    # Streaming: this many clips' worth of videos are shuffled together (about two windows in memory).
    shuffle_window_clips: int = Field(64, ge=1)
    num_to_keep: int = Field(2, ge=1)  # checkpoints kept per run: the best by search.metric and the latest
    worker_resources: dict[str, float] = {}  # custom Ray resources each worker needs too: on nodes that have them


def _check_bounds(name: str, v: list[float]) -> list[float]:
    if len(v) != 2 or not (0 < v[0] <= v[1]):
        raise ValueError(f"{name} must be [low, high] with 0 < low <= high (log-uniform), got {v}")
    return v


class SearchConfig(_Strict):
    num_samples: int = Field(6, ge=1)
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    seed: int = 0
    algorithm: Literal["tpe", "nsga2"] = "tpe"
    # TPE's random trials before it models results; null: a third of num_samples (at least 2).
    startup_trials: int | None = Field(None, ge=1)
    objectives: list[str] | None = None
    alpha: list[float] = [0.3, 3.0]
    beta: list[float] = [0.1, 10.0]
    gamma: list[float] = [0.01, 3.0]
    delta: list[float] = [0.01, 3.0]
    temperature: list[float] = [1.0, 8.0]
    lr: list[float] | None = None
    align_layer_sets: list[str] = ["-1", "-1,-2", "-1,-2,-3", "-1,-4,-8"]
    student_depths: list[int] | None = None  # also search a depth/width/heads student's depth
    # Recipes to try first (Tune's points_to_evaluate), e.g. the reference framework's or your own.
    points_to_evaluate: list[dict[str, float | str]] = []
    # Train the k best trials' recipes on confirm_seeds more seeds; export the best mean's (0: off).
    confirm_top_k: int = Field(0, ge=0)
    confirm_seeds: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    # Students trained side by side in one Ray Train run, sharing batches and frozen forwards (1: each
    # trial alone); a cohort starts with fewer once no trial has joined for cohort_wait_s.
    cohort_size: int = Field(1, ge=1)
    cohort_wait_s: float = Field(5.0, ge=0)
    controller_failure_limit: int = Field(3, ge=0)

    @field_validator("alpha", "beta", "gamma", "delta", "temperature", "lr")
    @classmethod
    def _bounds(cls, v: list[float] | None, info) -> list[float] | None:
        return None if v is None else _check_bounds(f"search.{info.field_name}", v)

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        if self.startup_trials is not None and self.startup_trials > self.num_samples:
            raise ValueError(f"startup_trials ({self.startup_trials}) must be at most num_samples "
                             f"({self.num_samples}): TPE would never model a result")
        if self.student_depths is not None and (not self.student_depths or min(self.student_depths) < 1):
            raise ValueError("student_depths must list depths >= 1")
        known = {"val_accuracy", "val_macro_f1", "val_loss", "student_latency_ms", "student_params_m"}
        if self.objectives is not None and (not self.objectives or set(self.objectives) - known):
            raise ValueError(f"objectives must be among {sorted(known)}")
        if bad := {k for point in self.points_to_evaluate for k in point} - set(SEARCHABLE):
            raise ValueError(f"points_to_evaluate: unknown keys {sorted(bad)}; use {sorted(SEARCHABLE)}")
        if self.confirm_top_k and self.objectives and len(self.objectives) > 1:
            raise ValueError("confirm_top_k ranks recipes by one metric; with several objectives the study "
                             "returns a Pareto front: set confirm_top_k: 0")
        return self

    @field_validator("align_layer_sets")
    @classmethod
    def _sets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("align_layer_sets must list at least one layer set")
        for s in v:
            parse_layer_set(s)
        return v


class TrackingConfig(_Strict):
    # MLFLOW_TRACKING_URI, when set, wins over this (the MLflow convention).
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "tmad_ray"
    registered_model: str = "tmad_ray_student"


class StorageConfig(_Strict):
    clip_cache: str = "cache/clips"
    ray_results: str = "ray_results"
    output_dir: str = "outputs"


class FaultsConfig(_Strict):
    """Test-only fault injection, so tests can exercise the recovery paths. Leave empty."""

    # Decoding a video whose path contains one of these strings sleeps forever.
    hang_decode_on: list[str] = []
    # Training: the worker of this rank exits abruptly at this (epoch, step), once per output_dir.
    kill_worker_at: tuple[int, int] | None = None
    kill_worker_rank: int = 1


def relation_grid_problem(asym_time: int | None, asym_space: int, token_time: int, token_side: int) -> str | None:
    """Why the relational term (δ) would be exactly 0 on this grid, or None.

    Relations are similarities between cells; with one cell per row the softmax is 1 whatever the
    features are, and the KL is 0: the term would teach nothing while the search tunes its weight."""
    time, space = min(asym_time or token_time, token_time), min(asym_space, token_side)
    if space < 2:
        return (f"the relational term's grid has {space} spatial cell per side (distill.asym_space={asym_space}, "
                f"{token_side} tokens per side): spatial relations would be 1x1 and the term exactly 0; "
                "use distill.asym_space >= 2")
    if time < 2:
        return (f"the relational term's grid has {time} time step (distill.asym_time={asym_time}, {token_time} "
                "token time steps = data.num_frames / tubelet_size): temporal relations would be 1x1 and the "
                "term exactly 0; use distill.asym_time >= 2 (or null) and at least 2 tubelets of frames")
    return None


class Config(_Strict):
    name: str = "tmad"
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _relation_grid(self) -> "Config":
        s = self.models.student
        if self.distill.delta > 0 and self.distill.relations and s.name is None:  # a hub student's patch size is checked when it loads
            problem = relation_grid_problem(self.distill.asym_time, self.distill.asym_space,
                                            self.data.num_frames // s.tubelet_size, self.data.image_size // s.patch_size)
            if problem:
                raise ValueError(f"distill.delta={self.distill.delta}: {problem}")
        return self

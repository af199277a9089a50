# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
PIP_VERSION := 26.3
PIP_TOOLS := pip-tools==7.7.0
# torch's exact build comes from the lock (the CPU wheel on this kind of machine)
TORCH = $(shell grep -m1 '^torch==' $(LOCK))

.DELETE_ON_ERROR:  # a set-up step that failed leaves no target behind, so the next make runs it again
.PHONY: demo test test-fast bench bench-quality bench-setup bench-ttq bench-peer bench-cohort bench-gpu rehearse venv browser clean screenshots lock lock-check

# One line and exit 1 when the lock is stale (pyproject.toml edited) or was made for another Python.
lock-check:
	@$(PY) tools/lock.py check

# Exact versions of everything the set-up installs, resolved by pip (the same resolver, indexes and
# local wheels that install them) from pyproject.toml's ranges, its extras and build requirements.
lock:
	test -x .venv-lock/bin/pip-compile || { $(PY) -m venv .venv-lock && .venv-lock/bin/pip install -q pip==$(PIP_VERSION) $(PIP_TOOLS); }
	.venv-lock/bin/pip-compile -q --all-extras --all-build-deps --allow-unsafe --strip-extras --no-emit-options \
	  --constraint tools/torch-cpu.txt --output-file $(LOCK) pyproject.toml
	$(PY) tools/lock.py stamp

$(BIN)/tmad-ray: pyproject.toml $(LOCK)
	@$(PY) tools/lock.py check
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	# torch first, alone: pip then keeps this build instead of pulling a multi-GB CUDA one.
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(BIN)/tmad-ray

demo: venv
	$(BIN)/python tune.py

# The browser test drives Debian's Chromium (Playwright cannot download its own browser here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: venv browser
	$(BIN)/python -m pytest -q --durations=25

test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration"

bench: venv
	$(BIN)/tmad-ray bench data --config experiments/xd_violence.yaml --out bench/data.json
	$(BIN)/tmad-ray bench step --config experiments/default.yaml --out bench/step.json
	$(BIN)/tmad-ray bench search --config experiments/default.yaml --out bench/search.json  # ~22 min here
	$(BIN)/tmad-ray bench startup --out bench/startup.json  # ~5 min: the floor under a trial's start-up

# A study on the quality task (200 val videos), then its best recipe against CE-only fine-tuning, the
# reference framework's defaults, logit KD and one ablation per term: 5 paired seeds, 95 % CIs.
bench-quality: venv
	$(BIN)/python tune.py --config experiments/quality.yaml
	$(BIN)/tmad-ray bench quality --config experiments/quality.yaml --seeds 0,1,2,3,4 --out bench/quality.json

# The training set-up's differences from a plain HF Trainer, each on its own, on the reference recipe:
# weight decay on the quality task; a pool of cached views on the same task with 96-frame videos
# (with 32 frames a 16 x 2 clip has only 2 starts, so a pool could add nothing there).
bench-setup: venv
	$(BIN)/tmad-ray bench quality --config experiments/quality.yaml --recipe config --seeds 0,1,2,3,4 \
	  --variants reference_default,reference_decay_all --out bench/setup_decay.json
	$(BIN)/tmad-ray bench quality --config experiments/quality.yaml --recipe config --seeds 0,1,2,3,4 \
	  --variants reference_default,reference_view_pool --out bench/setup_view_pool.json \
	  data.root=data/quality96 data.synthetic.frames=96

# tune.py against the seed's way: time to first reach fixed val accuracies, both sides from their own
# start, and the chosen recipes' test accuracy; 5 seeds, the same recipes on both sides (~1.5 h here).
bench-ttq: venv
	$(BIN)/tmad-ray bench time-to-quality --seeds 0,1,2,3,4 --out bench/time_to_quality.json

# tune.py against the pipeline a user would write instead (HF Trainer + hyperparameter_search with
# Optuna, decoding per item, no Ray): the same recipes, models and losses, 5 seeds (~18 min a seed here).
bench-peer: venv
	$(BIN)/tmad-ray bench peer --config experiments/default.yaml --seeds 0,1,2,3,4 --out bench/peer.json

# The xd_violence path at real shapes (16x224², ViT-B teacher, AMD ViT-S assistant, ViT-S student,
# 2 DDP workers, grad_accum 2) on 12 generated videos, 2 trials of 1 epoch through tune.py.
rehearse: venv
	$(BIN)/tmad-ray rehearse --out bench/rehearse.json --dir rehearse

# On a machine with a GPU (a few minutes).
# Cohort trials (search.cohort_size): a step at K = 1, 2, 4, 8 (~10 min), then time to quality in
# cohorts of 3 against the seed's way, 5 seeds (~35 min).
bench-cohort: venv
	$(BIN)/tmad-ray bench cohort --out bench/cohort.json
	$(BIN)/tmad-ray bench time-to-quality --seeds 0,1,2,3,4 --out bench/time_to_quality_cohort3.json search.cohort_size=3

bench-gpu: venv
	$(BIN)/tmad-ray bench gpu --out bench/gpu.json

# The README's MLflow screenshots (docs/img), from the browser test's smoke study.
screenshots: venv browser
	TMAD_RAY_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q tests/test_search.py -k "browser"

clean:
	rm -rf $(VENV) .venv-lock data cache ray_results outputs mlflow.db mlruns zoo zoo_smoke rehearse .pytest_cache

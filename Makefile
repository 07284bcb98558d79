# yolo-edge: every target is one CLI call. `make` alone lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/yolo-edge
RECIPE ?= models/default.yaml
ARGS ?=
PYTEST_ARGS ?=
# the cores this process may use, at most 4 (nproc alone would follow OMP_NUM_THREADS: one worker when it is 1)
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
NIGHTLY_EPOCHS ?= 60
export PYTHONDONTWRITEBYTECODE := 1
# the stages, read from the stage registry (pipeline/stages/order.py), in the order a run takes them
STAGES := $(shell sed -n 's/^STAGES = (\(.*\))$$/\1/p' pipeline/stages/order.py | tr -d '",')

.DEFAULT_GOAL := help
.PHONY: help venv pipeline test test-heavy test-fast status report base sparse $(STAGES) deploy lint clean check-report check-trt modelopt-venv profile history nightly heldout gate baseline compare

help: ## list the targets
	@grep -hE '^[a-z][a-z -]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([^:]*):.*## (.*)/\1\t\2/' | \
	  awk -F'\t' '{n = split($$1, t, " "); for (i = 1; i <= n; i++) printf "  make %-12s %s\n", t[i], $$2}'
	@for s in $(STAGES); do printf "  make %-12s %s\n" $$s "run the $$s stage of RECIPE (the stages before it must have run)"; done

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[train,dev]'
	@touch $@

venv: $(VENV)/.installed ## create the virtual environment (.venv) with everything installed

pipeline: venv ## run the whole pipeline on the default recipe (offline, CPU): runs/default/report.json
	$(CLI) run --recipe $(RECIPE) $(ARGS)

test: venv ## run the test suite, one pytest-xdist worker per core (at most 4; TEST_WORKERS=1: one worker), all but the heavy fault scenarios
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not heavy" $(PYTEST_ARGS)

test-heavy: venv ## the scenarios that take minutes (Ctrl-C and kill -9 in each stage in turn, a full disk, a read-only run dir: tmpfs mounts need root; a YOLO26 through every stage)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m heavy $(PYTEST_ARGS)

test-fast: venv ## the sub-minute inner loop: every test not marked slow (no training, no stage runs through the CLI)
	$(PY) -m pytest -q -m "not slow and not heavy" $(PYTEST_ARGS)

$(STAGES): venv  # one target per stage
	$(CLI) stage $@ --recipe $(RECIPE) $(ARGS)

HOSTS ?=
deploy: venv ## bundle, then copy + install + bench on each Jetson over ssh (HOSTS="user@jetson [name=user@host:port ...]"), merged into runs/<run>/report.json under "devices"
	@test -n "$(HOSTS)" || { echo "make deploy needs HOSTS='user@jetson [name=user@host:port ...]'" >&2; exit 2; }
	$(CLI) deploy --recipe $(RECIPE) $(foreach h,$(HOSTS),--host $(h)) $(ARGS)

nightly: venv ## the nightly matrix (benchmarks/matrix.yaml: default ~6 min + 60-epoch fine-tune ~33 min on 2 cores), recorded in benchmarks/history.db, gated against benchmarks/baselines/ (exit 2 on a regression, an unexplained gain or a missing variant/device)
	$(CLI) nightly --matrix benchmarks/matrix.yaml --history $(HISTORY) $(ARGS)

report: venv ## re-render runs/<run>/report.json, report.md, tradeoff.png, history.png and report.html from the last bench
	$(CLI) report --recipe $(RECIPE) --history $(HISTORY) $(ARGS)

status: venv ## list the stages of the default run and their state
	$(CLI) status --recipe $(RECIPE) $(ARGS)

base: venv ## retrain the shipped base (models/base/yolo11n-synth-next.pt): 60+60+15 (nbs 64) + 60 (nbs 16) + 5x60 + 90 + 150 + 150 (fine-tune settings) = 885 epochs and a 150-epoch convergence check, ~8 h on 2 cores; phases appended to base.phases continue the shipped weights (ARGS="--set base.device=0 --set base.workers=8" on a GPU: ~3 s an epoch on an H100, ~28 s on 2 CPU cores); RECIPE=models/bccd.yaml (bccd-s.yaml): the BCCD YOLO11n (YOLO11s) base, 160 (80) epochs at 416 px, ~2 s an epoch on an H200, ~30 s on 2 cores
	$(CLI) base --recipe $(RECIPE) $(ARGS)

sparse: venv ## retrain the shipped sparsity-trained weights the default prune cuts (prune.sparsity; models/base/yolo11n-synth-next.sparse.pt): 90 epochs of group regularization, a 150-epoch phase fading the planned cut's channels out and 150 epochs with them held at zero, ~3.7 h on 2 cores (ARGS="--set prune.sparsity.device=0 --set prune.sparsity.workers=8" on a GPU: ~4.5 s an epoch on an H100; only the phases that changed when the shipped file holds the ones before)
	$(CLI) sparsify --recipe $(RECIPE) $(ARGS)

check-report: venv ## verify runs/default/report.json with ../shared/tools/check-report (pycocotools alone)
	$(PY) ../shared/tools/check-report runs/default

heldout: venv ## score runs/default's base and pruned models on a fresh synthetic split (another seed, 600 images) the pipeline never saw: runs/default/heldout.json
	$(PY) benchmarks/heldout.py --run runs/default $(ARGS)

profile: venv ## where the time goes: ONNX Runtime op-type profile of base vs pruned (runs/default)
	$(PY) benchmarks/profile_ort.py runs/default 20

history: venv ## record the latest runs/default results in benchmarks/history.db (HISTORY=...; idempotent)
	$(CLI) history record runs/default --history $(HISTORY)

check-trt: venv ## check an ONNX file against TensorRT's operator table and rules: make check-trt FILE=model.onnx [TRT=10.3|10.6|11]
	@test -n "$(FILE)" || { echo "make check-trt needs FILE=model.onnx [TRT=10.3|10.6|11]" >&2; exit 2; }
	$(CLI) check-trt $(FILE) --trt $(TRT)

modelopt-venv: ## NVIDIA ModelOpt in its own venv (.venv-modelopt) for quantize.backend=modelopt
	@test -x .venv-modelopt/bin/python || python3 -m venv .venv-modelopt
	.venv-modelopt/bin/python -m pip install -q --upgrade pip
	.venv-modelopt/bin/python -m pip install -q torch==2.14.1 'nvidia-modelopt[onnx]'

lint: venv ## ruff
	$(VENV)/bin/ruff check pipeline tests benchmarks

clean: ## remove run directories (keeps the venv)
	rm -rf runs .pytest_cache

HISTORY ?= benchmarks/history.db
TRT ?= 10.3
RUN ?= runs/default

gate: venv ## compare a run with its baseline (RUN=runs/default; exit 2 on a regression, an unexplained gain, a missing variant or device)
	$(CLI) gate $(RUN) $(ARGS)

compare: venv ## variants of different runs side by side, re-timed together: make compare ENTRIES="runs/bccd:base-fp32 runs/bccd-s:pruned-fp32" (runs/compare/compare.{json,md})
	@test -n "$(ENTRIES)" || { echo "make compare needs ENTRIES='RUN:VARIANT RUN:VARIANT ...'" >&2; exit 2; }
	$(CLI) compare $(ENTRIES) $(ARGS)

baseline: venv ## rewrite RUN's baseline from its report.json: make baseline RUN=runs/default REASON='why'
	@test -n "$(REASON)" || { echo "make baseline needs REASON='why the references change'" >&2; exit 2; }
	$(CLI) baseline update --run-dir $(RUN) --reason "$(REASON)" $(ARGS)

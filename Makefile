# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-fast demo bench quality server pool worker deploy clean

# (Re)install when the project metadata changes; reuses an existing venv.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Everything CI needs; pytest's exit 5 ("no tests collected") fails like any other error.
test: lint
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/weakseg demo

# Speed and memory benchmarks (JSON on stdout); the quality table is `make quality`.
BENCHES ?= model shard train segment postprocess scale batching listing host_pipeline memory
bench: $(STAMP)
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

# The accelerator check of issue 15 (docs/benchmarks.md): one JSON document, under 5 minutes on a
# lent GPU; ARGS=--quick for a small CPU run.
.PHONY: bench-gpu
bench-gpu:
	bench/gpu.sh $(ARGS)

# Quality tables (docs/quality.md): three fresh weak trainings per data set (tags only; every
# setting was chosen on the dev split cut from MSRC train), scored once on the val split,
# with the CLI's default chain through segment-corpus + evaluate, and on the val photos
# shrunk to half their side (small objects); then the supervised ceiling of each data set.
# The --refine runs reuse the trainings and add the refinement stage. EfficientNet-Lite2, bf16 where
# the CPU has it (bench/quality.py). About 3 hours on 2 CPU cores. Writes quality-output/.
quality: $(STAMP)
	$(BIN)/python bench/quality.py --dataset msrc21-objects --split val
	$(BIN)/python bench/quality.py --dataset msrc21-objects --split val --refine
	$(BIN)/python bench/quality.py --dataset msrc21 --split val
	$(BIN)/python bench/quality.py --dataset msrc21 --split val --refine
	$(BIN)/python bench/supervised.py --backbone tf_efficientnet_lite2 --out quality-output/supervised.pt --weak-quality quality-output/msrc21/quality-val-refined.json
	$(BIN)/python bench/supervised.py --backbone tf_efficientnet_lite2 --dataset msrc21-objects --out quality-output/supervised-objects.pt --weak-quality quality-output/msrc21-objects/quality-val-refined.json

# Local Prefect stack (see infra/README.md): a server on 127.0.0.1 with SQLite, a process
# worker on the pool the deployments use, and the deployments of prefect.yaml.
PREFECT_API_URL ?= http://127.0.0.1:4200/api
POOL ?= weakseg-process

server: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect server start --host 127.0.0.1

# The work pool the deployments name, created when missing (never changed when it exists):
# `make deploy` and `make worker` each work first.
pool: $(STAMP)
	@PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 \
	  || PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool create $(POOL) --type process

worker: pool
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect worker start --pool $(POOL)

deploy: pool
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect --no-prompt deploy --all

clean:
	rm -rf $(VENV) demo-output quality-output .pytest_cache .ruff_cache

# ftkit — `make demo` trains the embedded default; `make test` runs the test suite.
# Both create .venv and install the locked, CI-tested dependency set on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact versions CI tested (`make lock` rewrites it), and the lower-bound set (`make lock-oldest`);
# setup.cfg keeps ranges for `pip install ftkit` into another stack. See docs/dependencies.md.
LOCK := requirements/lock.txt
OLDEST := requirements/oldest.txt
# Every extra the test suite exercises. The oldest set leaves out `bench` (TRL needs newer
# transformers, accelerate and datasets than ftkit's lower bounds).
EXTRAS := dev,quant,deepspeed,bench
OLDEST_EXTRAS := dev,quant,deepspeed
# -q: an ftkit error stays the last line on screen (no Accelerate traceback after it); with
# several processes `ftkit launch` does the same for torchrun's failure report.
ACCELERATE := $(PY) -m accelerate.commands.launch -q
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Without a GPU, torch's CPU build goes in first (a bare `torch` pulls a multi-GB CUDA build), at
# the lock's version; override with `make TORCH_CPU_SPEC=...`.
TORCH_CPU_SPEC ?= $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' $(LOCK))
# CPU runs: name the thread count Accelerate would pick (one per core), so it does not print its
# "values were not passed" block.
CPU_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
# `make train-ddp` runs the 2-GPU DDP config; without GPUs the same two processes use CPU + gloo.
DDP_CPU_FLAGS := $(if $(HAS_GPU),,--mixed_precision no)
DDP_CPU_ENV := $(if $(HAS_GPU),,ACCELERATE_USE_CPU=true)
RECIPE_ARGS ?=

SHARED_ALPACA := ../shared/data/alpaca_5000.json

.PHONY: install demo test test-fast test-oldest lock lock-oldest train train-ddp lint format \
	compare-lora bench bench-throughput bench-peers bench-data ablation planner-grid estimate plan-check \
	gpu-check device-files clean

install: $(VENV)/.installed

# pip, torch (CPU build without a GPU), then the project with every extra, all held to the lock;
# the last step proves the venv is the lock (`installed exactly requirements/lock.txt: ...`).
$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(if $(HAS_GPU),,$(PY) -m pip install -q -c $(LOCK) "$(TORCH_CPU_SPEC)")
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) scripts/lock.py check $(LOCK)
	touch $@

demo: install
	$(ACCELERATE) --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process $(CPU_THREADS) \
		recipes/alpaca_lora.py $(RECIPE_ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install  # the inner loop: everything but the subprocess/integration tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The lower bounds: the fast suite and the peer benchmark's rows (HF Trainer + PEFT, the bare
# loop) in a venv of exactly requirements/oldest.txt (CI runs it after `make test`).
OLDEST_VENV := .venv-oldest
PEER_SMOKE := tests/test_peers.py::test_ftkit_hf_trainer_and_bare_loop_train_identical_supervised_tokens
test-oldest: $(OLDEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q -m "not slow"
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q $(PEER_SMOKE)

$(OLDEST_VENV)/.installed: setup.cfg pyproject.toml $(OLDEST)
	rm -rf $(OLDEST_VENV) && $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST) pip
	DS_BUILD_OPS=0 $(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST) -e ".[$(OLDEST_EXTRAS)]"
	$(OLDEST_VENV)/bin/python scripts/lock.py check $(OLDEST)
	touch $@

# The upgrade path, one deliberate commit: resolve the newest versions setup.cfg allows in a
# fresh venv (torch stays $(TORCH_CPU_SPEC)), run the whole suite there, and only when it passes
# rewrite requirements/lock.txt. Review `git diff requirements/`, then commit it.
LOCK_VENV := .venv-lock
# The locks' own tests compare the committed files with setup.cfg: they run after the freeze.
LOCK_TESTS := tests/test_dependencies.py
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_CPU_SPEC)"
	DS_BUILD_OPS=0 $(LOCK_VENV)/bin/python -m pip install -q --upgrade -e ".[$(EXTRAS)]"
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python -m pytest -q --ignore $(LOCK_TESTS)
	$(LOCK_VENV)/bin/python scripts/lock.py freeze $(LOCK) \
		--title "ftkit's locked dependency set: what \`make install\` installs and CI tests"
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python -m pytest -q $(LOCK_TESTS)

# The same for the lower bounds: setup.cfg's >= bounds pinned (`scripts/lock.py lower-bounds`),
# pip resolves the rest; rewritten when the fast suite and the peer rows pass.
lock-oldest: install
	rm -rf $(OLDEST_VENV) && $(PYTHON) -m venv $(OLDEST_VENV)
	$(PY) scripts/lock.py lower-bounds > $(OLDEST_VENV)/lower-bounds.txt
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(OLDEST_VENV)/bin/python -m pip install -q \
		-c $(OLDEST_VENV)/lower-bounds.txt -e ".[$(OLDEST_EXTRAS)]"
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q -m "not slow" --ignore $(LOCK_TESTS)
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q $(PEER_SMOKE)
	$(OLDEST_VENV)/bin/python scripts/lock.py freeze $(OLDEST) \
		--title "ftkit's lower-bound set: setup.cfg's >= bounds, tested by \`make test-oldest\`"
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q $(LOCK_TESTS)
	touch $(OLDEST_VENV)/.installed

train: install
	$(ACCELERATE) --config_file accelerate_configs/$(if $(HAS_GPU),single_gpu_fp16.yaml,cpu.yaml \
		--num_cpu_threads_per_process $(CPU_THREADS)) recipes/alpaca_lora.py $(RECIPE_ARGS)

train-ddp: install
	$(DDP_CPU_ENV) $(PY) -m ftkit launch --output_dir outputs/tiny-llama-lora-ddp $(RECIPE_ARGS) \
		-- --config_file accelerate_configs/ddp_2gpu_fp16.yaml $(DDP_CPU_FLAGS)

compare-lora: install
	$(PY) -m ftkit compare --output_dir outputs/lora-parity

ablation: install
	$(PY) -m ftkit ablation --dataset $(SHARED_ALPACA) --output_dir outputs/ablation

bench: install
	$(PY) -m ftkit bench --dataset $(SHARED_ALPACA) --output_dir outputs/bench

bench-throughput: install  # padded vs grouped vs padding-free, full vs supervised logits
	$(PY) -m ftkit.lab.throughput --dataset $(SHARED_ALPACA) \
		--tokenizer ../shared/fixtures/llama2-tokenizer \
		--output_dir outputs/throughput --results_dir results/throughput-cpu

# ftkit vs TRL's SFTTrainer, HF Trainer + PEFT and a bare loop (issue 12); TRL comes from the
# bench extra (locked and installed with the others), never a core dependency. A quick smoke run:
#   make bench-peers PEERS_ARGS="--steps 3 --rounds 1 --records 64 --hidden 128 --layers 2"
PEERS_ARGS ?=
bench-peers: install
	HF_HUB_OFFLINE=1 $(PY) -m ftkit.lab.peers --dataset $(SHARED_ALPACA) \
		--tokenizer ../shared/fixtures/llama2-tokenizer \
		--output_dir outputs/peers --results_dir results/peers-$(if $(HAS_GPU),gpu,cpu) $(PEERS_ARGS)

# Preprocessing at scale (docs/data.md): time to the first step and peak memory of `ftkit train`
# for 5 k, 52 k and 500 k Alpaca records (made from the shared file under outputs/databench),
# 1 and 2 processes, first and second start. Rows of older code, e.g. a worktree of it:
#   make bench-data DATA_BENCH_ARGS="--label before --src ../old/src --runs 52000x1,52000x2"
DATA_BENCH_ARGS ?=
bench-data: install
	HF_HUB_OFFLINE=1 $(PY) -m ftkit.lab.databench --dataset $(SHARED_ALPACA) \
		--tokenizer ../shared/fixtures/llama2-tokenizer \
		--output_dir outputs/databench --results_dir results/data-cpu $(DATA_BENCH_ARGS)

planner-grid: install  # the planner vs measured peaks at a 32k vocabulary: results/planner-cpu
	$(PY) -m ftkit ablation --grid planner-32k --jobs 2 --output_dir outputs/planner-32k \
		--title "Planner validation at a 32k vocabulary"
	mkdir -p results/planner-cpu
	cp outputs/planner-32k/ablation.md outputs/planner-32k/ablation.json \
		outputs/planner-32k/ablation.csv outputs/planner-32k/memory.png \
		outputs/planner-32k/time.png results/planner-cpu/

estimate: install
	$(PY) -m ftkit estimate --paper

# `ftkit plan`'s step-time model against every candidate of a plan, trained side by side on this
# CPU (one process, one thread): results/plan-cpu/, which calibrates the model's CPU constants.
plan-check: install
	HF_HUB_OFFLINE=1 $(PY) -m ftkit.lab.plancheck --dataset $(SHARED_ALPACA) \
		--output_dir outputs/plan-check --results_dir results/plan-cpu

# CUDA only, ~6 min on an H200, every section in its own process under its own time limit:
# precision, memory (7B shape vs the planner), throughput (vs peers, bf16), liger, qlora, engines.
#   make gpu-check GPU_CHECK_ARGS="--sections precision,memory"   (--dry_run: toy size on CPU)
GPU_CHECK_ARGS ?=
gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) -m ftkit.lab.gpucheck --output_dir outputs/gpu-check --results_dir results \
		--dataset $(SHARED_ALPACA) --tokenizer ../shared/fixtures/llama2-tokenizer $(GPU_CHECK_ARGS)

# For scripts/device_gpu_check.sh on a lent GPU machine (docs/gpu-check.md): the packages its
# image lacks as Python 3.12 x86-64 wheels at the lock's versions (.whl/), and the shared records
# and tokenizer (.gpudata/); both folders are ignored by git and travel in the run's `carry`.
locked = $(shell sed -n 's/^\($(1)==[^ ]*\).*/\1/p' $(LOCK))
WHEEL_FLAGS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
device-files: install
	mkdir -p .whl/alt .gpudata
	$(PY) -m pip download -q $(WHEEL_FLAGS) -d .whl $(call locked,bitsandbytes) \
		$(call locked,datasets) $(call locked,dill) $(call locked,multiprocess) $(call locked,trl) \
		liger-kernel==0.8.5 hjson==3.1.0 annotated-types==0.8.0 pydantic==2.10.6 pydantic-core==2.27.2
	$(PY) -m pip download -q $(WHEEL_FLAGS) -d .whl/alt datasets==4.5.0 dill==0.4.0 multiprocess==0.70.18
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl $(call locked,deepspeed)
	cp $(SHARED_ALPACA) .gpudata/ && cp -r ../shared/fixtures/llama2-tokenizer .gpudata/

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs build dist src/*.egg-info .pytest_cache .ruff_cache $(OLDEST_VENV) $(LOCK_VENV)

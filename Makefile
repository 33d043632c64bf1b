# ftkit — `make demo` trains the embedded default; `make test` runs the test suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# -q: an ftkit error stays the last line on screen (no Accelerate traceback after it); with
# several processes `ftkit launch` does the same for torchrun's failure report.
ACCELERATE := $(PY) -m accelerate.commands.launch -q
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Without a GPU, install the CPU build of torch first (a bare `torch` pulls a multi-GB CUDA build).
TORCH_CPU_SPEC ?= torch==2.13.0
# `make train-ddp` runs the 2-GPU DDP config; without GPUs the same two processes use CPU + gloo.
DDP_CPU_FLAGS := $(if $(HAS_GPU),,--mixed_precision no)
DDP_CPU_ENV := $(if $(HAS_GPU),,ACCELERATE_USE_CPU=true)
RECIPE_ARGS ?=

SHARED_ALPACA := ../shared/data/alpaca_5000.json

.PHONY: install demo test test-fast train train-ddp lint format compare-lora bench bench-throughput bench-peers ablation planner-grid estimate gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HAS_GPU),,$(PY) -m pip install -q "$(TORCH_CPU_SPEC)")
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,quant,deepspeed]"
	touch $@

demo: install
	$(ACCELERATE) --config_file accelerate_configs/cpu.yaml recipes/alpaca_lora.py $(RECIPE_ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install  # the inner loop: everything but the subprocess/integration tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

train: install
	$(ACCELERATE) --config_file accelerate_configs/$(if $(HAS_GPU),single_gpu_fp16,cpu).yaml \
		recipes/alpaca_lora.py $(RECIPE_ARGS)

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
# bench extra, never a core dependency. A quick smoke run:
#   make bench-peers PEERS_ARGS="--steps 3 --rounds 1 --records 64 --hidden 128 --layers 2"
PEERS_ARGS ?=
bench-peers: install
	$(PY) -m pip install -q -e ".[bench]"
	HF_HUB_OFFLINE=1 $(PY) -m ftkit.lab.peers --dataset $(SHARED_ALPACA) \
		--tokenizer ../shared/fixtures/llama2-tokenizer \
		--output_dir outputs/peers --results_dir results/peers-$(if $(HAS_GPU),gpu,cpu) $(PEERS_ARGS)

planner-grid: install  # the planner vs measured peaks at a 32k vocabulary: results/planner-cpu
	$(PY) -m ftkit ablation --grid planner-32k --jobs 2 --output_dir outputs/planner-32k \
		--title "Planner validation at a 32k vocabulary"
	mkdir -p results/planner-cpu
	cp outputs/planner-32k/ablation.md outputs/planner-32k/ablation.json \
		outputs/planner-32k/ablation.csv outputs/planner-32k/memory.png \
		outputs/planner-32k/time.png results/planner-cpu/

estimate: install
	$(PY) -m ftkit estimate --paper

gpu-check: install  # CUDA only (a few minutes): fp16/bf16, CUDA peak vs planner, FSDP2/ZeRO-3, own vs PEFT
	HF_HUB_OFFLINE=1 $(PY) -m ftkit.lab.gpucheck --output_dir outputs/gpu-check --results_dir results

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs build dist src/*.egg-info .pytest_cache .ruff_cache

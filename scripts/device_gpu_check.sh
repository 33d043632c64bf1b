#!/usr/bin/env bash
# `make gpu-check` on this workplace's lent GPU machine (the device tool's `run`), whose image has
# torch, transformers, peft and accelerate but not datasets, trl, deepspeed, bitsandbytes or
# liger-kernel: those travel as wheels in .whl/ (datasets 4.5 and its dill/multiprocess in
# .whl/alt/ for a pyarrow older than 24), the Alpaca records and the LLaMA-2 tokenizer in
# .gpudata/ (both ignored by git, named in the run's `carry`). See docs/gpu-check.md.
#   run: bash scripts/device_gpu_check.sh   carry: [".whl", ".gpudata"]   timeout_s: 600
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."  # the repository root
start=$(date +%s)
new_arrow=$(python3 -c "import pyarrow; print(int(pyarrow.__version__.split('.')[0]) >= 24)")
python3 -c "import pyarrow, typing_extensions as t; print('pyarrow', pyarrow.__version__)"
wheels=$(ls .whl/*.whl)
if [ "$new_arrow" != "True" ]; then
  wheels="$(ls .whl/*.whl | grep -v -E '/(datasets|dill|multiprocess)-') $(ls .whl/alt/*.whl)"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $wheels || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "deepspeed",
             "bitsandbytes", "liger_kernel", "pydantic"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # shown, then the sections that need it say so
        print(name, "FAILED", repr(err)[:200])
PY
echo "setup: $(( $(date +%s) - start )) s"
timeout 560 python3 -m ftkit.lab.gpucheck --output_dir /tmp/gc --results_dir "$OUT" \
  --dataset .gpudata/alpaca_5000.json --tokenizer .gpudata/llama2-tokenizer \
  --sections precision,memory,throughput,liger,qlora,engines
echo "exit $? after $(( $(date +%s) - start )) s"
mkdir -p "$OUT/logs"
for f in /tmp/gc/*.log; do tail -c 200000 "$f" > "$OUT/logs/$(basename "$f")"; done
ls -la "$OUT" "$OUT"/*

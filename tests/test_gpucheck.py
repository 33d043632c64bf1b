"""``make gpu-check`` runs only on a GPU; here it runs at toy size on CPU (``--dry_run``), every
section in its own process, so the script cannot rot between the GPU runs, and its comparison and
report logic is checked on figures of the shape a GPU run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ALPACA_5000, LLAMA2_TOKENIZER
from helpers import REPO, run_python

from ftkit.lab import gpucheck

GIB = 2**30


def test_gpu_check_refuses_without_cuda_in_one_line():
    done = run_python(
        "import runpy, sys; sys.argv[1:] = ['--dataset', sys.argv[1], '--tokenizer', sys.argv[2]];"
        " runpy.run_module('ftkit.lab.gpucheck', run_name='__main__')",
        str(ALPACA_5000),
        str(LLAMA2_TOKENIZER),
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "ftkit error: gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here)"
        )
    )


def test_bad_sections_and_limits_are_one_line():
    for argv, message in (
        (["--sections", "precision,speed"], r"unknown \['speed'\]"),
        (["--limit", "memory=soon"], "give SECTION=SECONDS"),
    ):
        with pytest.raises(gpucheck.FtkitError, match=message):
            gpucheck.main(["--dry_run", "--dataset", str(ALPACA_5000),
                           "--tokenizer", str(LLAMA2_TOKENIZER), *argv])  # fmt: skip


@pytest.mark.slow
def test_the_dry_run_runs_every_section_and_survives_one_that_hangs(tmp_path):
    """Every section at toy size; liger (a skip on CPU) held to 0.1 s, so it is killed: the
    others still report, and the files are complete after each section."""
    done = subprocess.run(
        [sys.executable, "-m", "ftkit.lab.gpucheck", "--dry_run",
         "--output_dir", str(tmp_path / "out"), "--results_dir", str(tmp_path / "results"),
         "--dataset", str(ALPACA_5000), "--tokenizer", str(LLAMA2_TOKENIZER),
         "--limit", "liger=0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "results" / "gpu-cpu-dry-run"
    figures = json.loads((results / "gpu_check.json").read_text())["sections"]
    assert sorted(figures) == sorted(gpucheck.SECTIONS)
    assert figures["liger"]["error"].startswith("timed out after 0 s")
    precision = {r["precision"]: r for r in figures["precision"]["rows"]}
    assert precision["fp16"]["result"] == "not run: fp16 AMP needs CUDA"
    assert precision["bf16"]["steps"] == gpucheck.DRY_RUN.toy_steps
    assert precision["bf16"]["attn_kernels"] == ["per-sequence sdpa"]
    for section in ("memory", "qlora"):
        (cell,) = figures[section]["cells"]
        assert cell["tensors_error"] is None and abs(cell["total_error"]) < 1  # CPU: total only
    assert [r["system"] for r in figures["throughput"]["table"]] == list(gpucheck.DRY_RUN.systems)
    engines = {r["engine"]: r for r in figures["engines"]["rows"]}
    assert engines["FSDP2"]["result"] == "not run: FSDP needs CUDA"
    assert engines["DeepSpeed ZeRO-3"]["agrees"]
    text = (results / "gpu_check.md").read_text()
    assert "## liger" in text and "FAILED: timed out" in text and "## engines" in text


def test_the_planner_is_compared_like_with_like():
    cuda = {"peak_kind": "cuda max_memory_allocated", "peak_bytes": 20 * GIB}
    assert gpucheck.compare_with_planner(
        21 * GIB, 24 * GIB, {**cuda, "device_used_bytes": None}
    ) == {
        "tensors_error": pytest.approx(0.05),
        "total_error": None,  # no NVML: no process figure to hold the total against
    }
    both = gpucheck.compare_with_planner(
        21 * GIB, 24 * GIB, {**cuda, "device_used_bytes": 25 * GIB}
    )
    assert both["total_error"] == pytest.approx(24 / 25 - 1)
    cpu = {"peak_kind": "cpu peak RSS above process baseline", "peak_bytes": 2 * GIB}
    assert gpucheck.compare_with_planner(GIB, 3 * GIB, cpu) == {
        "tensors_error": None,
        "total_error": pytest.approx(0.5),
    }


def test_the_report_renders_every_section_and_says_what_did_not_run():
    memory = {"cell": "1x512", "peak_bytes": 15 * GIB, "planned_tensors_bytes": 15.1 * GIB,
              "tensors_error": 0.006, "device_used_bytes": 16.5 * GIB,
              "planned_total_bytes": 16.9 * GIB, "total_error": 0.024,
              "reserved_bytes": 15.5 * GIB, "step_time_s": 0.154}  # fmt: skip
    table = [
        {"system": "ftkit", "label": "ftkit default", "supervised_tokens_per_s": 3000.0,
         "speedup": 1.0, "step_time_s": 0.1, "peak_device_bytes": 3 * GIB},
        {"system": "ftkit-own-lora", "label": "own", "supervised_tokens_per_s": 3100.0,
         "speedup": 1.03, "step_time_s": 0.097, "peak_device_bytes": 3 * GIB},
        {"system": "hf-group-by-length", "label": "HF", "supervised_tokens_per_s": 2000.0,
         "speedup": 0.67, "step_time_s": 0.15, "peak_device_bytes": 5 * GIB},
    ]  # fmt: skip
    results = {
        "precision": {"rows": [
            {"precision": "fp16", "steps": 20, "optimizer_steps_skipped": 1,
             "eval_loss_before": 4.117, "eval_loss": 2.17, "first_step_time_s": 0.5,
             "step_time_s": 0.012, "attn_kernels": ["varlen_attn"]},
        ]},
        "memory": {"cells": [memory], "seconds": 61.0},
        "qlora": {"skipped": "not run: needs bitsandbytes (pip install 'ftkit[quant]')"},
        "throughput": {"table": table, "left_out": {"trl-padding-free": "not run: needs trl"}},
        "liger": {"error": "timed out after 120 s: ..."},
        "engines": {"rows": [
            {"engine": "FSDP2", "config": "accelerate_configs/fsdp2.yaml",
             "adapter_relative_difference": 1e-6, "agrees": True, "step_time_s": 0.1},
            {"engine": "DeepSpeed ZeRO-3", "result": "not run: needs deepspeed"},
        ]},
    }  # fmt: skip
    text = gpucheck.report("NVIDIA H200", "GPU, NVIDIA H200", results)
    assert "| fp16 | 1 of 20 | 4.1170 → 2.1700 | 500.0 ms | 12.0 ms | varlen_attn |" in text
    assert "| 1x512 | 15.00 GiB | 15.10 GiB | +0.6% | 16.50 GiB | 16.90 GiB | +2.4% |" in text
    assert "## memory (61 s)" in text and "needs bitsandbytes" in text
    missed = {**memory, "tensors_error": 0.28}  # the first H200 run's total-vs-allocated reading
    assert "+28.0% (goal ±3%: missed)" in "\n".join(gpucheck._render_memory({"cells": [missed]}))
    assert "ftkit default ÷ the best peer (HF): **1.50×**" in text
    assert "Own LoRA ÷ PEFT LoRA step time: 0.970×." in text
    assert "FAILED: timed out after 120 s" in text
    assert "| DeepSpeed ZeRO-3 | not run: needs deepspeed |" in text
    assert gpucheck.device_slug("NVIDIA H200") == "nvidia-h200"

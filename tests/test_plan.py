"""`ftkit plan`: the enumeration respects the hardware, the written files run, the chosen recipe
fits its budget and a dropped one does not, and the predicted ranking holds when measured."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from helpers import REPO

from ftkit.cli import main as ftkit_main
from ftkit.config import TrainConfig, parse_recipe
from ftkit.errors import ConfigError
from ftkit.lab import plan as planning
from ftkit.lab.gpus import GPUS, find_gpu, parse_gpu_spec, parse_gpus
from ftkit.meter import GIB, MIB
from ftkit.reporting import plan_beside_measured

SHIPPED_CONFIGS = REPO / "accelerate_configs"


def make(model="llama2-7b", gpus="2xT4", global_batch=32, method=None, **hardware):
    return planning.make_plan(
        model,
        planning.hardware_from_flags(gpus, **hardware),
        planning.Workload(512),
        method or planning.Method(),
        global_batch,
    )


@pytest.mark.parametrize(
    ("model", "gpus", "full", "precision"),
    [
        ("llama2-7b", "2xT4", False, "fp16"),
        ("llama2-7b", "1xA100-40GB", False, "bf16"),
        ("bloom-1b7", "1xT4", False, "fp16"),
        ("llama2-7b", "2xA100-80GB", True, "bf16"),
        ("llama2-13b", "4xL4", False, "bf16"),
    ],
)
def test_every_candidate_respects_the_hardware(model, gpus, full, precision):
    method = planning.Method(lora_r=None if full else 8)
    plan = make(model, gpus, method=method)
    count = plan.hardware.count
    assert plan.candidates and plan.best is not None
    for c in plan.candidates:
        p = c.plan
        assert p.precision == precision  # a T4 never gets bf16; an Ampere GPU never fp16
        assert p.micro_batch_size * p.gradient_accumulation_steps * count == 32  # exactly
        assert p.world_size == count
        assert c.fits == (c.memory.total <= plan.hardware.usable)
        if p.quantization:
            assert not full and p.strategy == "ddp"  # bitsandbytes weights are never sharded
        if p.strategy == "fsdp":
            assert precision == "bf16"
        if p.strategy != "ddp":  # sharded only where DDP cannot hold the same recipe
            assert count > 1
            ddp = [
                d
                for d in plan.candidates
                if d.plan.strategy == "ddp"
                and (d.plan.quantization, d.plan.gradient_checkpointing, d.plan.micro_batch_size)
                == (p.quantization, p.gradient_checkpointing, p.micro_batch_size)
            ]
            assert len(ddp) == 1 and not ddp[0].fits
    # Every split of the per-GPU batch, GC on and off, each base: nothing missing.
    divisors = [d for d in range(1, 32 // count + 1) if (32 // count) % d == 0]
    bases = 1 if full else 3
    assert sum(c.plan.strategy == "ddp" for c in plan.candidates) == bases * 2 * len(divisors)
    fitting = [c.time.total_s for c in plan.fitting]
    assert [float(f"{t:.3g}") for t in fitting] == sorted(float(f"{t:.3g}") for t in fitting)
    assert plan.candidates[: len(fitting)] == tuple(plan.fitting)


def test_llama2_7b_on_two_t4s_needs_a_quantised_base_or_sharding():
    plan = make()
    sixteen_bit_ddp = [
        c for c in plan.candidates if c.plan.quantization is None and c.plan.strategy == "ddp"
    ]
    assert sixteen_bit_ddp and not any(c.fits for c in sixteen_bit_ddp)  # 12.6 GiB of weights
    assert plan.best.plan.quantization in ("8bit", "4bit") or plan.best.plan.strategy != "ddp"
    # The ranking's model: a dequantised 4-bit weight costs less than an 8-bit one, checkpointing
    # costs a forward, and more GPUs than the link can feed cost their all-reduce.
    by = {(c.plan.quantization, c.plan.gradient_checkpointing, c.plan.micro_batch_size, c.plan.strategy): c
          for c in plan.candidates}  # fmt: skip
    assert by["4bit", False, 2, "ddp"].time.total_s < by["8bit", False, 2, "ddp"].time.total_s
    assert by["4bit", False, 2, "ddp"].time.total_s < by["4bit", True, 2, "ddp"].time.total_s


def test_gpu_names_specs_and_counts():
    assert parse_gpus("2xT4") == (2, GPUS["T4"])
    assert parse_gpus("A100-40GB") == (1, GPUS["A100-40GB"])
    assert find_gpu("h100-80gb") is GPUS["H100"]  # the planner's old name still works
    name, gpu = parse_gpu_spec("box:2048:1.5:40:bf16")
    assert (name, gpu.memory, gpu.tflops, gpu.bandwidth, gpu.bf16) == (
        "box",
        2048 * MIB,
        1.5,
        40,
        True,
    )
    assert parse_gpus("4xbox", {name: gpu}) == (4, gpu)
    assert not GPUS["T4"].bf16 and all(g.bf16 for k, g in GPUS.items() if k != "T4")
    for bad in ("box:2048:1.5", "box:x:1:1", "box:2048:1:1:fp8", "box:0:1:1"):
        with pytest.raises(ConfigError, match="NAME:MiB:TFLOPS:GBps"):
            parse_gpu_spec(bad)
    with pytest.raises(ConfigError, match="known: T4, L4, A10G"):
        parse_gpus("2xV100")
    with pytest.raises(ConfigError, match="1 to 16"):
        parse_gpus("0xT4")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "3xT4"], "--global_batch 32 cannot be split evenly over 3 GPUs"),
        (["--gpus", "T4", "--margin", "1"], "--margin must be in [0, 1)"),
        (["--gpus", "2xcpu", "--gpu_spec", "cpu:512:0.1:5", "--device", "cpu"], "one process"),
        (["--gpus", "T4", "--dataset", "x.json"], "pass --tokenizer DIR"),
        (["--gpus", "T4", "--device", "cpu"], "describe it with --gpu_spec"),
    ],
)
def test_bad_plans_are_one_error_line(argv, message, capsys):
    assert ftkit_main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftkit error: ") and message in err[0], err


def test_plan_prints_a_ranked_table_and_a_recommendation(capsys):
    assert ftkit_main(["plan", "--model", "llama2-7b", "--gpus", "2xT4", "--top", "3"]) == 0
    out = capsys.readouterr().out
    plan = make()
    best = plan.best
    assert "fp16 (the T4 has no bf16)" in out
    assert f"{len(plan.candidates)} enumerated, {len(plan.fitting)} fit" in out
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 3 and rows[0].split()[1] == best.base
    assert (
        f"{best.memory.total / GIB:.1f}" in rows[0]
        and planning._seconds(best.time.total_s) in rows[0]
    )
    assert "dropped, more than 13.5 GiB per GPU" in out
    assert out.strip().splitlines()[-3].startswith(f"recommended: {best.describe()}")


def _shipped(name: str) -> dict:
    return yaml.safe_load((SHIPPED_CONFIGS / name).read_text())


def _engine(plan, strategy):
    return next(c for c in plan.candidates if c.plan.strategy == strategy)


def test_the_written_accelerate_configs_are_the_shipped_ones():
    """`make train-ddp`'s 2xT4 config, the single-GPU and CPU configs and the engines' configs
    are exactly what the plan writes for the same hardware."""
    t4 = make()
    arch = planning.Arch.from_config(t4.config)
    cases = [
        (t4.best, t4.hardware, "ddp_2gpu_fp16.yaml"),
        (_engine(t4, "zero2"), t4.hardware, "deepspeed_zero2.yaml"),
        (_engine(t4, "zero3"), t4.hardware, "deepspeed_zero3.yaml"),
    ]
    full = make(gpus="2xA100-80GB", method=planning.Method(lora_r=None))
    cases.append((_engine(full, "fsdp"), full.hardware, "fsdp2.yaml"))
    for gpus, name in (("1xT4", "single_gpu_fp16.yaml"), ("1xA100-40GB", "single_gpu_bf16.yaml")):
        single = make(gpus=gpus)
        cases.append((single.best, single.hardware, name))
    cpu = make(gpus="1xcpu", gpu_specs=["cpu:65536:0.1:10"], device="cpu")
    cases.append((cpu.best, cpu.hardware, "cpu.yaml"))
    for c in cpu.candidates:  # on a CPU nothing overlaps: the step is the sum of its parts
        t = c.time
        parts = t.gemm_s + t.elementwise_s + t.host_s + t.optimizer_s + t.comm_s
        assert t.total_s == pytest.approx(parts, rel=1e-12) and t.comm_s == 0
    for candidate, hardware, name in cases:
        written = planning.accelerate_config(candidate, hardware, arch)
        assert written == _shipped(name), name


@pytest.mark.parametrize("name", ["llama2-7b", "bloom-1b7"])
def test_the_shipped_recipes_are_what_the_plan_picks_for_two_t4s(name):
    """The shipped recipes run with `make train-ddp`'s 2 x T4 config at their own global batch."""
    recipe = parse_recipe(["--config", name])
    t, a = recipe.train, recipe.adapter
    plan = planning.make_plan(
        name,
        planning.hardware_from_flags("2xT4"),
        planning.Workload(recipe.data.max_length),
        planning.Method(a.lora_r, tuple(a.lora_target), a.lora_dropout),
        t.per_device_train_batch_size * t.gradient_accumulation_steps * 2,
    )
    picked = planning.recipe_values(plan.best, recipe.model.model_name_or_path, "d", "o")
    shipped = recipe.to_dict()
    for key in (
        "model_name_or_path", "model_dtype", "load_in_8bit", "load_in_4bit",
        "gradient_checkpointing", "max_length", "lora_impl", "lora_r", "lora_dropout",
        "lora_target", "per_device_train_batch_size", "gradient_accumulation_steps",
    ):  # fmt: skip
        assert shipped[key] == picked[key], key
    assert planning.accelerate_config(plan.best, plan.hardware, planning.Arch.from_config(
        plan.config)) == _shipped("ddp_2gpu_fp16.yaml")  # fmt: skip


def test_write_gives_a_recipe_and_config_ftkit_reads(tmp_path):
    plan = make()
    recipe_path, accelerate_path = planning.write_plan(plan, tmp_path / "plan")
    recipe = parse_recipe(["--config", str(recipe_path)])
    best = plan.best.plan
    assert recipe.model.model_name_or_path == "meta-llama/Llama-2-7b-hf"
    assert recipe.model.model_dtype == "fp16"
    assert (recipe.model.load_in_8bit, recipe.model.load_in_4bit) == (
        best.quantization == "8bit",
        best.quantization == "4bit",
    )
    assert recipe.model.gradient_checkpointing == best.gradient_checkpointing
    assert recipe.train.per_device_train_batch_size == best.micro_batch_size
    assert recipe.train.gradient_accumulation_steps == best.gradient_accumulation_steps
    assert recipe.data.max_length == 512 and recipe.data.dataset == planning.DEFAULT_DATASET
    assert recipe.train.planned_peak_bytes == plan.best.memory.total
    assert recipe.train.planned_step_time_s == pytest.approx(plan.best.time.total_s, rel=1e-5)
    assert recipe.train.output_dir == str(tmp_path / "plan" / "run")
    config = load_config_from_file(str(accelerate_path))
    assert (config.distributed_type, config.mixed_precision, config.num_processes) == (
        DistributedType.MULTI_GPU,
        "fp16",
        2,
    )
    text = recipe_path.read_text()
    assert text.startswith(planning.WRITTEN_BY)
    assert f"ftkit launch --config {recipe_path} -- --config_file {accelerate_path}" in text


def test_write_replaces_only_its_own_files(tmp_path):
    plan = make()
    planning.write_plan(plan, tmp_path)
    planning.write_plan(plan, tmp_path)  # its own: replaced
    theirs = tmp_path / "other"
    theirs.mkdir()
    (theirs / "accelerate.yaml").write_text("distributed_type: NO\n")
    with pytest.raises(ConfigError, match="ftkit plan did not write it"):
        planning.write_plan(plan, theirs)
    assert (theirs / "accelerate.yaml").read_text() == "distributed_type: NO\n"
    assert not (theirs / "recipe.yaml").exists()
    nothing = make(gpus="1xtiny", gpu_specs=["tiny:1024:10:100"])
    assert nothing.best is None and "nothing fits" in nothing.report()
    with pytest.raises(ConfigError, match="no recipe to write"):
        planning.write_plan(nothing, tmp_path / "none")


def test_the_expected_longest_of_a_batch_is_exact():
    values = [3, 5, 5, 8, 13, 21]
    for draws in (1, 2, 3, 6):
        batches = list(itertools.combinations(values, draws))
        exact = sum(max(b) for b in batches) / len(batches)
        assert planning._expected_largest(values, draws) == pytest.approx(exact, rel=1e-12)


def test_dataset_lengths_drive_the_step_time(alpaca_path, llama2_tokenizer_dir):
    workload = planning.workload_from_flags(
        "llama2-7b", 512, str(alpaca_path), str(llama2_tokenizer_dir), num_samples=200
    )
    assert len(workload.lengths) == 200 and max(workload.lengths) <= 512
    assert 0 < workload.mean_supervised < workload.mean_tokens < 512
    # Memory stays the worst case (full sequences, the largest supervised share of any record).
    assert workload.memory_supervised_fraction == max(workload.supervised) / 512
    hardware = planning.hardware_from_flags("2xT4")
    real = planning.make_plan("llama2-7b", hardware, workload)
    full = planning.make_plan("llama2-7b", hardware, planning.Workload(512))
    assert real.best.time.total_s < 0.7 * full.best.time.total_s
    assert real.best.time.tokens == pytest.approx(32 * workload.mean_tokens)
    bloom = planning.make_plan("bloom-1b7", hardware, workload)  # right-padded: the longest counts
    micro = bloom.best.plan.micro_batch_size
    assert not bloom.best.plan.padding_free
    assert workload.padded_tokens(micro) >= micro * workload.mean_tokens


def test_metrics_record_the_plan_beside_the_measurement():
    history = [{"step": 1, "step_time_s": 9.0}, {"step": 2, "step_time_s": 2.0},
               {"step": 3, "step_time_s": 4.0}]  # fmt: skip
    planned = TrainConfig(planned_peak_bytes=123, planned_step_time_s=2.5)
    assert plan_beside_measured(planned, {"peak_bytes": 100}, history) == {
        "plan": {
            "predicted_peak_bytes": 123,
            "measured_peak_bytes": 100,
            "predicted_step_time_s": 2.5,
            "measured_step_time_s": 3.0,  # the median after the first step
        }
    }
    assert plan_beside_measured(TrainConfig(), {"peak_bytes": 100}, history) == {}
    with pytest.raises(ConfigError, match="planned_peak_bytes"):
        TrainConfig(planned_peak_bytes=-1)


# -- on CPU: the written plan runs, within its budget ------------------------------------------


def _long_records(source: Path, path: Path, n: int) -> Path:
    """Alpaca records whose answer alone outgrows 128 tokens: every sequence fills max_length,
    so the planner's worst case is what the run meets."""
    records = [r for r in json.loads(source.read_text()) if len(r["output"]) > 900][:n]
    path.write_text(json.dumps(records))
    return path


def _launch(recipe: Path, accelerate: Path, *flags: str, output_dir: Path | None = None) -> dict:
    """``ftkit launch`` of a written plan (2 steps, the exact CPU peak), into the recipe's own
    output_dir or ``output_dir``; its metrics.json."""
    if output_dir is not None:
        flags = (*flags, "--output_dir", str(output_dir))
    done = subprocess.run(
        [sys.executable, "-m", "ftkit", "launch", "--config", str(recipe), "--max_steps", "2",
         "--exact_peak_memory", "true", *flags,
         "--", "--config_file", str(accelerate), "--num_cpu_threads_per_process", "1"],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output_dir = output_dir or Path(yaml.safe_load(recipe.read_text())["output_dir"])
    return json.loads((output_dir / "metrics.json").read_text())


BUDGET_MIB = 260  # between the 2 x 128 and the 4 x 128 micro-batches of the model below


@pytest.mark.slow
def test_a_written_plan_runs_within_its_budget_and_a_dropped_one_exceeds_it(
    tmp_path, alpaca_path, llama2_tokenizer_dir
):
    from ftkit.lab.throughput import save_llama

    # LLaMA-shaped, the real 32,000-piece vocabulary: the loss phase is the peak, which the
    # planner predicts within 2 % (results/planner-cpu).
    model = save_llama(
        tmp_path / "model",
        str(llama2_tokenizer_dir),
        dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256),
    )  # fmt: skip
    data = _long_records(alpaca_path, tmp_path / "records.json", 24)
    plan_dir = tmp_path / "plan"
    argv = ["plan", "--model", str(model), "--device", "cpu", "--gpus", "1xbudget",
            "--gpu_spec", f"budget:{BUDGET_MIB}:0.1:10", "--dataset", str(data),
            "--seq_len", "128", "--global_batch", "8", "--write", str(plan_dir)]  # fmt: skip
    assert ftkit_main(argv) == 0
    hardware = planning.hardware_from_flags(
        "1xbudget", [f"budget:{BUDGET_MIB}:0.1:10"], device="cpu"
    )
    workload = planning.read_workload(str(data), str(model), 128)
    assert set(workload.lengths) == {128}  # every sequence fills max_length
    plan = planning.make_plan(str(model), hardware, workload, global_batch=8)
    budget = BUDGET_MIB * MIB
    chosen = plan.best
    # The closest miss: the dropped recipe that needs the least memory.
    dropped = min(plan.dropped, key=lambda c: c.memory.total)
    assert chosen.memory.total <= 0.9 * budget and dropped.memory.total > 1.1 * budget

    ran = _launch(plan_dir / "recipe.yaml", plan_dir / "accelerate.yaml")
    assert ran["plan"]["predicted_peak_bytes"] == chosen.memory.total
    assert ran["plan"]["predicted_step_time_s"] == pytest.approx(chosen.time.total_s, rel=1e-5)
    assert ran["plan"]["measured_peak_bytes"] == ran["memory"]["peak_bytes"] <= budget
    assert ran["memory"]["peak_kind"].startswith("cpu") and ran["steps"] == 2

    p = dropped.plan
    over = _launch(
        plan_dir / "recipe.yaml",
        plan_dir / "accelerate.yaml",
        "--per_device_train_batch_size", str(p.micro_batch_size),
        "--gradient_accumulation_steps", str(p.gradient_accumulation_steps),
        "--gradient_checkpointing", str(p.gradient_checkpointing).lower(),
        output_dir=tmp_path / "dropped",
    )  # fmt: skip
    assert over["memory"]["peak_bytes"] > budget
    # The planner was right about both: measured +3.2 % and -2.5 % on this machine.
    for run, candidate in ((ran, chosen), (over, dropped)):
        assert run["memory"]["peak_bytes"] == pytest.approx(candidate.memory.total, rel=0.06)


# -- on CPU: the predicted ranking, measured ----------------------------------------------------


@pytest.mark.slow
def test_predicted_ranking_holds_for_candidates_at_least_20_percent_apart(
    tmp_path, alpaca_path, single_thread
):
    """Every candidate of a plan trained side by side in one process (CPU time of one thread,
    rounds interleaved, the best round: other users' load only adds time); no pair the model
    puts >= 20 % apart measures in the other order by more than 5 %, the spread of one step's
    best-of-5 CPU time here. (A fresh CI run measured micro-batch 8 x 1 and 2 x 4 within 2 %,
    predicted >= 20 % apart: the per-op host term overestimates what fewer micro-batches save.)"""
    from ftkit.embedded import ASSETS_DIR
    from ftkit.lab import plancheck
    from ftkit.lab.throughput import save_llama, write_records

    model = str(save_llama(tmp_path / "model", str(ASSETS_DIR / "tiny-llama"), plancheck.SHAPE))
    data = str(write_records(str(alpaca_path), 48, tmp_path / "records.json"))
    hardware = planning.hardware_from_flags("1xcpu", [plancheck.cpu_gpu_spec(65536)], device="cpu")
    workload = planning.read_workload(data, model, 128)
    plan = planning.make_plan(model, hardware, workload, global_batch=8)
    times = plancheck.time_candidates(plan, model, data, tmp_path / "runs", steps=1, rounds=5)
    measured = [min(t) for t in times]
    predicted = [c.time.total_s for c in plan.candidates]
    pairs = [
        (i, j)
        for i, j in itertools.permutations(range(len(predicted)), 2)
        if predicted[j] >= 1.2 * predicted[i]
    ]
    gc_pairs = [
        (i, j)
        for i, j in pairs
        if not plan.candidates[i].plan.gradient_checkpointing
        and plan.candidates[j].plan.gradient_checkpointing
    ]
    micro_pairs = [
        (i, j)
        for i, j in pairs
        if plan.candidates[i].plan.gradient_checkpointing
        == plan.candidates[j].plan.gradient_checkpointing
    ]
    assert gc_pairs and micro_pairs  # both kinds of difference are put to the test
    wrong = [(plan.candidates[i].describe(), plan.candidates[j].describe(),
              measured[i], measured[j]) for i, j in pairs if measured[i] > 1.05 * measured[j]]  # fmt: skip
    assert not wrong, (statistics.median(measured), wrong)

"""The ablation grid: the quick grid runs for real (every cell its own ``accelerate launch``
process) and its measurements must show the physics each technique claims; Table 1 must come
from the cells, not from a table typed in."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoTokenizer

from ftkit.embedded import embedded_dataset_path
from ftkit.errors import ConfigError
from ftkit.lab.ablation import (
    EMBEDDED_TOKENIZER,
    Cell,
    Grid,
    cell_of,
    filling_records,
    run_grid,
    synthetic_records,
    technique_effects,
)

QUICK = "quick"  # the shipped grid
# Planner total vs measured peak. 32k vocabulary (the loss phase dominates): every held-out cell
# of results/planner-cpu/ is within 2 % on this project's AMD EPYC host, up to 2.9 % in repeated
# runs with newer library versions: that is the planner's own accuracy on one host. What else
# moves a CPU peak from one x86-64 host to another is MKL's buffer cache: its fast memory manager
# keeps the GEMM workspace of the code path it picks for the CPU, and the planner's runtime
# constant was calibrated with this host's. Measured on the two PLANNER_CELLS below: turning the
# cache off (MKL_DISABLE_FAST_MM=1) or taking MKL's compatible path (MKL_CBWR=COMPATIBLE) lowers
# the peak by 7.0-7.5 MiB; an Intel Xeon (AVX-512) CI host read the first cell 7.5 MiB below this
# host (+5.5 % planner error); torch's and oneDNN's own ISA choices (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2) move it by 1.2 MiB at most. So each cell is held to the planner's
# accuracy plus one MKL cache either way, in bytes, not to a share of a peak it does not scale with.
PLANNER_ACCURACY = 0.03
MKL_BUFFER_CACHE = 8 * 2**20
# The quick grid's 640 vocabulary leaves the blocks dominant, and there the planner over-predicts by
# +4.0 to +15.8 % on that host (+1.2 % at most on the Xeon of results/ablation-cpu/): exact
# live-tensor tracking puts one fp32 LoRA block's backward transient at ~12i + 8h bytes a token
# where the planner counts 16i + 12h, so that bound stays loose until the block model is redone.
# The bound is one-sided: under-prediction (what makes a user's run OOM) is held to 10 %;
# over-prediction may reach 25 % (a fresh CI venv read +5 to +21 % here).
QUICK_UNDER, QUICK_OVER = -0.10, 0.25


def cell(ga="4x1", precision="fp32", lora="peft", gc=False) -> Cell:
    return Cell.parse(ga, precision, lora, gc)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, alpaca_path):
    out = tmp_path_factory.mktemp("ablation")
    rows = run_grid(Grid.load(QUICK, dataset=str(alpaca_path)), out, jobs=2)
    return {cell_of(row): row for row in rows}, out


@pytest.mark.slow
def test_lora_cuts_grads_and_optimizer_to_the_closed_form_adapter_size(quick):
    rows, _ = quick
    grid = Grid.load(QUICK)
    h, layers, r = grid.model["hidden_size"], grid.model["num_hidden_layers"], 8
    adapted = 2  # q_proj and v_proj: h -> h each (no grouped kv heads in this config)
    adapter = layers * adapted * r * (h + h)  # A is r x d_in, B is d_out x r
    full = rows[cell(lora="none")]
    assert full["grads_bytes"] == full["params_bytes"] == 4 * full["total_params"]
    for impl in ("ftkit", "peft"):
        lora = rows[cell(lora=impl)]
        assert lora["trainable_params"] == adapter
        assert lora["grads_bytes"] == 4 * adapter  # fp32 gradients
        # AdamW: exp_avg + exp_avg_sq in fp32, plus one 4-byte step counter per tensor (A and B)
        assert lora["optimizer_bytes"] == 2 * 4 * adapter + 4 * 2 * adapted * layers
        assert lora["grads_bytes"] + lora["optimizer_bytes"] < 0.02 * (
            full["grads_bytes"] + full["optimizer_bytes"]
        )
        assert lora["peak_bytes"] < full["peak_bytes"]


@pytest.mark.slow
def test_gradient_checkpointing_lowers_activation_memory(quick):
    rows, _ = quick
    without, with_gc = rows[cell()], rows[cell(gc=True)]
    assert with_gc["activations_bytes"] < 0.75 * without["activations_bytes"]
    assert with_gc["params_bytes"] == without["params_bytes"]


@pytest.mark.slow
def test_bf16_lowers_activation_memory_and_halves_the_frozen_base(quick):
    rows, _ = quick
    fp32, bf16 = rows[cell()], rows[cell(precision="bf16")]
    # Only "lower": CPU autocast keeps norms, the fp32 adapters' inputs and the logits in fp32,
    # and the residual also holds the runtime (more of it where oneDNN runs bf16 natively).
    assert bf16["activations_bytes"] < 0.9 * fp32["activations_bytes"]
    adapters = 4 * fp32["trainable_params"]  # adapters stay fp32 over the bf16 base
    assert bf16["params_bytes"] - adapters == (fp32["params_bytes"] - adapters) // 2


@pytest.mark.slow
def test_accumulation_keeps_per_micro_batch_memory_and_the_update(quick):
    rows, _ = quick
    big, accumulated, small = rows[cell()], rows[cell(ga="1x4")], rows[cell(ga="1x1")]
    # GA on (micro-batch 1, x4) holds what one micro-batch of 1 holds, not what a batch of 4 does
    assert abs(accumulated["peak_bytes"] - small["peak_bytes"]) < 0.05 * small["peak_bytes"]
    assert accumulated["activations_bytes"] < 0.6 * big["activations_bytes"]
    # ... and trains on the same effective batch: the loss after two steps matches 4x1
    assert accumulated["train_loss"] == pytest.approx(big["train_loss"], abs=1e-3)


@pytest.mark.slow
def test_planner_is_exact_on_tensors_and_close_on_the_peak(quick):
    rows, _ = quick
    for row in rows.values():
        assert row["planner_static_exact"], row["cell"]
        assert QUICK_UNDER < row["planner_error"] < QUICK_OVER, (row["cell"], row["planner_error"])


@pytest.mark.slow
def test_report_is_derived_from_the_cells(quick):
    rows, out = quick
    report = (out / "ablation.md").read_text()
    assert "Table 2" in report and "Table 1" in report and "CPU, " in report
    assert (out / "memory.png").stat().st_size > 0 and (out / "time.png").stat().st_size > 0
    assert len((out / "ablation.csv").read_text().splitlines()) == 1 + len(rows)
    effects = json.loads((out / "ablation.json").read_text())["effects"]
    assert effects == technique_effects(list(rows.values()))
    assert max(effects["gradient checkpointing (LoRA)"]["activations"]) < 0.9
    assert max(effects["PEFT LoRA vs full FT (fp32)"]["optimizer"]) < 0.02
    assert effects["GA, same effective batch (LoRA)"]["activations"][0] < 0.9


def _row(c: Cell, **values) -> dict:
    base = {f"{k}_bytes": 100 for k in ("params", "grads", "optimizer", "activations", "peak")}
    return {
        "micro_batch": c.micro_batch,
        "accumulation": c.accumulation,
        "precision": c.precision,
        "lora": c.lora,
        "gc": "on" if c.gc else "off",
        "seq": 64,
        "cell_seq": None,
        "padding_free": False,
        "supervised_logits": False,
        "calibration": False,
        "step_time_s": 1.0,
        **base,
        **values,
    }


def test_table1_pairs_cells_that_differ_in_one_technique_only():
    rows = [
        _row(cell("4x1")),
        _row(cell("1x4"), activations_bytes=30),
        _row(cell("1x1"), activations_bytes=25),  # another effective batch: no GA pair
        _row(cell("4x1", gc=True), activations_bytes=40, step_time_s=1.3),
        _row(cell("1x4", precision="bf16", gc=True), activations_bytes=1),  # differs in two
    ]
    effects = technique_effects(rows)
    assert effects["GA, same effective batch (LoRA)"]["activations"] == [0.3]
    assert effects["gradient checkpointing (LoRA)"]["activations"] == [0.4]
    assert effects["gradient checkpointing (LoRA)"]["time"] == [1.3]
    assert not any(name.startswith("bf16") for name in effects)


def test_grid_files_load_and_bad_grids_fail_clearly(tmp_path):
    from ftkit.lab.ablation import GRIDS_DIR

    shipped = sorted(path.stem for path in GRIDS_DIR.glob("*.yaml"))
    assert {"full", "quick", "bench", "planner-32k"} <= set(shipped)
    for name in shipped:
        grid = Grid.load(name)
        assert len(set(grid.cells)) == len(grid.cells)
    assert len(Grid.load("full").cells) == 24
    planner = Grid.load("planner-32k").cells
    assert len(planner) == 20 and sum(c.calibration for c in planner) == 4
    assert {c.seq for c in planner} == {128, 256, 512}
    assert {(c.padding_free, c.supervised_logits) for c in planner} == {
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    }
    with pytest.raises(ConfigError, match="not found"):
        Grid.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    for text, match in (
        ("model: ftkit:tiny-llama\ncells: [[4, fp32, peft, false]]\n", "MICROxACCUMULATION"),
        ("model: ftkit:tiny-llama\ncells: [[4x1, fp8, peft, false]]\n", "precision"),
        (
            "model: ftkit:tiny-llama\ncells: [[4x1, fp32, peft, false]]\nrecipe: {lora_rank: 4}\n",
            "lora_r",
        ),
        ("model: ftkit:tiny-llama\nsteps: 1\ncells: [[4x1, fp32, peft, false]]\n", "steps"),
        ("model: ftkit:tiny-llama\ncells: [[4x1, fp32, peft, false, {sq: 64}]]\n", "valid keys"),
        (
            "model: ftkit:tiny-llama\nmax_length: 64\ncells: [[4x1, fp32, peft, false, {seq: 128}]]\n",
            "longer than max_length",
        ),
        (
            "model: ftkit:tiny-llama\ncells: [[4x1, fp32, peft, false]]\n"
            "recipe: {padding_free: 'true'}\n",
            "per cell",
        ),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            Grid.load(bad)


def test_filling_records_fill_max_length_or_fall_back_to_the_longest_common_length():
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER)
    records = json.loads(embedded_dataset_path().read_text())
    chosen, seq = filling_records(records, tokenizer, 40, 8)
    assert seq == 40 and len(chosen) == 8
    chosen, seq = filling_records(records, tokenizer, 4096, 8)  # no record is that long
    assert len(chosen) == 8 and 40 < seq < 4096


def test_synthetic_records_give_every_micro_batch_the_same_supervised_positions(
    llama2_tokenizer,
):
    from ftkit.data import IGNORE_INDEX, tokenize_record

    chosen, seq = filling_records(synthetic_records(8, 512), llama2_tokenizer, 512, 8)
    tokens = [tokenize_record(r, llama2_tokenizer, seq) for r in chosen]
    assert seq == 512 and all(len(t["input_ids"]) == 512 for t in tokens)
    assert {t["labels"].count(IGNORE_INDEX) for t in tokens} == {41}  # the masked prompt


# Two held-out cells of the planner's 32k-vocabulary grid (see results/planner-cpu/): padding-
# free rows with supervised logits, and padding-free full logits with GC.
PLANNER_CELLS = ("1x1-fp32-peft-nogc-s128-pf-suplogits", "2x1-fp32-peft-gc-s128-pf")


@pytest.mark.slow
def test_planner_predicts_real_vocabulary_cells(tmp_path, llama2_tokenizer_dir):
    grid = Grid.load("planner-32k", tokenizer=str(llama2_tokenizer_dir))
    cells = tuple(c for c in grid.cells if c.name in PLANNER_CELLS)
    assert len(cells) == len(PLANNER_CELLS) and not any(c.calibration for c in cells)
    rows = run_grid(dataclasses.replace(grid, cells=cells), tmp_path, jobs=2)
    for row in rows:
        assert row["planner_static_exact"], row["cell"]
        assert row["planner_peak_phase"] == "loss backward"
        bound = PLANNER_ACCURACY * row["peak_bytes"] + MKL_BUFFER_CACHE
        miss = row["planned_bytes"] - row["peak_bytes"]
        assert abs(miss) < bound, (row["cell"], row["planner_error"], miss / 2**20)

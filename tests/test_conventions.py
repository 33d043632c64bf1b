"""What users of HF training kits expect: trackers + logging_steps, a model card, push_to_hub,
and a quiet console."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from helpers import REPO, tiny_recipe

from ftkit import card, cli, embedded, tracking
from ftkit.config import ConfigError, Recipe, parse_recipe
from ftkit.reporting import METRICS_FINAL, METRICS_STEPS
from ftkit.train import Trainer


def rows(output_dir):
    return [json.loads(line) for line in (output_dir / METRICS_STEPS).read_text().splitlines()]


# -- report_to and logging_steps -------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_runs(tiny_llama_dir, records, tmp_path_factory):
    """The same 5 steps logged every step, and every 2 steps into TensorBoard."""
    root = tmp_path_factory.mktemp("logging")
    common = dict(max_steps=5, per_device_train_batch_size=2, lr_scheduler_type="cosine")
    every = tiny_recipe(tiny_llama_dir, records, root / "every", **common)
    Trainer(every).fit()
    pairs = tiny_recipe(
        tiny_llama_dir, records, root / "tb", logging_steps=2, report_to="tensorboard", **common
    )
    Trainer(pairs).fit()
    return root / "every", root / "tb"


def test_logging_steps_logs_interval_means(logged_runs):
    every, pairs = map(rows, logged_runs)
    assert [r["step"] for r in every] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in pairs] == [2, 4, 5]  # every 2nd step, and the last
    loss = [r["loss"] for r in every]
    means = [(loss[0] + loss[1]) / 2, (loss[2] + loss[3]) / 2, loss[4]]
    assert [r["loss"] for r in pairs] == pytest.approx(means, rel=1e-6)
    assert [r["lr"] for r in pairs] == pytest.approx([every[i]["lr"] for i in (1, 3, 4)])
    assert [r["grad_norm"] for r in pairs] == pytest.approx(
        [every[i]["grad_norm"] for i in (1, 3, 4)], rel=1e-5
    )
    for row in pairs:
        assert {"tokens_per_s", "step_time_s"} <= row.keys() and row["step_time_s"] > 0
    final = json.loads((logged_runs[1] / METRICS_FINAL).read_text())
    assert final["train_loss"] == pytest.approx(loss[4], rel=1e-6)


def test_interval_row_is_hf_trainer_convention():
    interval = tracking.LogInterval()
    for step, (loss, time_s, tokens) in enumerate([(4.0, 1.0, 100), (2.0, 3.0, 300)], 1):
        interval.add(
            dict(step=step, loss=loss, lr=0.1 * step, grad_norm=float(step), step_time_s=time_s,
                 tokens=tokens, tokens_per_s=tokens / time_s)
        )  # fmt: skip
    row = interval.pop()
    assert row == {
        "step": 2,
        "loss": 3.0,  # mean over the interval
        "lr": 0.2,  # current
        "grad_norm": 2.0,  # last
        "tokens_per_s": 100.0,  # 400 tokens over 4 s
        "step_time_s": 2.0,  # mean
    }
    assert len(interval) == 0


def test_report_to_tensorboard_writes_the_logged_scalars(logged_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = logged_runs[1]
    event_files = sorted(out.rglob("events.out.tfevents.*"))
    assert event_files and all(out in f.parents for f in event_files)
    scalars = {}
    for directory in {f.parent for f in event_files}:
        events = EventAccumulator(str(directory))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    logged = rows(out)
    assert [step for step, _ in scalars["loss"]] == [2, 4, 5]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in logged])
    assert [v for _, v in scalars["lr"]] == pytest.approx([r["lr"] for r in logged])
    assert {"grad_norm", "tokens_per_s", "step_time_s"} <= scalars.keys()


def test_unknown_tracker_is_one_line(capsys):
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbored'.*tensorboard"):
        parse_recipe(["--report_to", "tensorbored"])
    assert cli.main(["train", "--report_to", "tensorboard,tensorbored"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftkit error: report_to=")
    assert parse_recipe(["--report_to", "all"]).train.report_to == "all"
    assert Recipe().train.report_to == "none"


def test_missing_tracker_package_is_one_line_before_the_model_loads(
    monkeypatch, records, tmp_path, capsys
):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    # A model path that does not exist: a ModelError would mean the model was reached first.
    recipe = tiny_recipe(tmp_path / "no-model", records, tmp_path, report_to="tensorboard")
    with pytest.raises(ConfigError, match=r"pip install 'ftkit\[tensorboard\]'"):
        Trainer(recipe)
    argv = ["train", "--model_name_or_path", str(tmp_path / "no-model"), "--report_to", "mlflow"]
    assert cli.main([*argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "pip install 'ftkit[mlflow]'" in err[0]


# -- the model card --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["peft", "ftkit", "none"])
def test_every_run_writes_a_model_card_without_local_paths(impl, tiny_llama_dir, records, tmp_path):
    out = tmp_path / "card-run"
    if impl == "peft":  # the embedded base and dataset, materialised under FTKIT_HOME
        recipe = Recipe.from_dict(
            {"output_dir": str(out), "max_steps": 2, "max_length": 64, "validation_size": 8}
        )
    else:
        recipe = tiny_recipe(tiny_llama_dir, records, out, lora_impl=impl, validation_size=4)
    Trainer(recipe).fit()
    text = (out / "README.md").read_text()
    metrics = json.loads((out / METRICS_FINAL).read_text())
    for figure in (
        f"{metrics['eval_loss_before']:.4f} → {metrics['eval_loss']:.4f}",
        f"{metrics['eval_perplexity_before']:.2f} → {metrics['eval_perplexity']:.2f}",
        f"{metrics['wall_time_s']:.1f} s",
        f"{metrics['memory']['peak_bytes'] / 2**20:.1f} MiB",
        f"{metrics['train_records']} training records, {metrics['eval_records']} held out",
    ):
        assert figure in text
    for local in ("/tmp", str(tmp_path), os.environ["FTKIT_HOME"], str(tiny_llama_dir)):
        assert local not in text
    assert "[More Information Needed]" not in text  # PEFT's template is gone
    meta = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in meta  # a local or embedded base has no Hub id
    assert "ftkit" in meta["tags"]
    if impl == "none":
        assert meta["library_name"] == "transformers"
        assert "AutoModelForCausalLM.from_pretrained(MODEL)" in text
    else:
        assert meta["library_name"] == "peft"
        for how in ("PeftModel.from_pretrained", ".load_adapter(", "ftkit generate --adapter_dir"):
            assert how in text
    if impl == "peft":
        assert "`ftkit:tiny-llama`" in text and "`ftkit:tiny-instructions`" in text
    else:
        assert f"a local model directory `{tiny_llama_dir.name}`" in text
        assert f"a local dataset file `{records.name}`" in text


def test_card_front_matter_names_hub_ids_only(tmp_path):
    recipe = Recipe.from_dict(
        {
            "model_name_or_path": "meta-llama/Llama-2-7b-hf",
            "dataset": "tatsu-lab/alpaca",
            "output_dir": str(tmp_path / "llama"),
            "push_to_hub": True,
            "hub_model_id": "someone/llama-lora",
        }
    )
    metrics = {
        "train_loss": 1.0, "eval_loss_before": 2.0, "eval_loss": 1.5,
        "eval_perplexity_before": 7.39, "eval_perplexity": 4.48, "steps": 3,
        "wall_time_s": 1.0, "train_records": 9, "eval_records": 1,
        "techniques": {"precision": "bf16", "model_dtype": "fp32", "world_size": 2,
                       "distributed_type": "DistributedType.MULTI_GPU", "device": "cuda:0",
                       "quantization": "4bit", "gradient_checkpointing": True},
        "memory": {"trainable_params": 10, "total_params": 100, "peak_bytes": 2**20},
    }  # fmt: skip
    text = card.model_card(recipe, metrics, tmp_path / "llama")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert meta["datasets"] == ["tatsu-lab/alpaca"] and meta["library_name"] == "peft"
    assert 'BASE = "meta-llama/Llama-2-7b-hf"' in text and '"someone/llama-lora"' in text
    assert "bitsandbytes 4-bit" in text and "gradient checkpointing" in text
    assert str(tmp_path) not in text


# -- push_to_hub -----------------------------------------------------------------------------------


def test_push_to_hub_needs_a_repo_id():
    with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
        parse_recipe(["--push_to_hub", "true"])
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        parse_recipe(["--hub_model_id", "a/b/c"])


def test_push_to_hub_offline_fails_before_the_model_loads(records, tmp_path, capsys):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: as on this machine
    recipe = tiny_recipe(
        tmp_path / "no-model", records, tmp_path, push_to_hub=True, hub_model_id="me/run"
    )
    with pytest.raises(ConfigError, match="push_to_hub needs the Hugging Face Hub, but HF_HUB"):
        Trainer(recipe)
    argv = ["train", "--model_name_or_path", str(tmp_path / "no-model"), "--push_to_hub", "true"]
    assert cli.main([*argv, "--hub_model_id", "me/run", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "HF_HUB_OFFLINE is set" in err[0]


@pytest.fixture
def online(monkeypatch):
    """The Hub looks reachable to ftkit's check (no request is made: HfApi is faked)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_push_to_hub_without_a_token_says_how_to_log_in(online, monkeypatch, records, tmp_path):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    recipe = tiny_recipe(
        tmp_path / "no-model", records, tmp_path, push_to_hub=True, hub_model_id="me/run"
    )
    with pytest.raises(ConfigError, match="hf auth login"):
        Trainer(recipe)


def test_push_to_hub_uploads_the_output_dir_after_the_card(
    online, monkeypatch, tiny_llama_dir, records, tmp_path
):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        readme = Path(kwargs["folder_path"]) / "README.md"
        card_text = readme.read_text() if readme.is_file() else None
        calls.append(("upload_folder", kwargs, card_text))

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "pushed"
    recipe = tiny_recipe(tiny_llama_dir, records, out, push_to_hub=True, hub_model_id="me/run")
    Trainer(recipe).fit()
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "me/run" and calls[0][2]["exist_ok"] is True
    _, kwargs, card_text = calls[1]
    assert kwargs["repo_id"] == "me/run" and kwargs["folder_path"] == str(out)
    assert card_text is not None and "[More Information Needed]" not in card_text
    assert '"me/run"' in card_text  # the card loads it from the Hub


# -- a quiet console -------------------------------------------------------------------------------


def test_first_materialisation_says_what_it_does(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(embedded, "_build", lambda source, out: None)  # the line, not the build
    with caplog.at_level(logging.INFO, logger="ftkit.embedded"):
        embedded.materialise("tiny-llama")
        embedded.materialise("tiny-llama")  # already there: silent
    lines = [r.getMessage() for r in caplog.records if r.name == "ftkit.embedded"]
    assert lines == [
        f"materialising ftkit:tiny-llama into {tmp_path / 'home' / 'tiny-llama'}: pretraining "
        f"{embedded.PRETRAIN_STEPS} steps on the toy language (seconds to a minute, once)"
    ]


def our_deprecations_shown() -> str:
    """PYTHONWARNINGS showing every FutureWarning, and the DeprecationWarnings of our own calls
    (attributed to an ftkit module or the recipe script); library-internal ones stay hidden, as
    Python hides them by default (e.g. torch's own torch.jit.script_method at import)."""
    import pkgutil

    import ftkit

    ours = ["__main__", "ftkit", *(m.name for m in pkgutil.walk_packages(ftkit.__path__, "ftkit."))]
    return ",".join(["default::FutureWarning", *(f"default::DeprecationWarning:{m}" for m in ours)])


def demo_command(*recipe_args: str) -> list[str]:
    """The command ``make demo`` runs (``make -n``: printed, not run), with this interpreter and
    ``recipe_args`` for RECIPE_ARGS."""
    import shlex

    printed = subprocess.run(
        ["make", "-s", "-n", "demo", f"PY={sys.executable}", f"RECIPE_ARGS={shlex.join(recipe_args)}"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.replace("\\\n", " ")  # fmt: skip
    (line,) = [line for line in printed.splitlines() if "accelerate.commands.launch" in line]
    return shlex.split(line)


# What the documented commands used to print on every CPU run, none of it about the run.
NOISE = {
    "Accelerate's defaults block": "were not passed to `accelerate launch`",
    "DeepSpeed's accelerator detection": "Setting accelerator to CPU",
    "the kernels trust check": "publisher trust check",
    "matplotlib's font cache": "font",
}


@pytest.mark.slow
def test_make_demo_console_is_quiet_one_line_per_checkpoint(tiny_llama_dir, records, tmp_path):
    out = tmp_path / "quiet"
    command = demo_command(
        "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(records),
        "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2",
        "--validation_size", "4", "--max_length", "96",
    )  # fmt: skip
    assert command[command.index("--config_file") + 1] == "accelerate_configs/cpu.yaml"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "PYTHONWARNINGS": our_deprecations_shown(),
        "MPLCONFIGDIR": str(tmp_path / "matplotlib"),  # a first run: no font cache yet
    }
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert (tmp_path / "matplotlib").is_dir()  # the loss curve did build matplotlib's cache
    saved = [line for line in console.splitlines() if "ftkit.checkpoint: checkpoint" in line]
    assert len(saved) == 2, saved
    for step in (2, 4):
        assert sum(f"checkpoint {step} saved to {out}/checkpoints/checkpoint-{step}" in s
                   for s in saved) == 1  # fmt: skip
    assert "Saving current state" not in console and "saved in" not in console
    for what, text in NOISE.items():
        assert text not in console, what
    assert "FutureWarning" not in console and "DeprecationWarning" not in console
    assert (out / "README.md").is_file()


@pytest.mark.parametrize("wanted", [False, True], ids=["unasked", "asked"])
def test_noise_is_dropped_one_message_at_a_time_and_only_when_it_says_nothing(wanted):
    """The kernels trust check is shown for a quantised base, DeepSpeed's detection for a DeepSpeed
    run; every other message of those loggers always passes."""
    from ftkit import quiet

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    trust = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
    detection = "Setting accelerator to CPU. If you have GPU or other accelerator, ..."
    quiet.quiet_bitsandbytes(quantised=wanted)
    quiet.quiet_deepspeed_detection(uses_deepspeed=wanted)
    try:
        for name, text in ((quiet.KERNELS_HUB_LOGGER, trust), (quiet.DEEPSPEED_LOGGER, detection)):
            logger, seen = logging.getLogger(name), Seen()  # DeepSpeed's does not propagate
            logger.addHandler(seen)
            try:
                logger.warning(text)
                logger.warning("something else")
            finally:
                logger.removeHandler(seen)
            assert seen.messages == ([text] if wanted else []) + ["something else"], name
    finally:
        quiet.quiet_bitsandbytes(quantised=False)
        quiet.quiet_deepspeed_detection(uses_deepspeed=False)

"""The model card: the ``README.md`` every run writes into its output dir, after the weights.

It says what the adapter (or fully fine-tuned model) is and how to load it, from the run's own
records: the resolved recipe, ``metrics.json`` figures and the saved adapter config.  It is written
after ``save_pretrained`` on purpose: PEFT writes an empty template ``README.md`` there, which is
replaced.  The card names no local absolute path: the embedded base and dataset keep their
``ftkit:`` names, a local path becomes its last component, Hub ids stay (and only those go into
the front matter, where the Hub links them).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ftkit import __version__
from ftkit.adapters import FTKIT_CONFIG_NAME, PEFT_CONFIG_NAME
from ftkit.io import atomic_write_text
from ftkit.meter import trainable_parameters_line

CARD_NAME = "README.md"
EMBEDDED_PREFIX = "ftkit:"
_PATH_FIELDS = ("output_dir", "resume_from_checkpoint")  # always local: shown by their last part


def is_local(name_or_path: str) -> bool:
    """A local file or directory (as opposed to a Hub id or an embedded ``ftkit:`` name)."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return False
    path = Path(name_or_path).expanduser()
    return (
        path.is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or path.exists()
    )


def hub_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it is a Hub id, else None."""
    if not name_or_path or name_or_path.startswith(EMBEDDED_PREFIX) or is_local(name_or_path):
        return None
    return name_or_path


def short_name(name_or_path: str) -> str:
    """Hub ids and ``ftkit:`` names as they are, a local path as its last component."""
    return Path(name_or_path).name if is_local(name_or_path) else name_or_path


def describe(name_or_path: str, kind: str) -> str:
    """One phrase for the card: ``kind`` is "model directory" or "dataset file"."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        what = "tiny LLaMA" if kind == "model directory" else "toy instruction set"
        return f"`{name_or_path}` (ftkit's embedded {what})"
    if is_local(name_or_path):
        return f"a local {kind} `{short_name(name_or_path)}`"
    return f"[`{name_or_path}`](https://huggingface.co/{_hub_path(name_or_path, kind)})"


def _hub_path(repo: str, kind: str) -> str:
    return f"datasets/{repo}" if kind == "dataset file" else repo


def public_recipe(recipe) -> dict:
    """The resolved recipe with every local path cut to its last component."""
    values = recipe.to_dict()
    for key, value in values.items():
        if isinstance(value, str) and (key in _PATH_FIELDS or is_local(value)):
            values[key] = Path(value).name
    return values


def adapter_format(output_dir: Path, lora_impl: str) -> str:
    """``peft``, ``ftkit`` (ftkit's own format: BLOOM q/v rows) or ``model`` (full fine-tune)."""
    if lora_impl == "none":
        return "model"
    return "ftkit" if (Path(output_dir) / FTKIT_CONFIG_NAME).is_file() else "peft"


def _adapter_targets(output_dir: Path) -> list[str] | None:
    for name in (PEFT_CONFIG_NAME, FTKIT_CONFIG_NAME):
        path = Path(output_dir) / name
        if path.is_file():
            targets = json.loads(path.read_text(encoding="utf-8")).get("target_modules")
            return sorted(targets) if isinstance(targets, list) else None
    return None


def front_matter(recipe, fmt: str) -> str:
    meta: dict = {}
    if fmt == "peft":
        meta["library_name"] = "peft"
    elif fmt == "model":
        meta["library_name"] = "transformers"
    base = hub_id(recipe.model.model_name_or_path)
    if base:
        meta["base_model"] = base
    dataset = hub_id(recipe.data.dataset)
    if dataset:
        meta["datasets"] = [dataset]
    meta["pipeline_tag"] = "text-generation"
    tags = ["ftkit", "full-fine-tune" if fmt == "model" else "lora"]
    if fmt == "peft":
        tags.append("peft")
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def techniques(recipe, metrics: dict, output_dir: Path, fmt: str) -> list[str]:
    t, a = metrics["techniques"], recipe.adapter
    lines = []
    if fmt == "model":
        lines.append("full fine-tune: every weight trained (no adapter)")
    else:
        impl = "PEFT's LoRA" if a.lora_impl == "peft" else "ftkit's own LoRA"
        saved = "ftkit's adapter format" if fmt == "ftkit" else "PEFT's adapter format"
        targets = _adapter_targets(output_dir) or a.lora_target
        where = ", ".join(f"`{m}`" for m in targets) if targets else "the q/v projections"
        scaling = "alpha/√r (rsLoRA)" if a.use_rslora else "alpha/r"
        lines.append(
            f"{impl} (saved in {saved}): r={a.lora_r}, alpha={a.lora_alpha:g} "
            f"(scaling {scaling}), dropout {a.lora_dropout:g}, on {where}"
        )
    precision = t["precision"]
    lines.append(
        f"precision: {'fp32' if precision == 'fp32' else precision + ' mixed precision'}, "
        f"base weights held in {t['model_dtype']}"
    )
    if t.get("quantization"):
        detail = "8-bit" if t["quantization"] == "8bit" else "4-bit NF4, double quantisation"
        lines.append(f"quantised base: bitsandbytes {detail}")
    if t.get("gradient_checkpointing"):
        lines.append("gradient checkpointing (non-reentrant)")
    train = recipe.train
    batch = train.per_device_train_batch_size * train.gradient_accumulation_steps * t["world_size"]
    lines.append(
        f"batch {batch} = {train.per_device_train_batch_size} per device × "
        f"{train.gradient_accumulation_steps} accumulation steps × {t['world_size']} process(es)"
        f" ({str(t['distributed_type']).removeprefix('DistributedType.')}, {t['device']})"
    )
    lines.append(
        f"AdamW, lr {train.learning_rate:g}, {train.lr_scheduler_type} schedule, "
        f"warmup {train.warmup_ratio:g}, grad clip {train.max_grad_norm:g}, seed {train.seed}"
    )
    return lines


def _mib(n_bytes) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"


def metrics_table(metrics: dict) -> list[str]:
    mem = metrics["memory"]
    rows = ["| figure | value |", "|---|---|"]
    if metrics.get("eval_loss") is not None:
        before, after = metrics["eval_loss_before"], metrics["eval_loss"]
        rows.append(
            f"| eval loss per supervised token, before → after | {before:.4f} → {after:.4f} |"
        )
        rows.append(
            f"| eval perplexity, before → after | {metrics['eval_perplexity_before']:.2f} → "
            f"{metrics['eval_perplexity']:.2f} |"
        )
    if metrics.get("train_loss") is not None:
        rows.append(f"| train loss (last logged) | {metrics['train_loss']:.4f} |")
    rows.append(f"| optimizer steps | {metrics['steps']} |")
    rows.append(f"| wall time | {metrics['wall_time_s']:.1f} s |")
    rows.append(f"| peak memory | {_mib(mem.get('peak_bytes'))} ({mem.get('peak_kind', 'n/a')}) |")
    rows.append(
        "| parameters | "
        + trainable_parameters_line(mem["trainable_params"], mem["total_params"]).replace("|", "/")
        + " |"
    )
    if metrics.get("eval_loss") is None:
        rows.append("")
        rows.append("No held-out records (validation_size 0): no eval figures.")
    return rows


def _base_snippet(recipe) -> str:
    base = recipe.model.model_name_or_path
    if base.startswith(EMBEDDED_PREFIX):
        return (
            "from ftkit.modeling import resolve_model_path\n\n"
            f'BASE = resolve_model_path("{base}")  # built once into $FTKIT_HOME by ftkit'
        )
    if is_local(base):
        return f'BASE = "path/to/{short_name(base)}"  # the local model directory trained on'
    return f'BASE = "{base}"'


def loading(recipe, output_dir: Path, fmt: str) -> list[str]:
    name = Path(output_dir).name
    repo = recipe.train.hub_model_id if recipe.train.push_to_hub else None
    where = (
        f'"{repo}"  # or a local copy of this directory'
        if repo
        else f'"path/to/{name}"  # this directory'
    )
    local = f"path/to/{name}"
    base = _base_snippet(recipe)
    fetch = f"hf download {repo} --local-dir {name}\n" if repo else ""
    if fmt == "model":
        return [
            "A full fine-tune: this directory is a complete transformers model and its tokenizer.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"MODEL = {where}",
            "model = AutoModelForCausalLM.from_pretrained(MODEL)",
            "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
            "```",
            "",
            "ftkit's `generate` / `evaluate` / `merge` take adapters; for this model use "
            "transformers (or `transformers.pipeline('text-generation', model=MODEL)`).",
        ]
    lines = []
    if fmt == "peft":
        lines += [
            "**PEFT**",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            base,
            f"ADAPTER = {where}",
            "base = AutoModelForCausalLM.from_pretrained(BASE)",
            "model = PeftModel.from_pretrained(base, ADAPTER)",
            "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # the tokenizer trained with",
            "```",
            "",
            "**transformers** (its PEFT integration; `peft` must be installed)",
            "",
            "```python",
            "model = AutoModelForCausalLM.from_pretrained(BASE)",
            "model.load_adapter(ADAPTER)",
            "```",
            "",
        ]
    else:
        lines += [
            "This adapter is in ftkit's own format (LoRA on the q/v rows of BLOOM's fused "
            "`query_key_value`, which PEFT cannot express), so PEFT cannot load it; ftkit can, or "
            "merge it into a plain transformers model.",
            "",
            "**ftkit (Python)**",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "from ftkit.adapters import load_adapter",
            "",
            base,
            "model = AutoModelForCausalLM.from_pretrained(BASE)",
            f'load_adapter(model, "{local}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{local}")',
            "```",
            "",
        ]
    lines += [
        "**merged** into a standalone transformers model (no PEFT needed to use it):",
        "",
        "```bash",
        f"{fetch}ftkit merge --adapter_dir {local} --output_dir {name}-merged",
        "```",
        "",
        f'then `AutoModelForCausalLM.from_pretrained("{name}-merged")`.',
        "",
        "**ftkit**",
        "",
        "```bash",
        f'ftkit generate --adapter_dir {local} --instruction "Give three tips for staying healthy."',
        f"ftkit evaluate --adapter_dir {local}",
        "```",
        "",
        "The adapter records the base it was trained on; elsewhere, pass that base with "
        "`--base_model`.",
    ]
    return lines


def model_card(recipe, metrics: dict, output_dir: Path) -> str:
    output_dir = Path(output_dir)
    fmt = adapter_format(output_dir, recipe.adapter.lora_impl)
    what = "A fully fine-tuned model" if fmt == "model" else "A LoRA adapter"
    base = describe(recipe.model.model_name_or_path, "model directory")
    dataset = describe(recipe.data.dataset, "dataset file")
    subset = f", the first {recipe.data.num_samples}" if recipe.data.num_samples else ""
    lines = [
        front_matter(recipe, fmt),
        f"# {output_dir.name}",
        "",
        f"{what} for {base}, fine-tuned with ftkit {__version__} on "
        f"Alpaca-format instruction data: {dataset}{subset} — {metrics['train_records']} training "
        f"records, {metrics['eval_records']} held out for evaluation.",
        "",
        "## Training",
        "",
        *[f"- {line}" for line in techniques(recipe, metrics, output_dir, fmt)],
        "",
        "## Results",
        "",
        *metrics_table(metrics),
        "",
        "Per-step figures are in `metrics.jsonl`, the final ones in `metrics.json`, the curve in "
        "`loss_curve.png`.",
        "",
        "## How to load it",
        "",
        *loading(recipe, output_dir, fmt),
        "",
        "## Recipe",
        "",
        "The resolved recipe (also in `resolved_config.yaml`; local paths cut to their last "
        "component). Precision and process count come from the Accelerate config.",
        "",
        "```yaml",
        yaml.safe_dump(public_recipe(recipe), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(recipe, metrics: dict, output_dir: Path) -> Path:
    """Write ``README.md`` (replacing PEFT's template); call it after the weights are saved."""
    path = Path(output_dir) / CARD_NAME
    atomic_write_text(path, model_card(recipe, metrics, output_dir))
    return path

"""Adapter directories: the one module that knows their formats, file names and life cycle.

Two formats, told apart by their config file:

* PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``), which PEFT's LoRA writes and
  ftkit's own LoRA writes whenever PEFT can express it; ``PeftModel.from_pretrained`` loads it.
* ftkit's (``ftkit_adapter_config.json``, ``"format": "ftkit-lora"``, + the same weights file in
  PEFT key names), for BLOOM q/v-only LoRA, which PEFT cannot express.  With no
  ``adapter_config.json`` no PEFT loader mistakes the directory for its own.

Here: saving (atomically: a reader finds no adapter or a complete one), detecting, loading onto a
base (ftkit's LoRA from either format, or PEFT's), and loading the base an adapter names.
Merging into a standalone model is ``ftkit.merge``'s. An adapter ftkit saved lists its files'
checksums (``checksums.sha256``, ``ftkit.integrity``); reading one verifies them and names a
damaged file before any of it loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from ftkit import integrity, lora
from ftkit.config import PRECISIONS, ModelConfig
from ftkit.errors import ConfigError, FtkitError
from ftkit.io import atomic_dir
from ftkit.modeling import load_base_model, load_tokenizer, resolve_model_path

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
FTKIT_CONFIG_NAME = "ftkit_adapter_config.json"
ADAPTER_FORMATS = {PEFT_CONFIG_NAME: "peft", FTKIT_CONFIG_NAME: "ftkit"}
BASE_LABEL, TUNED_LABEL = "base", "fine-tuned"  # the two models of a before/after comparison
FTKIT_FORMAT = "ftkit-lora"
FTKIT_FORMAT_VERSION = 1
# PEFT options that change which modules are adapted or how; ftkit's LoRA implements none of them.
# (fan_in_fan_out is not among them: PEFT sets it per layer from the layer type, as ftkit does.)
_UNSUPPORTED_PEFT_OPTIONS = (
    "use_dora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "exclude_modules",
    "layers_to_transform",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
)


class AdapterError(FtkitError):
    """An adapter directory is missing, incomplete, unsupported or made for another base."""


# -- saving ---------------------------------------------------------------------------------------


def _write_ftkit_lora(
    model: torch.nn.Module, directory: Path, base_model_name_or_path: str, state_dict=None
) -> None:
    """Weights + config of ftkit's LoRA into ``directory``: PEFT's format when it can express it.

    ``state_dict`` (parameter name -> full tensor) replaces the parameters' own values, which
    are partial under ZeRO-3/FSDP (see ``ftkit.engines.trainable_state``).
    """
    settings = lora.lora_settings(model)
    peft_expressible = all(
        not isinstance(layer, lora.LoraLinear) or layer.rows is None
        for _, layer in lora.lora_layers(model)
    )
    if peft_expressible:
        config_name = PEFT_CONFIG_NAME
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": settings.r,
            "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout,
            "target_modules": list(settings.target_modules),
            "use_rslora": settings.use_rslora,
            "init_lora_weights": True if settings.init == "kaiming" else settings.init,
            "bias": "none",
            # PEFT's flag for Conv1D bases (GPT-2): their weight is (in, out).
            "fan_in_fan_out": any(
                getattr(layer, "fan_in_fan_out", False) for _, layer in lora.lora_layers(model)
            ),
            "inference_mode": True,
        }
    else:
        config_name = FTKIT_CONFIG_NAME
        config = {
            "format": FTKIT_FORMAT,
            "format_version": FTKIT_FORMAT_VERSION,
            "base_model_name_or_path": base_model_name_or_path,
            **asdict(settings),
        }
    tensors = lora.lora_state_dict(model, state_dict)
    tensors = {key: tensor.contiguous() for key, tensor in tensors.items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / config_name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_adapter(model: torch.nn.Module, out_dir, *, base_model_name_or_path: str) -> Path:
    """Write ftkit's LoRA of ``model`` as a fresh directory ``out_dir``, atomically."""
    with atomic_dir(out_dir) as scratch:
        _write_ftkit_lora(model, scratch, base_model_name_or_path)
        integrity.write_manifest(scratch)
    return Path(out_dir)


def save_trained(
    model, output_dir: Path, *, impl: str, base_model_name_or_path: str, state_dict=None
) -> None:
    """Write a run's trained weights into ``output_dir`` so a crash never leaves a valid-looking half.

    ``impl`` is the recipe's ``lora_impl``: ``peft`` and ``ftkit`` write an adapter, ``none`` (a
    full fine-tune) the whole model.  Files are staged in a scratch dir, the old commit files
    (both formats' configs) are removed first, weights are renamed in, and the configs last.
    The checksums are the caller's to write, once everything else is staged beside the weights
    (``rundir.commit``). ``state_dict`` (trainable parameter names -> full tensors) is written instead of the
    parameters' own values when those are sharded (ZeRO-3, FSDP: ``engines.trainable_state``).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter-staging-", dir=output_dir) as tmp:
        staged = Path(tmp)
        if impl == "ftkit":
            _write_ftkit_lora(model, staged, base_model_name_or_path, state_dict)
        else:
            if impl == "peft":
                model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
            extra = {} if state_dict is None else {"state_dict": state_dict}
            model.save_pretrained(staged, safe_serialization=True, **extra)
        _publish(staged, output_dir)


def _publish(staged: Path, target: Path) -> None:
    """Rename every staged file into ``target``, the config files last."""
    files = sorted(p for p in staged.iterdir() if p.is_file())
    commit = [p for p in files if p.name.endswith("config.json")]
    # A stale config of the other format must not survive next to new weights.
    for name in ADAPTER_FORMATS:
        (target / name).unlink(missing_ok=True)
    for path in [p for p in files if p not in commit] + commit:
        os.replace(path, target / path.name)


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """A saved adapter directory: its format and the base model it was trained on."""

    path: Path
    format: str
    base_model_name_or_path: str | None

    @classmethod
    def read(cls, adapter_dir: str | Path) -> Adapter:
        path = Path(adapter_dir)
        if not path.is_dir():
            raise AdapterError(
                f"adapter directory not found: {path} (pass --adapter_dir the output_dir of a "
                "training run)"
            )
        for config_name, adapter_format in ADAPTER_FORMATS.items():
            config_path = path / config_name
            if config_path.is_file():
                config = _read_json(config_path)
                if not any((path / name).is_file() for name in (WEIGHTS_NAME, "adapter_model.bin")):
                    raise AdapterError(
                        f"{path} has {config_name} but its weights file {WEIGHTS_NAME} is "
                        "missing (deleted, or the run did not finish); pass a complete adapter "
                        "dir, or train again"
                    )
                verify_adapter_files(path)
                return cls(path, adapter_format, config.get("base_model_name_or_path"))
        raise AdapterError(
            f"{path} holds neither {PEFT_CONFIG_NAME} nor {FTKIT_CONFIG_NAME}: it is no saved "
            "adapter (a full fine-tune is a model: load it with from_pretrained)"
        )

    def base_for(self, base_model: str | None) -> str:
        """The base given on the command line, else the one recorded at training time."""
        if base_model:
            return base_model
        base = self.base_model_name_or_path
        if not base:
            raise ConfigError(f"{self.path} does not name its base model; pass --base_model")
        if Path(base).is_absolute() and not Path(base).exists():  # e.g. trained on another machine
            raise AdapterError(
                f"{self.path} was trained on {base}, which does not exist here; pass --base_model "
                "the same base model (a local dir or Hub id)"
            )
        return base

    @property
    def tokenizer_path(self) -> Path | None:
        """Training saves its tokenizer beside the adapter; that one matches the training data."""
        return self.path if (self.path / "tokenizer_config.json").is_file() else None


def verify_adapter_files(adapter_dir: Path) -> None:
    """Refuse an adapter dir whose files no longer match their checksums, naming the file."""
    fix = "copy it again, or train it again"
    if any((adapter_dir / "checkpoints").glob("checkpoint-*")):
        fix += " (--resume_from_checkpoint latest continues from its last checkpoint)"
    fix += f"; if you edited it on purpose, delete {integrity.MANIFEST_NAME} to load it unverified"
    integrity.verify(adapter_dir, "adapter", fix)


def load_adapter(model: torch.nn.Module, adapter_dir) -> list[str]:
    """Inject ftkit's LoRA as ``adapter_dir`` describes (either format) and load its weights.

    Its checksums are verified first, when it has them. On any error the model is left without
    LoRA, exactly as it was.
    """
    return _load_adapter(model, Path(adapter_dir), verified=False)


def _load_adapter(model: torch.nn.Module, adapter_dir: Path, verified: bool) -> list[str]:
    settings = _read_settings(adapter_dir)
    weights_path = adapter_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(
            f"{weights_path} is missing; re-save the adapter with save_adapter() or "
            "PeftModel.save_pretrained(..., safe_serialization=True)"
        )
    if not verified:
        verify_adapter_files(adapter_dir)
    tensors = load_file(weights_path)
    try:
        matched = lora.inject(model, settings)
    except lora.LoraTargetError as err:
        raise AdapterError(
            f"adapter {adapter_dir} does not fit this model ({err}); load it onto the base model "
            "it was trained on"
        ) from err
    try:
        _copy_adapter_tensors(model, tensors, adapter_dir)
    except AdapterError:
        lora.remove_lora(model)
        raise
    return matched


def _copy_adapter_tensors(model: torch.nn.Module, tensors: dict, adapter_dir: Path) -> None:
    """Check every key and shape first, then copy, so a bad file changes nothing."""
    prefix = lora.PEFT_KEY_PREFIX
    destinations = {}
    for name, layer in lora.lora_layers(model):
        for param_name, param in layer.adapter_named_parameters():
            destinations[f"{prefix}{name}.{param_name}"] = param
    missing = sorted(destinations.keys() - tensors.keys())
    # PEFT saves whole embedding base weights next to their LoRA (for resized vocabularies).
    for name, layer in lora.lora_layers(model):
        key = f"{prefix}{name}.base_layer.weight"
        if key in tensors:
            destinations[key] = layer.base_layer.weight
    unexpected = sorted(tensors.keys() - destinations.keys())
    if missing or unexpected:
        raise AdapterError(
            f"{adapter_dir / WEIGHTS_NAME} does not match the LoRA layers its config describes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-save the adapter"
        )
    for key, tensor in tensors.items():
        expected = destinations[key].shape
        if tensor.shape != expected:
            raise AdapterError(
                f"{adapter_dir}: {key} has shape {tuple(tensor.shape)} but this model needs "
                f"{tuple(expected)}; the adapter was made for another base model, load it onto "
                "the base named in its config (base_model_name_or_path)"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            destinations[key].copy_(tensor)


def _read_settings(adapter_dir: Path) -> lora.LoraSettings:
    if not adapter_dir.is_dir():
        raise AdapterError(
            f"adapter directory {adapter_dir} does not exist; pass the directory written by "
            "save_adapter() or PeftModel.save_pretrained()"
        )
    ftkit_config_path = adapter_dir / FTKIT_CONFIG_NAME
    peft_config_path = adapter_dir / PEFT_CONFIG_NAME
    if ftkit_config_path.is_file():
        config = _read_json(ftkit_config_path)
        names = [f.name for f in fields(lora.LoraSettings)]
        format_ok = config.get("format") == FTKIT_FORMAT
        if not format_ok or config.get("format_version") != FTKIT_FORMAT_VERSION:
            raise AdapterError(
                f"{ftkit_config_path} is not an {FTKIT_FORMAT} v{FTKIT_FORMAT_VERSION} config; "
                "re-save the adapter with this version of ftkit"
            )
        if missing := [name for name in names if name not in config]:
            raise AdapterError(f"{ftkit_config_path} lacks {missing}; re-save the adapter")
        values = {name: config[name] for name in names}
        return lora.LoraSettings(**{**values, "target_modules": tuple(values["target_modules"])})
    if peft_config_path.is_file():
        return _settings_from_peft(_read_json(peft_config_path), peft_config_path)
    raise AdapterError(
        f"{adapter_dir} holds neither {PEFT_CONFIG_NAME} nor {FTKIT_CONFIG_NAME}; pass the "
        "directory written by save_adapter() or PeftModel.save_pretrained()"
    )


def _settings_from_peft(config: dict, path: Path) -> lora.LoraSettings:
    if config.get("peft_type") != "LORA" or "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{path} is not a PEFT LoRA config (peft_type LORA with r, lora_alpha)")
    unsupported = [option for option in _UNSUPPORTED_PEFT_OPTIONS if config.get(option)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if not isinstance(config.get("target_modules"), list):
        unsupported.append("target_modules (regex or none)")
    if unsupported:
        raise AdapterError(
            f"{path} uses PEFT options ftkit's LoRA does not implement: {unsupported}; "
            "load it with peft.PeftModel.from_pretrained instead"
        )
    return lora.LoraSettings(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=tuple(config["target_modules"]),
        use_rslora=config.get("use_rslora", False),
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming",
        bloom_qv_only=False,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"cannot read {path}: {err}; re-save the adapter") from err


# -- base + adapter, for generation, evaluation and merging ---------------------------------------


@dataclass
class AdapterArgs:
    """Which adapter to use, on which base, with the base held in which (full-precision) dtype."""

    adapter_dir: str = field(
        metadata={"help": "A training output_dir: a PEFT or ftkit adapter (+ its tokenizer)."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model (default: the adapter's base_model_name_or_path)."},
    )
    dtype: str = field(
        default="fp32", metadata={"help": f"dtype of the base weights: {', '.join(PRECISIONS)}."}
    )

    def __post_init__(self):
        if self.dtype not in PRECISIONS:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {PRECISIONS}")


@dataclass
class LoadedBase:
    """A base model in eval mode, the tokenizer to use with it, and the adapter to attach.

    Before/after runs use one model: the base runs first, then the adapter is attached to the
    same weights, so a 7B base is held once and both formats are handled alike.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    base: str


def load_base(
    args: AdapterArgs, device: torch.device | str | None = None, adapter: Adapter | None = None
) -> LoadedBase:
    """Read the adapter dir (cheap checks first), then load its base and tokenizer.

    ``adapter``: the dir already read (and verified) by the caller, so it is not hashed twice.
    """
    adapter = adapter or Adapter.read(args.adapter_dir)
    base = adapter.base_for(args.base_model)
    tokenizer = load_tokenizer(str(adapter.tokenizer_path or resolve_model_path(base)))
    # The run's tokenizer may hold an added pad token: fit_embeddings rebuilds training's rows.
    config = ModelConfig(model_name_or_path=base, model_dtype=args.dtype)
    model = load_base_model(config, tokenizer=tokenizer)
    model.config.use_cache = True  # load_base_model turns it off for training
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return LoadedBase(model, tokenizer, adapter, base)


def attach_adapter(loaded: LoadedBase) -> torch.nn.Module:
    """The fine-tuned model (eval mode); a failure names the adapter's base and the model given."""
    adapter = loaded.adapter
    try:
        if adapter.format == "peft":
            from peft import PeftModel

            from ftkit.quiet import peft_calls

            with peft_calls():
                model = PeftModel.from_pretrained(loaded.model, adapter.path)
        else:
            _load_adapter(loaded.model, adapter.path, verified=True)  # by Adapter.read
            model = loaded.model
    # PEFT raises RuntimeError (size mismatch) or ValueError (no target); ftkit an AdapterError.
    except (RuntimeError, ValueError) as err:
        # PEFT puts each mismatched tensor on a line of its own: the first one says it all.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = " ".join(lines[:2]).rstrip(".")
        own_base = adapter.base_model_name_or_path
        hint = "" if loaded.base == own_base else " (leave out --base_model to use its own base)"
        raise AdapterError(
            f"cannot load adapter {adapter.path}, trained on {own_base!r}, onto the model given, "
            f"{loaded.base!r}: {cause}{hint}"
        ) from err
    return model.eval()

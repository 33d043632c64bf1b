"""ftkit's own LoRA layers and their injection, numerically interchangeable with PEFT's.

``apply_lora`` wraps each targeted ``nn.Linear`` / ``nn.Embedding`` (bitsandbytes ``Linear8bitLt``
and ``Linear4bit`` are ``nn.Linear`` subclasses, so they are covered without importing
bitsandbytes) in a ``LoraLinear`` / ``LoraEmbedding`` that holds the frozen layer as
``base_layer``. Module and parameter names (``lora_A.weight``, ``lora_embedding_A``...), the RNG
draws at injection and the fp32 arithmetic follow PEFT's ``tuners/lora/layer.py``, so the same
seed gives bit-identical adapters and ``lora_state_dict`` uses PEFT's key names.

Quantised bases: forward and training work, merging is refused (``LoraMergeError``).
Dequantise -> merge -> requantise would add a second rounding error, so the merged model would no
longer compute what was trained and ``unmerge`` could not restore the base. To export a merged
model, load the base in full precision, load the saved adapter onto it
(``ftkit.adapters``), then ``merge_lora`` / ``unload_lora`` there: ``ftkit.merge`` does so.

BLOOM q/v-only (default for ``model_type == "bloom"``, ``bloom_qv_only=False`` for PEFT's
whole-matrix LoRA): BLOOM fuses q, k and v in ``query_key_value`` with output rows laid out as
``[n_head, 3 (q, k, v), head_dim]``. The q/v-only layer's B has only the 2/3 of rows that hold q
and v, and its output is scattered onto them with ``index_add``, so k never changes and every
trainable parameter is real. PEFT cannot express that, so ``ftkit.adapters`` saves such adapters
in ftkit's own directory format; everything else as a regular PEFT adapter.

This module knows modules, not directories: saving and loading adapters is ``ftkit.adapters``'.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ftkit.errors import FtkitError

logger = logging.getLogger(__name__)

# ftkit's own defaults, which win over PEFT's mapping (LLaMA and BLOOM keep the targets they always
# had; on BLOOM ftkit's LoRA adapts only the q and v rows of query_key_value, see above).
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "bloom": ("query_key_value",)}
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear/Conv1D except the output head
TARGET_FLAG = "--lora_target"  # what the user passes; errors name it, not PEFT's target_modules
INITS = ("kaiming", "gaussian")
BLOOM_FUSED_QKV = "query_key_value"

PEFT_KEY_PREFIX = "base_model.model."

# bitsandbytes parameter classes, recognised by name so that bitsandbytes stays optional.
_QUANTISED_PARAM_TYPES = ("Int8Params", "Params4bit")
_SETTINGS_ATTR = "ftkit_lora_settings"


class LoraTargetError(FtkitError):
    """A LoRA target matches no module, or no default targets exist for the architecture."""


class LoraMergeError(FtkitError):
    """Merging would corrupt the base weights (non-finite result, quantised base)."""


class LoraLayer(nn.Module):
    """Scaling and merge bookkeeping shared by the Linear and Embedding wrappers.

    Subclasses provide ``delta_weight()`` in the layout of ``base_layer.weight``.
    """

    def __init__(self, base_layer: nn.Module, *, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The adapter's own parameters: everything except the frozen base layer's."""
        frozen = set(self.base_layer.parameters())
        return [(name, param) for name, param in self.named_parameters() if param not in frozen]

    def check_merge(self, safe_merge: bool = False) -> None:
        """Raise ``LoraMergeError`` if merging is refused or, with ``safe_merge``, not finite."""
        weight = self.base_layer.weight
        if type(weight).__name__ in _QUANTISED_PARAM_TYPES:
            raise LoraMergeError(
                f"cannot merge LoRA into a quantised {type(self.base_layer).__name__}: "
                "requantising would change what was trained. Load the base model in full "
                "precision (no quantization_config), load_adapter() onto it and merge there."
            )
        if safe_merge and not torch.isfinite(weight + self.delta_weight().to(weight.dtype)).all():
            raise LoraMergeError(
                "merging would put NaN/inf into the base weights; the adapter weights are "
                "broken (check the learning rate / loss scaling of the run that made them)"
            )

    def merge(self, safe_merge: bool = False) -> None:
        """Add the update into the base weight in place; no-op if already merged."""
        if self.merged:
            return
        self.check_merge(safe_merge)
        weight = self.base_layer.weight
        weight.data += self.delta_weight().to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (no-op if not merged)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data -= self.delta_weight().to(weight.dtype)
        self.merged = False


class LoraLinear(LoraLayer):
    """``base(x) + B(A(dropout(x))) * scaling`` with fp32 A and B whatever the base dtype.

    The base is an ``nn.Linear`` (weight ``(out, in)``) or transformers' ``Conv1D`` (GPT-2's
    ``c_attn``...: weight ``(in, out)``, PEFT's ``fan_in_fan_out=True``); A and B are the same
    either way, only ``delta_weight`` is transposed to the base's layout.

    ``rows`` restricts the update to those output rows: B then has ``len(rows)`` rows and its
    output is scattered into place (BLOOM q/v-only).
    """

    def __init__(
        self,
        base_layer: nn.Linear | Conv1D,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__(base_layer, r=r, alpha=alpha, use_rslora=use_rslora)
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; choose one of {INITS}")
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        in_features, out_features = linear_shape(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        # PEFT's order of RNG draws: both nn.Linear draw their default init, then A is re-drawn.
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features if rows is None else len(rows), bias=False)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        nn.init.zeros_(self.lora_B.weight)
        device = base_layer.weight.device
        self.lora_A.to(device)
        self.lora_B.to(device)
        self.register_buffer("rows", None if rows is None else rows.to(device), persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(lora_x)) * self.scaling
        if self.rows is not None:
            full = update.new_zeros(*update.shape[:-1], self.out_features)
            update = full.index_add(-1, self.rows, update)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B.weight @ self.lora_A.weight * self.scaling
        if self.rows is not None:
            full = delta.new_zeros(self.out_features, self.in_features)
            delta = full.index_add(0, self.rows, delta)
        return delta.T if self.fan_in_fan_out else delta


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D`` (weight ``(in, out)``)."""
    if isinstance(layer, Conv1D):
        n_in, n_out = layer.weight.shape
        return n_in, n_out
    return layer.in_features, layer.out_features


class LoraEmbedding(LoraLayer):
    """``base(ids) + embedding(ids, Aᵀ) @ Bᵀ * scaling``, PEFT's embedding convention.

    A is ``(r, num_embeddings)`` and starts at zero, B is ``(embedding_dim, r)`` standard normal;
    like PEFT, no dropout is applied (dropping token ids is not meaningful).
    """

    def __init__(
        self, base_layer: nn.Embedding, *, r: int, alpha: float, use_rslora: bool = False
    ) -> None:
        super().__init__(base_layer, r=r, alpha=alpha, use_rslora=use_rslora)
        # PEFT's order of RNG draws: randn for A and B, then zero A and re-draw B.
        weight_A = torch.randn(r, base_layer.num_embeddings)
        weight_B = torch.randn(base_layer.embedding_dim, r)
        nn.init.zeros_(weight_A)
        nn.init.normal_(weight_B)
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(weight_A.to(device))
        self.lora_embedding_B = nn.Parameter(weight_B.to(device))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        after_A = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.base_layer.padding_idx)
        update = (after_A @ self.lora_embedding_B.T) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


@dataclass(frozen=True)
class LoraSettings:
    """What a model's LoRA was built with; an adapter directory records it."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    init: str
    bloom_qv_only: bool


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The architecture's default targets: ftkit's own (LLaMA, BLOOM), else PEFT's mapping."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    model_type = _model_type(model)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    if model_type in PEFT:
        return tuple(PEFT[model_type])
    raise LoraTargetError(
        f"no default LoRA targets for model_type {model_type!r} (neither ftkit nor PEFT has "
        f"one); pass {TARGET_FLAG} {ALL_LINEAR}, or module names chosen from this model's linear "
        f"modules: {linear_module_names(model)}"
    )


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | None) -> tuple[str, ...]:
    """``target_modules`` as given (``all-linear`` expanded), or the architecture's default.

    ``all-linear`` means what it means to PEFT: the full names of every ``nn.Linear`` and
    ``Conv1D`` except the output head (``get_output_embeddings()``).
    """
    if target_modules is None:
        return default_targets(model)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = tuple(target_modules)
    if any(t.lower() == ALL_LINEAR for t in targets):
        if len(targets) > 1:
            raise LoraTargetError(
                f"{TARGET_FLAG} {ALL_LINEAR} already selects every linear layer; pass it alone, "
                f"not with {[t for t in targets if t.lower() != ALL_LINEAR]}"
            )
        return all_linear_names(model)
    return targets


def all_linear_names(model: nn.Module) -> tuple[str, ...]:
    """PEFT's ``all-linear``: every Linear/Conv1D module's full name, the output head excluded."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    names = tuple(
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
        and module is not head
        and not isinstance(module, LoraLayer)
        and ".lora_" not in f".{name}"
    )
    if not names:
        raise LoraTargetError(
            f"{TARGET_FLAG} {ALL_LINEAR}: {type(model).__name__} has no linear layer"
        )
    return names


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
    use_rslora: bool = False,
    init: str = "kaiming",
    bloom_qv_only: bool | None = None,
) -> list[str]:
    """Wrap the targeted modules in place, freeze everything else; return the wrapped names.

    Targets match like PEFT's ``target_modules`` list: a module name equal to a target or ending
    in ``.<target>``. ``bloom_qv_only=None`` means q/v-only on BLOOM, off elsewhere.
    """
    is_bloom = _model_type(model) == "bloom"
    if bloom_qv_only is None:
        bloom_qv_only = is_bloom
    elif bloom_qv_only and not is_bloom:
        raise ValueError(f"bloom_qv_only=True needs a BLOOM model, got {_model_type(model)!r}")
    settings = LoraSettings(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=resolve_targets(model, target_modules),
        use_rslora=use_rslora,
        init=init,
        bloom_qv_only=bloom_qv_only,
    )
    return inject(model, settings)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(module name, layer)`` for every ftkit LoRA layer, in ``named_modules`` order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def merge_lora(model: nn.Module, safe_merge: bool = False) -> None:
    """Merge every LoRA layer; all layers are checked before any weight changes."""
    pending = [(name, layer) for name, layer in lora_layers(model) if not layer.merged]
    for name, layer in pending:
        try:
            layer.check_merge(safe_merge)
        except LoraMergeError as err:
            raise LoraMergeError(f"{name}: {err}") from err
    for _, layer in pending:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge, then put the base layers back in place of the wrappers: a plain exportable model."""
    merge_lora(model)
    remove_lora(model)
    return model


def lora_state_dict(model: nn.Module, values: dict | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors under the keys ``peft.get_peft_model_state_dict`` gives for this model.

    ``values`` (the model's parameter names -> tensors, e.g. gathered from ZeRO-3 partitions)
    supplies the tensors instead of the parameters themselves.
    """
    names = {} if values is None else {id(p): n for n, p in model.named_parameters()}
    return {
        f"{PEFT_KEY_PREFIX}{name}.{param_name}": (
            param.detach() if values is None else values[names[id(param)]]
        )
        for name, layer in lora_layers(model)
        for param_name, param in layer.adapter_named_parameters()
    }


def match_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the Linear/Embedding modules the targets select; a target matching none is loud.

    Shared by both implementations, so PEFT's LoRA fails with the same candidate list.
    """
    adaptable = _adaptable_modules(model)
    unmatched = [t for t in target_modules if not any(_matches(name, t) for name in adaptable)]
    if unmatched:
        raise LoraTargetError(
            f"{TARGET_FLAG} {' '.join(unmatched)} matches no Linear/Conv1D/Embedding module of "
            f"{type(model).__name__}; pass {TARGET_FLAG} with names chosen from its linear "
            f"modules {linear_module_names(model)} (embeddings: {_embedding_names(model)}), "
            f"or {TARGET_FLAG} {ALL_LINEAR}"
        )
    return [name for name in adaptable if any(_matches(name, t) for t in target_modules)]


def inject(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the modules ``settings`` targets, freeze everything else; all or nothing."""
    if next(lora_layers(model), None) is not None:
        raise ValueError("model already carries ftkit LoRA layers; unload_lora() it or start fresh")
    adaptable = _adaptable_modules(model)
    matched = match_targets(model, settings.target_modules)
    try:
        for name in matched:  # named_modules order keeps the RNG draws in PEFT's order
            parent_name, _, child_name = name.rpartition(".")
            wrapper = _wrap(model, name, adaptable[name], settings)
            wrapper.train(adaptable[name].training)  # an eval-mode model gets no adapter dropout
            setattr(model.get_submodule(parent_name), child_name, wrapper)
    except Exception:
        remove_lora(model)  # all or nothing: a bad setting must not leave half a LoRA behind
        raise
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        for _, param in layer.adapter_named_parameters():
            param.requires_grad_(True)
    setattr(model, _SETTINGS_ATTR, settings)
    logger.info(
        "LoRA r=%d alpha=%s on %d modules (targets %s): %s",
        settings.r,
        settings.alpha,
        len(matched),
        list(settings.target_modules),
        matched,
    )
    return matched


def _wrap(model: nn.Module, name: str, module: nn.Module, settings: LoraSettings) -> LoraLayer:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(
            module, r=settings.r, alpha=settings.alpha, use_rslora=settings.use_rslora
        )
    rows = None
    if settings.bloom_qv_only and name.rpartition(".")[2] == BLOOM_FUSED_QKV:
        rows = _bloom_qv_rows(linear_shape(module)[1], model.config.num_attention_heads)
    return LoraLinear(
        module,
        r=settings.r,
        alpha=settings.alpha,
        dropout=settings.dropout,
        use_rslora=settings.use_rslora,
        init=settings.init,
        rows=rows,
    )


def _bloom_qv_rows(out_features: int, num_heads: int) -> torch.Tensor:
    """Ascending indices of the q and v rows in BLOOM's ``[n_head, 3, head_dim]`` fused output."""
    rows = torch.arange(out_features).view(num_heads, 3, out_features // (3 * num_heads))
    return rows[:, [0, 2]].flatten()


def remove_lora(model: nn.Module) -> None:
    """Put each wrapper's base layer back (as it is: merged or not) and forget the settings."""
    for name, layer in list(lora_layers(model)):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    if hasattr(model, _SETTINGS_ATTR):
        delattr(model, _SETTINGS_ATTR)


def lora_settings(model: nn.Module) -> LoraSettings:
    settings = getattr(model, _SETTINGS_ATTR, None)
    if settings is None:
        raise ValueError("model has no ftkit LoRA; call apply_lora() or load an adapter first")
    return settings


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding))
        and not isinstance(module, LoraLayer)
        and ".lora_" not in f".{name}"
    }


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's Linear/Conv1D modules (what a target can name)."""
    return sorted(
        {
            name.rpartition(".")[2]
            for name, module in _adaptable_modules(model).items()
            if not isinstance(module, nn.Embedding)
        }
    )


def _embedding_names(model: nn.Module) -> list[str]:
    return sorted(
        {
            name.rpartition(".")[2]
            for name, module in _adaptable_modules(model).items()
            if isinstance(module, nn.Embedding)
        }
    )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")

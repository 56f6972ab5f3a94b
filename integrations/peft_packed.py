"""LoRA on packed modules: ``peft.get_peft_model(packed_model, LoraConfig(...))`` works with no extra call.

A packed model's projections are :class:`~hf_compress.formats.linear.PackedLinear` (integer codes in buffers),
which PEFT's LoRA does not know: its dispatchers build a layer for ``nn.Linear``, bitsandbytes and a fixed list
of other quantization backends, and raise "Target module ... is not supported" for anything else. This module
teaches PEFT one more layer type, :class:`PackedLoraLinear`: the packed base's own forward (dequantize + linear,
weights frozen) plus the trainable LoRA delta, with the input/output dtype handling of PEFT's bnb layers.

How the plain call reaches it (the choice, and what it relies on)
-----------------------------------------------------------------
PEFT offers no public plugin point for LoRA layer types. The candidates, from the PEFT 0.19–0.21 sources:

* ``LoraConfig._register_custom_module({PackedLinear: ...})`` — experimental, and per *config instance*: every
  user config (and every config PEFT rebuilds from ``adapter_config.json`` in ``PeftModel.from_pretrained``)
  would need it, so making it automatic means patching ``LoraConfig.__post_init__`` too, on top of an API PEFT
  calls experimental and "subject to change";
* inserting into the dispatcher list — impossible: ``_create_new_module`` builds it as a local list each call;
* wrapping ``LoraModel._create_new_module`` — **chosen**. It is the single function through which every new LoRA
  layer is built (``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``, ``inject_adapter_in_model``
  and so transformers' ``add_adapter``); its signature ``(lora_config, adapter_name, target, **kwargs)`` is the same
  in every release checked (0.18–0.21). The wrapper answers only for a packed target and hands everything else to
  PEFT's original, so it cannot change what PEFT does for any other module.

Merging is refused up front by wrapping ``LoraModel._check_merge_allowed`` (PEFT's own hook for this, used to
refuse GPTQ models), so ``merge_and_unload``/``merge_adapter`` fail before any layer — a dense one included —
is modified; :meth:`PackedLoraLinear.merge` refuses too, for a direct call.

PEFT internals relied on (pyproject pins ``peft>=0.19,<0.23``; tested on 0.19.1, 0.20.0 and 0.21.2; 0.22, which
transformers 5.24's ``add_adapter`` asks for, was not yet published): ``LoraModel._create_new_module`` (static,
called as ``self._create_new_module``) and ``LoraModel._check_merge_allowed``; ``LoraLayer``'s
``__init__(base_layer)``, ``update_layer(adapter_name, r, lora_alpha=, config=)`` (0.19+; 0.18 took the options
one by one), ``_get_in_out_features``, ``lora_A``/``lora_B``/``lora_dropout``/``scaling``/``active_adapters``,
``_cast_input_dtype`` and ``_mixed_batch_forward``; ``BaseTunerLayer.get_base_layer``. Adapter weights stay
float32: PEFT casts adapters to the base's dtype only when the base ``weight`` is floating point (ours is uint8).

Other tuners (IA³, LoHa, LoKr, AdaLoRA, …) keep PEFT's own dispatch and refuse packed modules with PEFT's error;
each would need its own layer class (their forwards and merges read ``base_layer.weight`` as a float matrix).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from hf_compress.formats.embedding import PackedEmbedding
from hf_compress.formats.linear import PackedLinear

logger = logging.getLogger(__name__)

_MARK = "__hf_compress_packed__"  # set on our wrappers, so a second registration sees them and does nothing
# LoRA variants by config field in PEFT 0.19 (0.20+ also tags them with `is_lora_variant` metadata): each reads or
# rewrites the base weight as a float matrix (DoRA's norms, aLoRA/Arrow/… forwards), which packed codes are not
VARIANT_FIELDS = ("use_dora", "use_qalora", "alora_invocation_tokens", "arrow_config", "velora_config",
                  "monteclora_config", "use_bdlora", "kasa_config")
PLAIN_INITS = (True, False, "gaussian")  # the inits that never read the base weight (PiSSA, OLoRA, LoftQ, … do)


def _is_packed(target: nn.Module) -> bool:
    get_base = getattr(target, "get_base_layer", None)  # a layer of another tuner around a packed module
    base = get_base() if callable(get_base) else target
    return isinstance(base, PackedLinear) and not isinstance(base, PackedEmbedding)  # a packed table: PEFT refuses


def _refuse_unsupported(config, name: str) -> None:
    """LoRA options that need the base weight as a float matrix cannot work on packed codes: say which, up front."""
    asked = [f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
    asked += [n for n in VARIANT_FIELDS if getattr(config, n, None) and n not in asked]
    if asked:
        raise ValueError(f"LoRA on packed module {name!r}: {', '.join(asked)} not supported; these LoRA variants need "
                         "the base weight as a float matrix and hf-compress stores integer codes. Use plain LoRA, or "
                         "train on the dense model and quantize afterwards")
    init = config.init_lora_weights
    if init not in PLAIN_INITS:
        raise ValueError(f"LoRA on packed module {name!r}: init_lora_weights={init!r} is not supported (it derives the "
                         f"adapter from the base weight, which is stored as integer codes); use one of {PLAIN_INITS}")


def _merge_refusal(names) -> ValueError:
    return ValueError(
        f"cannot merge LoRA adapters into hf-compress packed modules ({', '.join(names[:4])}"
        f"{', …' if len(names) > 4 else ''}): their weights are stored as integer codes, and adding the dense LoRA "
        "delta would need a re-quantization that changes the base and discards part of the adapter. Keep the "
        "adapter unmerged (PeftModel runs base + adapter), or merge into the dense model and quantize that with "
        "hf_compress.quantize")


class PackedLoraLinear(nn.Module, LoraLayer):
    """LoRA around a :class:`PackedLinear`: ``base_layer(x)`` (frozen, dequantizing) + ``B(A(dropout(x))) · s``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 target_name: str | None = None, **kwargs) -> None:
        self._packed_name = target_name or type(base_layer).__name__
        _refuse_unsupported(config, self._packed_name)
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features  # PEFT's generic lookup would warn "unsupported layer type"

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        _refuse_unsupported(config, self._packed_name)  # a second adapter on the same layer comes here directly
        return super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        return None  # variants are refused in ``update_layer``; PEFT 0.19's default would ignore them silently

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise _merge_refusal([self._packed_name])

    def unmerge(self) -> None:
        """Nothing is ever merged into a packed base, so there is nothing to undo."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs.pop("alora_offsets", None)  # a variant's argument (refused here); never the base's
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            # as PEFT's bnb layers: outside autocast, run the adapter in its own dtype and cast back
            convert = not torch.is_autocast_enabled(x.device.type)
            h = self._cast_input_dtype(x, lora_A.weight.dtype) if convert else x
            delta = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            result = result + (delta.to(result.dtype) if convert else delta)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register() -> None:
    """Make PEFT's LoRA build :class:`PackedLoraLinear` for packed modules and refuse merging them (idempotent).

    Called by ``integrations.autoload`` once ``peft`` is imported; see the module docstring for why these hooks.
    """
    create = getattr(LoraModel, "_create_new_module", None)
    check = getattr(LoraModel, "_check_merge_allowed", None)
    if create is None or check is None:
        logger.warning("hf-compress: this PEFT version lacks LoraModel._create_new_module/_check_merge_allowed; "
                       "LoRA on packed modules is unavailable (tested: peft 0.19-0.21)")
        return
    if not getattr(create, _MARK, False):
        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            if _is_packed(target):
                return PackedLoraLinear(target, adapter_name, config=lora_config, **kwargs)
            return create(lora_config, adapter_name, target, **kwargs)

        setattr(_create_new_module, _MARK, True)
        LoraModel._create_new_module = staticmethod(_create_new_module)
    if not getattr(check, _MARK, False):
        def _check_merge_allowed(self):
            packed = [name for name, module in self.model.named_modules() if isinstance(module, PackedLoraLinear)]
            if packed:
                raise _merge_refusal(packed)
            return check(self)

        setattr(_check_merge_allowed, _MARK, True)
        LoraModel._check_merge_allowed = _check_merge_allowed

"""Quantization configs: one ``QuantizationConfigMixin`` per method, all sharing one plan format.

A config carries the method's hyper-parameters and, once a model is quantized, the resolved *plan*: a
mapping ``module name → {"bits", "group_size", "sym"}``. The plan is all that loading needs, so
``config.json`` is the single source of truth for how each module is stored.
"""

from __future__ import annotations

import re
import warnings

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_compress.calibration.data import CalibrationSpec, describe_source
from hf_compress.formats.grid import QuantSpec
from hf_compress.registry import option_groups, resolve

_COMMON_KEYS = {
    "bits", "group_size", "sym", "modules_to_not_convert", "dataset", "num_samples", "seq_len", "seed",
    "tokenizer", "plan", "quant_method", "report", "head_bits", "embedding_bits", "dense_dtype",
}
DENSE_DTYPES = ("float32", "float16", "bfloat16")


class HfcConfig(QuantizationConfigMixin):
    """Base of every hf-compress method config.

    Args:
        bits: code width for every planned module, 1–8 (``formats.packing.SUPPORTED_BITS``).
        group_size: input columns sharing one scale/zero (``-1``: one group per row). A group size that does
            not divide a layer's input dimension leaves a short last group; nothing is padded on disk.
        sym: symmetric grid (no zero points stored) instead of asymmetric.
        modules_to_not_convert: a regex or a list of regexes; a module whose full name matches (``re.search``)
            stays dense. A pattern that matches no quantizable module is warned about.
        dataset: calibration source for methods that need data (datasets spec, file path, list of strings, or
            pre-tokenized ids: see ``calibration.data``).
        num_samples, seq_len, seed: calibration windows (see ``calibration.data``).
        tokenizer: tokenizer name or path for quantize-on-load (default: the model's own path).
        plan: per-module specs ``{name: {"bits", "group_size", "sym"}}``. Given, it is executed as is (mixed
            widths per module); otherwise quantization fills it in. Loading reads nothing else.
        head_bits: also pack the output head (``lm_head``) at this width (weight-only round-to-nearest; 8 loses
            little, 4 more). A head tied to the input embeddings is untied (each is then stored on its own).
        embedding_bits: also pack the input embeddings (``embed_tokens``) at this width (weight-only round-to-nearest,
            same ``group_size``/``sym``; a lookup dequantizes only the rows it reads). Untied from the head like
            ``head_bits``; with both set, a tied table is stored twice, packed.
        dense_dtype: ``"float16"``/``"bfloat16"``/``"float32"`` for everything left dense (embeddings, norms,
            biases) after quantizing; default: keep the dtype the model was loaded in. Calibration still runs at
            the load dtype; the saved checkpoint then loads in ``dense_dtype``.
        Options of the registered option groups (``registry.register_option_group``; e.g. rotation and token
        weighting from ``methods/rsq``) are accepted by every config.
    """

    quant_method = "hfc_base"
    method_keys: tuple[str, ...] = ()
    needs_calibration = False
    # Model families the method runs on (see ``calibration.discovery.model_family``): calibrated methods run
    # the model block by block on token windows, which an encoder-decoder's decoder cannot take alone.
    architectures: tuple[str, ...] = ("decoder", "encoder", "encoder-decoder")
    calibrated_architectures: tuple[str, ...] = ("decoder", "encoder")
    # "module:function" ``(model, config, calibration, tokenizer, progress) -> model`` for a method whose stages or
    # stored modules differ from quantization's (e.g. sparse weights); ``quantize`` then hands the model to it.
    pipeline: str | None = None

    def __init__(self, bits=4, group_size=128, sym=False, modules_to_not_convert=None, dataset=None,
                 num_samples=32, seq_len=512, seed=0, tokenizer=None, plan=None, report=None, head_bits: int | None = None,
                 dense_dtype: str | None = None, embedding_bits: int | None = None, **kwargs):
        self.quant_method = type(self).quant_method
        self.bits, self.group_size, self.sym = bits, group_size, sym
        QuantSpec(bits, group_size, sym)  # validates eagerly: a bad config fails at construction
        self.modules_to_not_convert = _patterns(modules_to_not_convert)
        self.dataset, self.num_samples, self.seq_len, self.seed = dataset, num_samples, seq_len, seed
        self.tokenizer = tokenizer
        self.plan = None if plan is None else _validated_plan(plan)
        self.report = report
        if head_bits is not None:
            QuantSpec(head_bits, group_size, sym)
        self.head_bits = head_bits
        if embedding_bits is not None:
            QuantSpec(embedding_bits, group_size, sym)
        self.embedding_bits = embedding_bits
        if dense_dtype is not None and str(dense_dtype).removeprefix("torch.") not in DENSE_DTYPES:
            raise ValueError(f"dense_dtype must be one of {DENSE_DTYPES}, got {dense_dtype!r}")
        self.dense_dtype = None if dense_dtype is None else str(dense_dtype).removeprefix("torch.")
        groups = option_groups()
        for group in groups:
            for key, default in group.defaults.items():
                setattr(self, key, kwargs.pop(key, default))
        unknown = set(kwargs) - set(self.method_keys) - _COMMON_KEYS
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown options {sorted(unknown)}")
        for key, value in kwargs.items():
            setattr(self, key, value)
        for group in groups:
            if group.validate:
                resolve(group.validate)(self)

    # -- calibration ---------------------------------------------------------------------------------------
    def calibration_spec(self, override=None) -> CalibrationSpec | None:
        source = override if override is not None else self.dataset
        if source is None:
            return None
        if isinstance(source, CalibrationSpec):
            return source
        return CalibrationSpec(source, self.num_samples, self.seq_len, self.seed)

    # -- planning ------------------------------------------------------------------------------------------
    def default_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def is_excluded(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.modules_to_not_convert)

    def supported_architectures(self) -> tuple[str, ...]:
        return self.calibrated_architectures if self.needs_calibration else self.architectures

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model family this method does not support, before any work, with the supported list."""
        from hf_compress.calibration.discovery import model_family

        family = model_family(model)
        supported = self.supported_architectures()
        if family not in supported:
            raise ValueError(f"{type(self).__name__} does not support {type(model).__name__} (an {family} model): it "
                             f"supports {', '.join(supported)} models" + (
                                 "; weight-only RTNConfig quantizes any architecture" if self.needs_calibration else ""))

    @property
    def solver_needs_statistics(self) -> bool:
        """Whether the per-module solver needs calibration Hessians (else modules are solved weight-only)."""
        return self.needs_calibration

    @property
    def plan_needs_whole_model(self) -> bool:
        """Whether planning reads the model's weights or activations (a method's own ``resolve_plan``, e.g. from
        sensitivity scores), so streaming, which holds one block at a time, cannot plan it. An explicit ``plan``
        never does."""
        return not self.plan and type(self).resolve_plan is not HfcConfig.resolve_plan

    def resolve_plan(self, model: nn.Module, batches=None) -> dict[str, QuantSpec]:
        """The plan to execute: the given ``plan`` (per-module specs, e.g. mixed bit widths) if set, else a
        uniform plan over every linear-like module inside the decoder blocks (embeddings and head stay dense)."""
        from hf_compress.calibration.discovery import is_linear_like

        if self.plan:
            plan = self.plan_specs()
            names = dict(model.named_modules())
            bad = [n for n in plan if n not in names or not (is_linear_like(names[n]) or
                                                             isinstance(names[n], nn.Embedding))]
            if bad:
                raise ValueError(f"plan names modules that are neither linear layers nor embeddings of this model: "
                                 f"{bad[:5]}")
            return plan
        plan = {name: self.default_spec() for name in self.planned_module_names(model)}
        head = self.head_module_name(model)
        if head is not None:
            plan[head] = QuantSpec(self.head_bits, self.group_size, self.sym)
        embeddings = self.embedding_module_name(model)
        if embeddings is not None:
            plan[embeddings] = QuantSpec(self.embedding_bits, self.group_size, self.sym)
        return plan

    def embedding_module_name(self, model: nn.Module) -> str | None:
        """The input embeddings' module name when ``embedding_bits`` asks to pack them."""
        if self.embedding_bits is None:
            return None
        return _named_table(model, "get_input_embeddings", lambda m: type(m) is nn.Embedding,
                            "embedding_bits", "plain nn.Embedding input table")

    def head_module_name(self, model: nn.Module) -> str | None:
        """The output head's module name when ``head_bits`` asks to pack it."""
        if self.head_bits is None:
            return None
        return _named_table(model, "get_output_embeddings", lambda m: isinstance(m, nn.Linear), "head_bits",
                            "linear output head")

    def planned_module_names(self, model: nn.Module) -> list[str]:
        """Decoder linears this config quantizes (``modules_to_not_convert`` applied); never empty."""
        from hf_compress.calibration.discovery import decoder_layers, quantizable_modules

        prefix, layers = decoder_layers(model)
        candidates = [f"{prefix}.{rel}" for rel, _ in quantizable_modules(layers)]
        names = [n for n in candidates if not self.is_excluded(n)]
        if not names:
            raise ValueError(f"nothing to quantize: modules_to_not_convert {self.modules_to_not_convert} excludes all "
                             f"{len(candidates)} linear modules (e.g. {candidates[0]!r})")
        unused = [p for p in self.modules_to_not_convert if not any(re.search(p, n) for n in candidates)]
        if unused:
            warnings.warn(f"modules_to_not_convert patterns {unused} match none of the {len(candidates)} quantizable "
                          f"modules (e.g. {candidates[0]!r}); nothing is excluded by them", stacklevel=2)
        return names

    # -- hooks of the option groups -----------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Transform ``model`` before planning (each option group's ``prepare_model``, e.g. a rotation)."""
        for group in option_groups():
            if group.prepare_model:
                resolve(group.prepare_model)(model, self)

    def token_weights(self):
        """A ``run_sequential`` token-weight callback, or None (at most one option group may weight tokens)."""
        found = [w for g in option_groups() if g.token_weights for w in [resolve(g.token_weights)(self)] if w is not None]
        if len(found) > 1:
            raise ValueError("more than one option group weights calibration tokens; choose one")
        if found and not self.solver_needs_statistics:
            raise ValueError(f"token weighting weights calibration Hessians; {type(self).__name__} with this solver "
                             "uses none")
        return found[0] if found else None

    def plan_specs(self) -> dict[str, QuantSpec]:
        if not self.plan:
            state = "no `plan` (missing or null)" if self.plan is None else "an empty `plan`"
            raise ValueError(f"this {type(self).__name__} has {state} in its quantization_config: a pre-quantized "
                             "hf-compress checkpoint lists every packed module there as "
                             "{module name: {\"bits\", \"group_size\", \"sym\"}}; without it no module can be rebuilt")
        return {k: QuantSpec.from_dict(v) for k, v in self.plan.items()}

    def build_modules(self, model: nn.Module, dtype=None) -> tuple[type, ...]:
        """Loading: swap the planned modules of a meta-device model for empty stored modules; return their types
        (whose tensors the loader checks against the checkpoint)."""
        from hf_compress.checkpoint.rebuild import build_packed_modules
        from hf_compress.formats.linear import PackedLinear

        build_packed_modules(model, self.plan_specs(), dtype=dtype)
        return (PackedLinear,)

    # -- solving (overridden per method) -------------------------------------------------------------------
    def solve(self, weight, stats, spec: QuantSpec, name: str | None = None):
        """Quantize one module's ``weight [out, in]`` to ``spec`` (``stats.hessian`` when calibrated)."""
        raise NotImplementedError

    def to_dict(self):
        out = {k: v for k, v in super().to_dict().items() if not k.startswith("_")}  # transient solver state
        dataset = out.get("dataset")
        if dataset is not None and not isinstance(dataset, (str, dict)):
            out["dataset"] = describe_source(dataset)  # in-memory data: config.json records what it was
        return out


def _patterns(value) -> list[str]:
    """``modules_to_not_convert`` as a list of regexes: one string is one pattern (not its characters)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"modules_to_not_convert must be a regex string or a list of them, got {value!r}")
    for p in value:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"modules_to_not_convert pattern {p!r} is not a valid regex: {exc}") from None
    return list(value)


def _validated_plan(plan) -> dict[str, dict]:
    """The plan of a config (from code or a checkpoint's config.json), checked entry by entry so a damaged
    config fails naming the module and the key instead of as a bare KeyError later."""
    if not isinstance(plan, dict):
        raise ValueError(f"quantization_config `plan` must map module names to specs, got a {type(plan).__name__}")
    out = {}
    for name, entry in plan.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"quantization_config `plan` has a non-string module name {name!r}")
        if isinstance(entry, QuantSpec):
            entry = entry.to_dict()
        if not isinstance(entry, dict):
            raise ValueError(f"plan entry of {name!r} must be a dict with bits/group_size/sym, got {entry!r}")
        if "bits" not in entry:
            raise ValueError(f"plan entry of {name!r} has no \"bits\" (it has {sorted(entry)})")
        try:
            out[name] = QuantSpec.from_dict(entry).to_dict()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"plan entry of {name!r} is invalid: {exc}") from None
    return out


def _named_table(model: nn.Module, getter: str, accepts, option: str, what: str) -> str:
    """The name of the module ``model.<getter>()`` returns, if ``accepts`` it; else an error naming ``option``."""
    module = getattr(model, getter)() if hasattr(model, getter) else None
    name = next((n for n, m in model.named_modules() if m is module), None) if module is not None else None
    if name is None or not accepts(module):
        raise ValueError(f"{option}: {type(model).__name__} has no {what} to pack (found {type(module).__name__})")
    return name

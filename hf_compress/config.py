"""Quantization configs: one ``QuantizationConfigMixin`` per method, all sharing one plan format.

A config carries the method's hyper-parameters and, once a model is quantized, the resolved *plan*: a
mapping ``module name → {"bits", "group_size", "sym"}``. The plan is all that loading needs, so
``config.json`` is the single source of truth for how each module is stored.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration.data import CalibrationSpec
from .formats.grid import QuantSpec

_COMMON_KEYS = {
    "bits", "group_size", "sym", "modules_to_not_convert", "dataset", "num_samples", "seq_len", "seed",
    "tokenizer", "plan", "quant_method", "report", "rotate", "rotation_seed", "token_weighting", "r_min",
}


class HfcConfig(QuantizationConfigMixin):
    """Base of every hf-compress method config.

    Args:
        bits: code width for every planned module (2, 3, 4 or 8).
        group_size: input columns sharing one scale/zero (``-1``: one group per row). A group size that does
            not divide a layer's input dimension leaves a short last group; nothing is padded on disk.
        sym: symmetric grid (no zero points stored) instead of asymmetric.
        modules_to_not_convert: regexes; a module whose full name matches (``re.search``) stays dense.
        dataset: calibration source for methods that need data (datasets spec, file path, list of strings).
        num_samples, seq_len, seed: calibration windows (see ``calibration.data``).
        tokenizer: tokenizer name or path for quantize-on-load (default: the model's own path).
        plan: per-module specs ``{name: {"bits", "group_size", "sym"}}``. Given, it is executed as is (mixed
            widths per module); otherwise quantization fills it in. Loading reads nothing else.
        rotate, rotation_seed: fold norms and rotate the residual stream before quantizing (RSQ/QuaRot; Llama
            family). The checkpoint stays a plain model with untied, rotated weights.
        token_weighting: ``"attention"`` weights each token's Hessian contribution by the attention it receives
            (RSQ); ``r_min`` is the smallest weight. Needs a calibrated solver.
    """

    quant_method = "hfc_base"
    method_keys: tuple[str, ...] = ()
    needs_calibration = False

    def __init__(self, bits=4, group_size=128, sym=False, modules_to_not_convert=None, dataset=None,
                 num_samples=32, seq_len=512, seed=0, tokenizer=None, plan=None, report=None, rotate=False,
                 rotation_seed=0, token_weighting=None, r_min=0.01, **kwargs):
        self.quant_method = type(self).quant_method
        self.bits, self.group_size, self.sym = bits, group_size, sym
        QuantSpec(bits, group_size, sym)  # validates eagerly: a bad config fails at construction
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.dataset, self.num_samples, self.seq_len, self.seed = dataset, num_samples, seq_len, seed
        self.tokenizer = tokenizer
        self.plan = None if plan is None else {k: QuantSpec.from_dict(v).to_dict() for k, v in plan.items()}
        self.report = report
        if token_weighting not in (None, "attention"):
            raise ValueError(f"token_weighting must be None or 'attention', got {token_weighting!r}")
        if not 0 < r_min <= 1:
            raise ValueError(f"r_min must be in (0, 1], got {r_min}")
        self.rotate, self.rotation_seed, self.token_weighting, self.r_min = bool(rotate), rotation_seed, token_weighting, r_min
        unknown = set(kwargs) - set(self.method_keys) - _COMMON_KEYS
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown options {sorted(unknown)}")
        for key, value in kwargs.items():
            setattr(self, key, value)

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

    @property
    def solver_needs_statistics(self) -> bool:
        """Whether the per-module solver needs calibration Hessians (else modules are solved weight-only)."""
        return self.needs_calibration

    def resolve_plan(self, model: nn.Module, batches=None) -> dict[str, QuantSpec]:
        """The plan to execute: the given ``plan`` (per-module specs, e.g. mixed bit widths) if set, else a
        uniform plan over every linear-like module inside the decoder blocks (embeddings and head stay dense)."""
        from .calibration.discovery import decoder_layers, is_linear_like, quantizable_modules

        if self.plan:
            plan = self.plan_specs()
            names = dict(model.named_modules())
            bad = [n for n in plan if n not in names or not is_linear_like(names[n])]
            if bad:
                raise ValueError(f"plan names modules that are not linear layers of this model: {bad[:5]}")
            return plan
        prefix, layers = decoder_layers(model)
        plan = {}
        for rel, _mod in quantizable_modules(layers):
            name = f"{prefix}.{rel}"
            if not self.is_excluded(name):
                plan[name] = self.default_spec()
        if not plan:
            raise ValueError("nothing to quantize: every linear module was excluded by modules_to_not_convert")
        return plan

    def plan_specs(self) -> dict[str, QuantSpec]:
        if not self.plan:
            raise ValueError(f"this {type(self).__name__} holds no plan: the checkpoint was not quantized by hf-compress")
        return {k: QuantSpec.from_dict(v) for k, v in self.plan.items()}

    # -- solving (overridden per method) -------------------------------------------------------------------
    def solve(self, weight, stats, spec: QuantSpec, name: str | None = None):
        """Quantize one module's ``weight [out, in]`` to ``spec`` (``stats.hessian`` when calibrated)."""
        raise NotImplementedError

    def to_dict(self):
        out = {k: v for k, v in super().to_dict().items() if not k.startswith("_")}  # transient solver state
        if isinstance(out.get("dataset"), (list, tuple)):
            out["dataset"] = f"<{len(out['dataset'])} in-memory strings>"
        return out


class RTNConfig(HfcConfig):
    """Round-to-nearest; no calibration data. ``clip_grid > 0`` searches a clipping range per group."""

    quant_method = "hfc_rtn"
    method_keys = ("clip_grid",)

    def __init__(self, bits=4, group_size=128, sym=False, clip_grid=0, **kwargs):
        super().__init__(bits=bits, group_size=group_size, sym=sym, clip_grid=clip_grid, **kwargs)

    def solve(self, weight, stats, spec, name=None):
        from .solvers.rtn import rtn_quantize

        return rtn_quantize(weight, spec, None if stats is None else stats.hessian, self.clip_grid)


class GPTQConfig(HfcConfig):
    """GPTQ with damping, lazy blocks, act-order (static groups), clip search and true-sequential order.

    Args:
        damp: Hessian damping as a fraction of its mean diagonal.
        block_size: columns per lazy update block.
        act_order: quantize columns by descending Hessian diagonal.
        clip_grid: candidate range shrinks per group (0 disables the clipping search).
        dataset: calibration source (required).
    """

    quant_method = "hfc_gptq"
    method_keys = ("damp", "block_size", "act_order", "clip_grid")
    needs_calibration = True

    def __init__(self, bits=4, group_size=128, sym=False, damp=0.01, block_size=128, act_order=True, clip_grid=20, **kwargs):
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {damp}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        super().__init__(bits=bits, group_size=group_size, sym=sym, damp=damp, block_size=block_size,
                         act_order=act_order, clip_grid=clip_grid, **kwargs)

    def solve(self, weight, stats, spec, name=None):
        return run_solver("gptq", self, weight, stats, spec)


def run_solver(solver: str, config: HfcConfig, weight, stats, spec: QuantSpec, col_bits=None):
    """Run ``"gptq"`` or ``"rtn"`` with the config's solver options; shared by every planner config."""
    if solver == "rtn":
        from .solvers.rtn import rtn_quantize

        return rtn_quantize(weight, spec, None if stats is None else stats.hessian, config.clip_grid, col_bits=col_bits)
    from .solvers.gptq import gptq_quantize

    return gptq_quantize(weight, stats.hessian, spec, damp=config.damp, block_size=config.block_size,
                         act_order=config.act_order, clip_grid=config.clip_grid, col_bits=col_bits)


CONFIG_CLASSES = (RTNConfig, GPTQConfig)

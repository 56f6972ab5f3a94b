"""Pruning configs: magnitude, Wanda and SparseGPT as ``HfcConfig`` subclasses, sharing one sparsity plan.

A pruning plan maps module names to :class:`~hf_compress.formats.sparse.SparseSpec` dicts (pattern, kept count,
optional integer grid); ``config.json`` holds it, so loading rebuilds every ``SparseLinear`` with its exact shapes.
The configs run their own pipeline stage (``pipeline``: calibrate with the shared runner and Hessians, prune, store
sparse) and build their own modules on load (``build_modules``); everything else — ``from_pretrained``,
``save_pretrained``, the CLI flags, ``hf_compress.quantize`` — is the quantization configs' machinery.
"""

from __future__ import annotations

from torch import nn

from hf_compress.config import HfcConfig
from hf_compress.formats.grid import QuantSpec
from hf_compress.formats.sparse import SparseSpec, parse_pattern


class SparseConfig(HfcConfig):
    """Base of the pruning configs.

    Args:
        sparsity: fraction of each planned module's weights to prune, in [0, 1) (default 0.5; an N:M pattern
            fixes it to 1 − N/M).
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``): N kept in every M consecutive input columns.
        bits: also store the kept values as integer codes of this width (``None``: in the model's dtype); e.g.
            ``pattern="2:4", bits=4`` is 2:4 + 4-bit in one plan. ``group_size``/``sym``: that grid.
        plan: per-module targets ``{name: sparsity}`` or ``{name: {"pattern", "sparsity"}}`` (non-uniform ratios);
            a saved checkpoint's plan holds full specs.
    """

    quant_method = "hfc_sparse"
    method_keys = ("sparsity", "pattern")
    pipeline = "hf_compress.methods.sparse.pipeline:prune"
    architectures = ("decoder", "encoder")  # the plan covers decoder-block linears (an encoder-decoder has two stacks)

    def __init__(self, sparsity: float | None = None, pattern: str = "unstructured", bits: int | None = None,
                 group_size: int = 128, sym: bool = False, plan=None, **kwargs):
        nm = parse_pattern(pattern)
        if nm is not None:
            fixed = 1 - nm[0] / nm[1]
            if sparsity is not None and abs(sparsity - fixed) > 1e-9:
                raise ValueError(f"pattern {pattern} prunes exactly {fixed:g} of the weights; got sparsity={sparsity}")
            sparsity = fixed
        sparsity = 0.5 if sparsity is None else sparsity
        check_ratio(sparsity, "sparsity")
        super().__init__(bits=4 if bits is None else bits, group_size=group_size, sym=sym, sparsity=sparsity,
                         pattern=pattern, **kwargs)
        self.bits = bits  # None: values keep the model's dtype (the base config validated a placeholder grid)
        self.plan = None if plan is None else _validated_plan(plan, pattern)

    # -- planning ----------------------------------------------------------------------------------------------
    def module_spec(self, module: nn.Module, sparsity: float, pattern: str | None = None) -> SparseSpec:
        """The spec pruning ``sparsity`` of ``module``'s weights (the kept count rounded to an integer)."""
        from hf_compress.calibration.discovery import weight_matrix

        pattern = pattern or self.pattern
        out_f, in_f = weight_matrix(module).shape
        nnz = None if parse_pattern(pattern) else out_f * in_f - round(sparsity * out_f * in_f)
        return SparseSpec(pattern, nnz=nnz, sparsity=round(sparsity, 6), bits=self.bits, group_size=self.group_size,
                          sym=self.sym)

    def resolve_plan(self, model: nn.Module, batches=None) -> dict:
        """The given per-module targets completed to specs, else ``sparsity`` on every decoder linear; plus the
        packed head / embeddings when ``head_bits`` / ``embedding_bits`` ask for them."""
        if self.plan:
            names = dict(model.named_modules())
            bad = [n for n in self.plan if n not in names]
            if bad:
                raise ValueError(f"plan names modules this model does not have: {bad[:5]}")
            plan = {}
            for name, entry in self.plan.items():
                if "bits" in entry and "pattern" not in entry:
                    plan[name] = QuantSpec.from_dict(entry)
                elif entry.get("nnz") is not None or parse_pattern(entry["pattern"]):
                    plan[name] = SparseSpec.from_dict({**entry, "bits": entry.get("bits", self.bits)})
                else:
                    plan[name] = self.module_spec(names[name], entry["sparsity"], entry["pattern"])
            return plan
        modules = dict(model.named_modules())
        plan = {n: self.module_spec(modules[n], self.sparsity) for n in self.planned_module_names(model)}
        for name, bits in ((self.head_module_name(model), self.head_bits),
                           (self.embedding_module_name(model), self.embedding_bits)):
            if name is not None:
                plan[name] = QuantSpec(bits, self.group_size, self.sym)
        return plan

    def plan_specs(self) -> dict:
        if not self.plan:
            raise ValueError(f"this {type(self).__name__} has no `plan` in its quantization_config: a pruned "
                             "hf-compress checkpoint lists every sparse module there; without it none can be rebuilt")
        return {k: SparseSpec.from_dict(v) if "pattern" in v else QuantSpec.from_dict(v) for k, v in self.plan.items()}

    def build_modules(self, model: nn.Module, dtype=None) -> tuple[type, ...]:
        from hf_compress.methods.sparse.modules import build_sparse_modules

        return build_sparse_modules(model, self.plan_specs(), dtype)

    # -- solving -----------------------------------------------------------------------------------------------
    def prune_weight(self, weight, hessian, spec: SparseSpec):
        """``PruneResult`` for one module (its calibration Hessian when the method uses one)."""
        raise NotImplementedError

    def solve(self, weight, stats, spec, name=None):
        raise TypeError(f"{type(self).__name__} prunes (``prune_weight``); it does not quantize per module")


def check_ratio(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _validated_plan(plan, pattern: str) -> dict:
    """Per-module targets as dicts: ``{name: 0.6}`` is ``{name: {"pattern": pattern, "sparsity": 0.6}}``."""
    if not isinstance(plan, dict):
        raise ValueError(f"plan must map module names to sparsities or specs, got a {type(plan).__name__}")
    out = {}
    for name, entry in plan.items():
        if isinstance(entry, (SparseSpec, QuantSpec)):
            entry = entry.to_dict()
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"pattern": pattern, "sparsity": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"plan entry of {name!r} must be a sparsity or a dict, got {entry!r}")
        if "pattern" in entry:
            entry = {**entry}
            nm = parse_pattern(entry["pattern"])
            if nm is None and entry.get("nnz") is None:
                entry["sparsity"] = check_ratio(entry.get("sparsity"), f"plan entry {name!r} sparsity")
            if entry.get("nnz") is not None or nm is not None:
                SparseSpec.from_dict(entry)  # complete entries are validated now
        elif "bits" not in entry:
            raise ValueError(f"plan entry of {name!r} needs a 'pattern' (pruned) or 'bits' (packed), got {sorted(entry)}")
        out[name] = entry
    return out


class MagnitudeConfig(SparseConfig):
    """Magnitude pruning: keep the largest |W| per output row (data-free baseline)."""

    quant_method = "hfc_magnitude"

    def prune_weight(self, weight, hessian, spec):
        from hf_compress.methods.sparse.solvers import magnitude

        return magnitude(weight, _prune_count(weight, spec), spec.nm, hessian)


class WandaConfig(SparseConfig):
    """Wanda (Sun et al., 2023): keep the largest |W_ij|·‖X_j‖ per output row; needs calibration data."""

    quant_method = "hfc_wanda"
    needs_calibration = True

    def prune_weight(self, weight, hessian, spec):
        from hf_compress.methods.sparse.solvers import wanda

        return wanda(weight, hessian, _prune_count(weight, spec), spec.nm)


class SparseGPTConfig(SparseConfig):
    """SparseGPT (Frantar & Alistarh, 2023): OBS mask choice and weight updates with the calibration Hessian.

    Args:
        damp: Hessian damping as a fraction of its mean diagonal.
        block_size: columns per lazy update block.
    """

    quant_method = "hfc_sparsegpt"
    method_keys = ("sparsity", "pattern", "damp", "block_size")
    needs_calibration = True

    def __init__(self, sparsity: float | None = None, pattern: str = "unstructured", damp: float = 0.01,
                 block_size: int = 128, **kwargs):
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {damp}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        super().__init__(sparsity=sparsity, pattern=pattern, damp=damp, block_size=block_size, **kwargs)

    def prune_weight(self, weight, hessian, spec):
        from hf_compress.methods.sparse.solvers import output_error, sparsegpt

        result = sparsegpt(weight, hessian, _prune_count(weight, spec), spec.nm, self.block_size, self.damp)
        result.output_error = output_error(weight, result.weight, hessian)
        return result


def _prune_count(weight, spec: SparseSpec) -> int | None:
    return None if spec.nm else weight.numel() - spec.nnz

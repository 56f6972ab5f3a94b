"""ECoFLaP (Sung, Yoon & Bansal, ICLR'24): global per-block sparsity from zeroth-order importance, then a local
pruner (Wanda, or SparseGPT) at each block's ratio."""

from __future__ import annotations

from torch import nn

from hf_compress.formats.sparse import SparseSpec
from hf_compress.methods.sparse.config import SparseConfig, check_ratio


class EcoflapConfig(SparseConfig):
    """ECoFLaP: the total ``sparsity`` is met exactly over the planned modules, distributed over decoder blocks.

    Args:
        sparsity: global fraction pruned over all planned modules, in [0, 1).
        max_sparsity: per-block cap (default ``sparsity + 0.1``, the paper's scripts); in [sparsity, 1).
        local: the per-module pruner, ``"wanda"`` (the paper's default) or ``"sparsegpt"``.
        zo_samples: calibration windows for the zeroth-order scores (2 forward passes each per block).
        zo_eps: perturbation size ε.
        zo_seq_len: score on the first this many tokens of each window (default: whole windows; shorter is cheaper).
        damp, block_size: SparseGPT's, when ``local="sparsegpt"``.
    """

    quant_method = "hfc_ecoflap"
    method_keys = ("sparsity", "pattern", "max_sparsity", "local", "zo_samples", "zo_eps", "zo_seq_len", "damp",
                   "block_size", "allocation")
    derived_keys = ("allocation",)  # written by planning (per-block scores and ratios), not an option
    needs_calibration = True

    def __init__(self, sparsity: float | None = None, max_sparsity: float | None = None, local: str = "wanda",
                 zo_samples: int = 8, zo_eps: float = 1e-3, zo_seq_len: int | None = None, damp: float = 0.01,
                 block_size: int = 128,
                 pattern: str = "unstructured", allocation=None, **kwargs):
        if pattern != "unstructured":
            raise ValueError(f"ECoFLaP allocates unstructured sparsity per block; an N:M pattern ({pattern}) fixes "
                             "every module's ratio, so use WandaConfig/SparseGPTConfig for it")
        sparsity = 0.5 if sparsity is None else check_ratio(sparsity, "sparsity")
        max_sparsity = min(sparsity + 0.1, 0.99) if max_sparsity is None else check_ratio(max_sparsity, "max_sparsity")
        if max_sparsity < sparsity:
            raise ValueError(f"max_sparsity ({max_sparsity}) must be at least the global sparsity ({sparsity})")
        if local not in ("wanda", "sparsegpt"):
            raise ValueError(f"local must be 'wanda' or 'sparsegpt', got {local!r}")
        if not isinstance(zo_samples, int) or zo_samples < 1:
            raise ValueError(f"zo_samples must be a positive integer, got {zo_samples!r}")
        if not zo_eps > 0:
            raise ValueError(f"zo_eps must be positive, got {zo_eps!r}")
        if zo_seq_len is not None and (not isinstance(zo_seq_len, int) or zo_seq_len < 2):
            raise ValueError(f"zo_seq_len must be an integer of at least 2 tokens, got {zo_seq_len!r}")
        super().__init__(sparsity=sparsity, pattern=pattern, max_sparsity=max_sparsity, local=local,
                         zo_samples=zo_samples, zo_eps=zo_eps, zo_seq_len=zo_seq_len, damp=damp, block_size=block_size,
                         allocation=allocation, **kwargs)

    @property
    def plan_needs_whole_model(self) -> bool:
        return not self.plan

    def resolve_plan(self, model: nn.Module, batches=None) -> dict:
        """Score each decoder block (forward passes only), water-fill keep counts with the per-block cap, split each
        block's count over its modules; the plan and the per-block allocation go to ``config.json``."""
        if self.plan:
            return super().resolve_plan(model, batches)
        from hf_compress.calibration.discovery import decoder_layers
        from hf_compress.methods.ecoflap.allocation import split_keep, water_fill, zeroth_order_scores

        prefix, layers = decoder_layers(model)
        names = self.planned_module_names(model)
        modules = dict(model.named_modules())
        blocks = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
        blocks = [b for b in blocks if b]
        params = [[modules[n].weight for n in b] for b in blocks]  # perturbed in place, restored exactly
        windows = batches[: self.zo_samples, : self.zo_seq_len]
        scores = zeroth_order_scores(model, params, windows, self.zo_eps, self.seed)
        sizes = [sum(p.numel() for p in ps) for ps in params]
        keep = water_fill(sizes, scores, self.sparsity, self.max_sparsity)
        plan = {}
        for block, ps, k in zip(blocks, params, keep):
            for name, p, kept in zip(block, ps, split_keep(k, [p.numel() for p in ps])):
                plan[name] = SparseSpec("unstructured", nnz=kept, sparsity=round(1 - kept / p.numel(), 6),
                                        bits=self.bits, group_size=self.group_size, sym=self.sym)
        self.allocation = [{"block": int(b[0][len(prefix) + 1:].split(".")[0]), "score": round(s, 6),
                            "sparsity": round(1 - k / n, 6)} for b, s, k, n in zip(blocks, scores, keep, sizes)]
        return plan

    def prune_weight(self, weight, hessian, spec):
        from hf_compress.methods.sparse.solvers import output_error, sparsegpt, wanda

        prune = weight.numel() - spec.nnz
        if self.local == "sparsegpt":
            result = sparsegpt(weight, hessian, prune, None, self.block_size, self.damp)
            result.output_error = output_error(weight, result.weight, hessian)
            return result
        return wanda(weight, hessian, prune)

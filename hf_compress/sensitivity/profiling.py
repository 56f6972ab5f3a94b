"""``profile(model, calibration)``: every sensitivity score the planners use, from one calibration run.

Per decoder layer: LIM (block input/output cosine), ZD (weight z-score share), a Fisher estimate of the loss
increase from quantizing the layer, and the summed GPTQ loss. Per module: GPTQ column losses (BAQ's Hessian
proxy), per-column Fisher sums (high-impact channels), the relative output error and the Fisher estimate at a
reference grid. The model is left unchanged:
GPTQ runs against each module's Hessian, but its result is only measured, never written back.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_compress.calibration.data import calibration_batches
from hf_compress.calibration.discovery import decoder_layers, quantizable_modules, weight_matrix
from hf_compress.calibration.runner import run_sequential
from hf_compress.formats.grid import QuantSpec, dequantize_weight
from hf_compress.solvers.gptq import gptq_quantize
from hf_compress.solvers.rtn import rtn_quantize
from hf_compress.sensitivity.scores import fisher_loss_increase, lim_score, zd_score

logger = logging.getLogger(__name__)

PROFILE_FILE = "sensitivity_profile.json"


@dataclass
class SensitivityProfile:
    """Measured sensitivities of one model, serialisable as JSON and checkable against a model."""

    model_type: str
    reference: dict  # the grid the losses were measured at: {"bits", "group_size", "sym"}
    layers: list[dict] = field(default_factory=list)  # [{"index", "lim", "zd", "fisher", "gptq_loss"}]
    # name -> {"layer", "shape", "output_error", "gptq_loss", "fisher", "column_loss", "column_fisher"}
    modules: dict[str, dict] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write JSON (atomically) to ``path``, or to ``path/sensitivity_profile.json`` for a folder."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / PROFILE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityProfile":
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no sensitivity profile at {path}")
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"corrupt sensitivity profile {path}: {exc}") from None

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if this profile was measured on a model with other module names or shapes."""
        prefix, layers = decoder_layers(model)
        current = {f"{prefix}.{rel}": list(weight_matrix(m).shape) for rel, m in quantizable_modules(layers)}
        missing = sorted(set(self.modules) - set(current))
        extra = sorted(set(current) - set(self.modules))
        wrong = [n for n in self.modules if n in current and current[n] != self.modules[n]["shape"]]
        if missing or extra or wrong:
            raise ValueError(f"sensitivity profile does not match this model: missing {missing[:3]}, "
                             f"unprofiled {extra[:3]}, shape mismatch {wrong[:3]}")

    def module_vector(self, name: str, key: str) -> torch.Tensor:
        """A per-column vector of one module (``"column_loss"`` or ``"column_fisher"``), checked for presence."""
        values = self.modules.get(name, {}).get(key)
        if not values:
            raise ValueError(f"sensitivity profile has no {key!r} for {name}: re-run `profile` (with fisher_samples > 0 for Fisher)")
        return torch.tensor(values, dtype=torch.float64)

    def layer_scores(self, name: str) -> list[float]:
        if not self.layers or name not in self.layers[0]:
            raise ValueError(f"unknown layer score {name!r}; have {sorted(self.layers[0]) if self.layers else []}")
        return [layer[name] for layer in self.layers]

    def table(self) -> str:
        rows = ["| layer | LIM | ZD | Fisher loss increase | GPTQ loss |", "|---|---|---|---|---|"]
        rows += [f"| {l['index']} | {l['lim']:.4f} | {l['zd']:.4f} | {l['fisher']:.3e} | {l['gptq_loss']:.3e} |" for l in self.layers]
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """Per-layer scores as one PNG: which layers are sensitive, at a glance."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # LIM is plotted as 1 + LIM = 1 − cos(in, out) so that every panel reads "taller = more sensitive".
        names = [("lim", "1 − cos(in, out)\n(LIM + 1)", True, 1.0), ("zd", "ZD (share z>1)", False, 0.0),
                 ("fisher", "Fisher loss\nincrease", True, 0.0), ("gptq_loss", "GPTQ loss\n(sum)", True, 0.0)]
        fig, axes = plt.subplots(len(names), 1, figsize=(9, 8), sharex=True)
        x = [l["index"] for l in self.layers]
        for ax, (key, label, log, offset) in zip(axes, names):
            values = [v + offset for v in self.layer_scores(key)]
            ax.bar(x, values, color="tab:blue")
            ax.set_ylabel(label, fontsize=8)
            if log and min(values) > 0:
                ax.set_yscale("log")
            elif not log:
                ax.set_ylim(min(values) * 0.95, max(values) * 1.02)
        axes[-1].set_xlabel("decoder layer")
        b = self.reference
        fig.suptitle(f"{self.model_type}: sensitivity per layer (reference grid {b['bits']}-bit, group {b['group_size']})")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def fisher_diagonals(model, batches, names, samples: int, progress: bool) -> dict[str, torch.Tensor]:
    """Empirical Fisher ``E[g²]`` of each named module's weight over ``samples`` calibration windows."""
    mods = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in mods.values():
            m.weight.requires_grad_(True)
        device = next(model.parameters()).device
        for row in tqdm(batches[:samples], desc="Fisher", unit="window", disable=not progress):
            ids = row.unsqueeze(0).to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for n, m in mods.items():
                acc[n] += m.weight.grad.float() ** 2
                m.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    n = max(min(samples, len(batches)), 1)
    # stored in [out, in] like ``weight_matrix`` (GPT-2's Conv1D keeps its weight transposed)
    return {k: v / n if isinstance(mods[k], nn.Linear) else (v / n).t() for k, v in acc.items()}


def profile(model: nn.Module, calibration=None, tokenizer=None, bits: int = 3, group_size: int = 64, sym: bool = False,
            fisher_samples: int = 8, progress: bool = True, batches: torch.Tensor | None = None,
            modules: list[str] | None = None) -> SensitivityProfile:
    """Measure a :class:`SensitivityProfile` of ``model`` (left unchanged) on ``calibration``.

    Args:
        model: a dense causal LM.
        calibration: a :class:`CalibrationSpec` or source (see ``calibration.data``).
        tokenizer: the model's tokenizer.
        bits, group_size, sym: the reference grid GPTQ losses and Fisher estimates are measured at.
        fisher_samples: calibration windows used for the Fisher diagonal (0 skips it; scores are then 0).
        batches: already tokenized calibration windows ``[n, seq_len]`` (instead of ``calibration``).
        modules: measure only these modules (a planner's pass 1 over the modules it quantizes); blocks after
            the last of them are not run.
    """
    spec = QuantSpec(bits, group_size, sym)
    if batches is None:
        if calibration is None:
            raise ValueError("profile needs calibration data: pass `calibration=` (or tokenized `batches=`)")
        batches = calibration_batches(calibration, tokenizer)
    prefix, layers = decoder_layers(model)
    names = [f"{prefix}.{rel}" for rel, _ in quantizable_modules(layers)]
    if modules is not None:
        unknown = sorted(set(modules) - set(names))
        if unknown:
            raise ValueError(f"cannot profile modules that are not decoder linears of this model: {unknown[:3]}")
        names = [n for n in names if n in set(modules)]
    fisher = fisher_diagonals(model, batches, names, fisher_samples, progress) if fisher_samples > 0 else {}
    result = SensitivityProfile(getattr(model.config, "model_type", type(model).__name__), spec.to_dict())

    def measure(name, module, stats):
        W = weight_matrix(module).detach().float()
        res = gptq_quantize(W, stats.hessian, spec)
        rtn = rtn_quantize(W, spec)
        delta = W - dequantize_weight(rtn.codes, rtn.scales, rtn.zeros, spec)
        layer = int(name[len(prefix) + 1:].split(".")[0])
        result.modules[name] = {
            "layer": layer, "shape": list(W.shape), "output_error": _round(res.output_error),
            "gptq_loss": _round(float(res.column_loss.sum())),
            "fisher": _round(fisher_loss_increase(fisher[name], delta)) if name in fisher else 0.0,
            "column_loss": [_round(v) for v in res.column_loss.tolist()],
            "column_fisher": [_round(v) for v in fisher[name].sum(0).tolist()] if name in fisher else [],
        }
        return None  # measure only: the model keeps its dense weights

    def on_block(idx, inputs, outputs):
        block_modules = [m for n, m in result.modules.items() if m["layer"] == idx]
        result.layers.append({
            "index": idx,
            "lim": _round(lim_score(torch.cat(inputs), torch.cat(outputs))),
            "zd": _round(zd_score([weight_matrix(m) for _, m in quantizable_modules(layers[idx])])),
            "fisher": _round(sum(m["fisher"] for m in block_modules)),
            "gptq_loss": _round(sum(m["gptq_loss"] for m in block_modules)),
        })

    run_sequential(model, batches, lambda n, m: n in names, measure, progress=progress, on_block=on_block)
    return result


@torch.no_grad()
def layer_lim_scores(model: nn.Module, batches: torch.Tensor) -> list[float]:
    """LIM of every decoder layer from one dense forward, block by block (no statistics, no solving)."""
    from hf_compress.calibration.runner import _block_output, _with_hidden, capture_block_inputs

    _, layers = decoder_layers(model)
    inputs = capture_block_inputs(model, layers, batches)
    scores = []
    for block in layers:
        hidden = [a[0] if a else k["hidden_states"] for a, k in inputs]
        outs = [_block_output(block(*a, **k)) for a, k in inputs]
        scores.append(lim_score(torch.cat(hidden), torch.cat(outs)))
        inputs = [_with_hidden(a, k, o) for (a, k), o in zip(inputs, outs)]
    return scores


def layer_zd_scores(model: nn.Module) -> list[float]:
    """ZD of every decoder layer (data-free)."""
    _, layers = decoder_layers(model)
    return [zd_score([weight_matrix(m) for _, m in quantizable_modules(block)]) for block in layers]


def profile_for(config, model: nn.Module, batches, reference_bits: int, fisher_samples: int = 0) -> SensitivityProfile:
    """The config's saved ``profile`` (checked against ``model``), or one measured now on ``batches`` over the
    modules the config plans to quantize, at ``reference_bits`` on the config's grid."""
    if config.profile is not None:
        prof = SensitivityProfile.load(config.profile)
        prof.check_model(model)
        return prof
    if batches is None:
        raise ValueError(f"{type(config).__name__} needs calibration data or a saved `profile=`")
    logger.info("hf-compress: measuring a sensitivity profile (pass 1) at %d bits", reference_bits)
    return profile(model, batches=batches, bits=reference_bits, group_size=config.group_size, sym=config.sym,
                   fisher_samples=fisher_samples, modules=config.planned_module_names(model))

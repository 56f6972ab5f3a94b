"""GPTQ-format export: what GPTQModel and transformers' GPTQ loader (through optimum) read.

Per quantized module: ``qweight`` int32 ``[K·b/32, N]`` (codes packed along the *inputs*, lowest bits first — the
3-bit layout is the same dense bitstream, crossing word boundaries), ``qzeros`` int32 ``[groups, N·b/32]`` (packed
along the outputs), fp16 ``scales [groups, N]`` and ``g_idx [K]`` (``j // group_size``: no activation reordering,
which vLLM no longer serves). ``W = (q − z)·s``.

Zero points: the original (``checkpoint_format: "gptq"``, "v1") stores ``z − 1`` and cannot hold ``z = 0`` (the
reader's ``+1`` carries into the next field), which asymmetric grids produce; so asymmetric exports are written as
``gptq_v2`` (true zeros, read by GPTQModel), symmetric ones as v1 (every reader).

Modules whose scheme differs from the base one go into GPTQModel's ``dynamic`` mapping (``"+:^name$": {bits,
group_size, sym}``; dense ones ``"-:^name$": {}``). transformers' GPTQ loader ignores ``dynamic`` (checked with
optimum 2.3 / gptqmodel 7.7): a mixed plan loads with ``GPTQModel.load`` only — the card says so.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hf_compress.exporters import dense_tensors, is_tied
from hf_compress.exporters.grids import Scheme, module_grid, rewrite
from hf_compress.formats.linear import PackedLinear
from hf_compress.formats.packing import pack_int32_rows

WEIGHTS_FILE = "model.safetensors"


def module_tensors(name: str, module: PackedLinear, scheme: Scheme, v1: bool) -> dict[str, torch.Tensor]:
    grid = rewrite(module_grid(module), scheme)
    n, k = grid.shape
    zeros = grid.zeros - 1 if v1 else grid.zeros  # v1: symmetric only, so z = 2^(b-1) >= 1
    out = {f"{name}.qweight": pack_int32_rows(grid.codes, scheme.bits).t().contiguous(),
           f"{name}.qzeros": pack_int32_rows(zeros.t().contiguous(), scheme.bits),
           f"{name}.scales": grid.scales.t().contiguous().to(torch.float16),
           f"{name}.g_idx": (torch.arange(k) // scheme.group_size).to(torch.int32)}
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().to(torch.float16)
    return out


def _entry(scheme: Scheme, k: int) -> dict:
    return {"bits": scheme.bits, "group_size": -1 if scheme.group_size == k else scheme.group_size, "sym": scheme.sym}


def plan(model: nn.Module, widen: bool = False, servable: str = "refuse") -> dict:
    """Per module what is written; ValueError listing modules GPTQ cannot hold unless ``widen``."""
    from hf_compress.exporters import linear_module_names
    from hf_compress.exporters.fitting import fit_modules, refusal_message
    from hf_compress.exporters.readers import GPTQ

    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    fit = fit_modules(model, linear_module_names(model), GPTQ, "widen" if widen else "refuse", head_name=head_name)
    if fit.refused:
        raise ValueError(refusal_message(fit, "widen=True (CLI: --widen)"))
    if not any(m.scheme is not None for m in fit.modules.values()):
        raise ValueError("nothing to write as GPTQ: no module is quantized on a grid GPTQ holds")
    return {"fit": fit, "head": head_name}


def write(model: nn.Module, folder: Path, decided: dict, tokenizer=None, dtype=torch.float16) -> dict:
    fit = decided["fit"]
    quantized = {n: m.scheme for n, m in fit.modules.items() if m.scheme is not None}
    entries = {n: _entry(s, model.get_submodule(n).in_features) for n, s in quantized.items()}
    base = Counter(tuple(sorted(e.items())) for e in entries.values()).most_common(1)[0][0]
    base = dict(base)
    v1 = all(s.sym for s in quantized.values())
    dynamic = {f"+:^{re.escape(n)}$": e for n, e in entries.items() if e != base}
    head, tied = model.get_output_embeddings(), is_tied(model)
    tensors, handled = {}, set()
    for name, decision in fit.modules.items():
        module = model.get_submodule(name)
        handled.add(name)
        if decision.scheme is not None:
            tensors.update(module_tensors(name, module, decision.scheme, v1))
            continue
        if name != decided["head"] and not _is_table(module):
            dynamic[f"-:^{re.escape(name)}$"] = {}  # a dense decoder linear: GPTQModel must not expect qweight
        if tied and module is head:
            continue
        weight = module.dequantized_weight(torch.float32) if isinstance(module, PackedLinear) else module.weight
        tensors[f"{name}.weight"] = weight.detach().to(dtype)
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().to(dtype)
    tensors.update(dense_tensors(model, handled, dtype))
    quant = {"quant_method": "gptq", "bits": base["bits"], "group_size": base["group_size"], "sym": base["sym"],
             "desc_act": False, "static_groups": False, "true_sequential": True, "lm_head": False,
             "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32", "damp_percent": 0.01,
             "meta": {"quantizer": ["hf-compress"]}}
    if dynamic:
        quant["dynamic"] = dynamic
    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    mixed = any(k.startswith("+:") for k in dynamic)
    return {"file": WEIGHTS_FILE, "written": fit.to_dict(), "extra_bytes": fit.extra_bytes, "dynamic": dynamic,
            "base_scheme": base, "checkpoint_format": quant["checkpoint_format"], "tokenizer": tokenizer is not None,
            "layout": ("GPTQ int32 qweight/qzeros, fp16 scales, g_idx without reordering; "
                       + ("per-module widths in `dynamic`: load with GPTQModel.load (transformers' loader ignores "
                          "`dynamic`)" if mixed else "one scheme: transformers' GPTQ loader and GPTQModel")),
            "readers": ["an independent GPTQ reader in hf-compress's tests (written from the format description)"]}


def _is_table(module) -> bool:
    from hf_compress.formats.embedding import PackedEmbedding

    return isinstance(module, (PackedEmbedding, nn.Embedding))

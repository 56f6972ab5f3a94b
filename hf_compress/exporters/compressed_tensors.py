"""compressed-tensors ``pack-quantized`` export: what vLLM and transformers' compressed-tensors integration read.

Per module (see ``../shared/notes/deployment.md``): ``weight_packed`` int32 ``[N, ceil(K·b/32)]``, each row a dense
little-endian bitstream (compressed-tensors ≥ 0.18; before that 3/5/6/7-bit rows were padded per word — not
written); ``weight_scale`` ``[N, groups]``; ``weight_shape``; for asymmetric schemes ``weight_zero_point`` packed
the same way along the *output* dimension, int32 ``[ceil(N·b/32), groups]``. The format's signed convention
(``q ∈ [−2^(b−1), 2^(b−1))``, stored ``q + 2^(b−1)``) makes the stored values exactly our unsigned codes and zeros.

Every distinct scheme becomes one entry of ``config_groups`` with explicit module names as ``targets``; modules
written dense are listed in ``ignore`` (vLLM refuses a Linear that matches neither).

Reader trap: transformers ≥ 5.24 refuses the packed zero point in its default compressed load (it sizes the
parameter unpacked), while 5.17 and vLLM need it packed (an unpacked one fails or, as int32, loads wrong). So an
export with asymmetric schemes also sets ``"dequantize": true``, which transformers (5.17 and 5.24) honours by
decompressing on load and vLLM ignores. Checked readers are listed in the card.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hf_compress.exporters import dense_tensors, is_tied
from hf_compress.exporters.fitting import FitReport
from hf_compress.exporters.grids import Scheme, module_grid, rewrite
from hf_compress.formats.embedding import PackedEmbedding
from hf_compress.formats.linear import PackedLinear
from hf_compress.formats.packing import pack_int32_rows

LAYOUT_VERSION = "0.20.1"  # compressed-tensors version whose reader these files were checked with
READABLE_BY = "compressed-tensors >=0.18,<0.21"
WEIGHTS_FILE = "model.safetensors"


def scheme_entry(scheme: Scheme, per_row: bool, targets: list[str]) -> dict:
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.sym, "dynamic": False,
               "strategy": "channel" if per_row else "group", "group_size": None if per_row else scheme.group_size,
               "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}


def module_tensors(name: str, module: PackedLinear, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    grid = rewrite(module_grid(module), scheme)
    n, k = grid.shape
    out = {f"{name}.weight_packed": pack_int32_rows(grid.codes, scheme.bits),
           f"{name}.weight_scale": grid.scales.to(dtype),
           f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not scheme.sym:
        out[f"{name}.weight_zero_point"] = pack_int32_rows(grid.zeros.t().contiguous(), scheme.bits).t().contiguous()
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().to(dtype)
    return out


def write_compressed_tensors(model: nn.Module, folder: Path, fit: FitReport, dtype: torch.dtype) -> dict:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``; returns the config_groups summary."""
    groups: dict[tuple, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    handled, ignore = set(), []
    head, tied = model.get_output_embeddings(), is_tied(model)
    for name, module in model.named_modules():
        if isinstance(module, (PackedLinear, nn.Linear)) and name in fit.modules:
            decision = fit.modules[name]
            handled.add(name)
            if decision.scheme is not None and isinstance(module, PackedLinear):
                per_row = decision.scheme.group_size == module.in_features
                groups.setdefault((decision.scheme, per_row), []).append(name)
                tensors.update(module_tensors(name, module, decision.scheme, dtype))
                continue
            if not isinstance(module, PackedEmbedding):
                ignore.append(name)
            if tied and module is head:
                continue  # the head shares the embedding table: transformers and vLLM re-tie it on load
            weight = module.dequantized_weight(torch.float32) if isinstance(module, PackedLinear) else module.weight
            tensors[f"{name}.weight"] = weight.detach().to(dtype)
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(dtype)
        elif isinstance(module, nn.Linear) and name not in handled:
            ignore.append(name)  # not planned (e.g. an untied head): dense, and vLLM must be told
    tensors.update(dense_tensors(model, handled, dtype))
    ordered = sorted(groups.items(), key=lambda kv: kv[1][0])
    config_groups = {f"group_{i}": scheme_entry(scheme, per_row, sorted(names))
                     for i, ((scheme, per_row), names) in enumerate(ordered)}
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "config_groups": config_groups, "ignore": sorted(set(ignore)), "kv_cache_scheme": None,
             "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None,
             "version": LAYOUT_VERSION}
    if any(not scheme.sym for scheme, _ in groups):
        quant["dequantize"] = True  # transformers >= 5.24 refuses packed zero points otherwise (module docstring)
    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return {group: {"scheme": "per-row".join(scheme.describe().rsplit(f"g{scheme.group_size}", 1)) if per_row
                    else scheme.describe(), "modules": len(names)} for group, ((scheme, per_row), names) in zip(config_groups, ordered)}


def plan(model: nn.Module, widen: bool = False, servable: str = "refuse") -> dict:
    """Per module what is written, for vLLM (``servable`` refuse/widen) or transformers' reader only (``off``);
    ValueError listing the modules when something would need widening and that was not asked for."""
    from hf_compress.exporters import linear_module_names
    from hf_compress.exporters.fitting import fit_modules, refusal_message
    from hf_compress.exporters.readers import TRANSFORMERS_CT, VLLM

    names = linear_module_names(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    vllm = fit_modules(model, names, VLLM, "widen", head_name=head_name)  # what vLLM would need, always reported
    if servable == "off":
        fit = fit_modules(model, names, TRANSFORMERS_CT, "widen" if widen else "refuse", head_name=head_name)
        option = "widen=True (CLI: --widen)"
    else:
        fit = vllm if (widen or servable == "widen") else fit_modules(model, names, VLLM, "refuse", head_name=head_name)
        option = "servable='widen' (CLI: --servable=widen)"
    if fit.refused:
        raise ValueError(refusal_message(fit, option))
    return {"fit": fit, "vllm": vllm, "servable": servable}


def write(model: nn.Module, folder: Path, decided: dict, tokenizer=None, dtype=torch.float16) -> dict:
    from hf_compress.exporters.readers import vllm_kernel

    fit, vllm = decided["fit"], decided["vllm"]
    groups = write_compressed_tensors(model, folder, fit, dtype)
    kernels = {}
    for name, m in fit.modules.items():
        if m.scheme is not None:
            k = model.get_submodule(name).in_features
            kernels[vllm_kernel(m.scheme, k)] = kernels.get(vllm_kernel(m.scheme, k), 0) + 1
    # written for vLLM (refuse/widen) it is servable by construction; written for transformers only, if nothing needed widening
    servable = decided["servable"] != "off" or all(v.status in ("exact", "unquantized") for v in vllm.modules.values())
    return {"file": WEIGHTS_FILE, "config_groups": groups, "written": fit.to_dict(), "extra_bytes": fit.extra_bytes,
            "vllm": {"servable": servable, "kernels": kernels, "report": vllm.to_dict()},
            "layout": f"pack-quantized, dense int32 rows ({READABLE_BY}); checked with compressed-tensors {LAYOUT_VERSION}",
            "readers": ["transformers 5.24 + compressed-tensors 0.20.1 (hf-compress's tests)",
                        "transformers 5.17 + compressed-tensors 0.19 (hf-compress's tests, in a second environment)"],
            "tokenizer": tokenizer is not None}

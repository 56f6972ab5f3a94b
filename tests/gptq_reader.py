"""An independent GPTQ-format reader for the tests, written from the format description (not hf-compress's unpacker).

qweight int32 [K·b/32, N]: column n of the weight is a little-endian bitstream of K codes along the inputs;
qzeros int32 [G, N·b/32]: each group row a bitstream of N zero points (v1 stores z − 1); scales fp16 [G, N];
g_idx [K]: the group of each input. W[n, k] = (q[k, n] − z[g_idx[k], n]) · s[g_idx[k], n].
Per-module widths come from GPTQModel's ``dynamic`` ("+:regex" overrides, "-:regex" = left dense).
Run as a script: ``python gptq_reader.py FOLDER IDS OUT`` saves the logits of the dense model it rebuilds.
"""

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Per column of ``words [W, C]`` (int32): the first ``count`` ``bits``-wide fields of that column read as one
    stream, lowest bits of word 0 first → ``[count, C]``."""
    w, c = words.shape
    as_bits = ((words.to(torch.int64).unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(w * 32, c)
    fields = as_bits[: count * bits].view(count, bits, c)
    return (fields * (1 << torch.arange(bits)).view(1, bits, 1)).sum(1)


def module_scheme(name: str, quant: dict) -> dict | None:
    scheme = {k: quant[k] for k in ("bits", "group_size", "sym")}
    for pattern, override in (quant.get("dynamic") or {}).items():
        sign, _, regex = pattern.partition(":") if pattern[:2] in ("+:", "-:") else ("+", "", pattern)
        if re.match(regex, name):
            return None if sign == "-" else {**scheme, **override}
    return scheme


def dequantize(tensors: dict, name: str, scheme: dict, v1: bool) -> torch.Tensor:
    bits = scheme["bits"]
    qweight, qzeros, scales, g_idx = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = g_idx.numel(), scales.shape[1]
    q = bitstream(qweight, bits, k).t()  # [N, K]: column n of qweight is output n's stream along the inputs
    z = bitstream(qzeros.t().contiguous(), bits, n).t()  # [G, N]: row g of qzeros is group g's stream
    if v1:
        z = (z + 1) & ((1 << bits) - 1)
    g = g_idx.long()
    return (q - z[g].t()).float() * scales[g].t().float()


def dense_state_dict(folder) -> tuple[dict, dict]:
    config = json.loads((Path(folder) / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "gptq" and not quant["desc_act"]
    v1 = quant.get("checkpoint_format", "gptq") == "gptq"
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    out = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        if field == "qweight":
            out[f"{name}.weight"] = dequantize(tensors, name, module_scheme(name, quant), v1)
        elif field not in ("qzeros", "scales", "g_idx"):
            out[key] = value.float()
    return config, out


def dense_model(folder):
    """A plain fp32 transformers model holding the dequantized weights of the GPTQ folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state = dense_state_dict(folder)
    config.pop("quantization_config")
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures",)})
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if missing:
        model.tie_weights()
    return model


def logits(folder, ids) -> torch.Tensor:
    with torch.no_grad():
        return dense_model(folder)(torch.tensor(ids)).logits


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file({"logits": logits(sys.argv[1], eval(sys.argv[2]))}, sys.argv[3])

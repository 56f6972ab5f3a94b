"""Rotate a Llama-family model's residual stream (QuaRot-style), leaving an ordinary transformers checkpoint.

With ``Q`` orthogonal, ``RMSNorm(xQ) = RMSNorm(x)·Q`` once the norm's gain is folded into the linears that read
it. So: fold every RMSNorm gain into the following linears (gain → 1), untie the embeddings when they are tied
(the head would otherwise have to be both ``EQ`` and ``E``), then ``E ← EQ``, reading linears ``W ← WQ``,
writing linears ``W ← QᵀW``, head ``W ← WQ``. Each value head and the matching ``o_proj`` input block are also
rotated by an exact Hadamard of ``head_dim``. In full precision the model computes the same function; weights
lose their outlier columns, which is what makes them easier to quantize. No online rotations are inserted, so
plain ``AutoModelForCausalLM`` loads the result (for weight-only quantization they are not needed).

Orthogonal matrices: ``n = 2^k`` gets a Sylvester Hadamard with random signs. Other sizes (SmolLM2: 576 = 9·64,
and no Hadamard of order 9 exists) get ``D·(R_m ⊗ H_{2^k})`` with ``R_m`` a seeded Haar-random orthogonal matrix of
the odd part ``m`` and ``D`` random signs: orthogonal, dense (every output mixes every input), built for any n.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_compress.calibration.discovery import decoder_layers


def sylvester_hadamard(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix of a power-of-two order (float64)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, not {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / n**0.5


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded Hadamard-based orthogonal ``n × n`` matrix (float64), see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    power = n & -n  # largest power of two dividing n
    m = n // power
    H = sylvester_hadamard(power)
    if m > 1:
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        H = torch.kron((q * torch.sign(torch.diagonal(r))).contiguous(), H.contiguous())  # sign fix makes the QR factor Haar-distributed
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs.unsqueeze(1) * H


def _parts(model: nn.Module):
    """Embeddings, head, final norm and per-block modules of a Llama-family model, or a clear error."""
    _, layers = decoder_layers(model)
    inner = getattr(model, "model", None)
    embed, head, norm = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None), getattr(inner, "norm", None)
    need = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    missing = [n for n in need if not _has(layers[0], n)]
    if embed is None or head is None or norm is None or missing:
        raise ValueError(f"rotation supports Llama-family decoders (RMSNorm, q/k/v/o, gate/up/down); "
                         f"{type(model).__name__} lacks {missing or ['embed_tokens/lm_head/norm']}")
    for name, mod in [("model.norm", norm), *((f"layers.0.{n}", layers[0].get_submodule(n)) for n in need[:2])]:
        _check_rmsnorm(name, mod)
    return embed, head, norm, layers


def _has(block, name):
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def _check_rmsnorm(name: str, norm: nn.Module) -> None:
    """Folding needs ``norm(x) = x / rms(x) · g`` exactly (no bias, no mean-centring, no ``1 + g``)."""
    if getattr(norm, "bias", None) is not None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise ValueError(f"{name} ({type(norm).__name__}) is not a plain RMSNorm: cannot fold it for rotation")
    x = torch.randn(3, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    with torch.no_grad():
        expect = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
        if not torch.allclose(norm(x), expect, atol=1e-4, rtol=1e-4):
            raise ValueError(f"{name} ({type(norm).__name__}) is not a plain RMSNorm: cannot fold it for rotation")


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate_in(lin: nn.Linear, Q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ Q).to(lin.weight.dtype))


@torch.no_grad()
def _rotate_out(lin: nn.Linear, Q: torch.Tensor) -> None:
    lin.weight.copy_((Q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ Q).to(lin.bias.dtype))


def untie_embeddings(model: nn.Module) -> bool:
    """Give the head its own weight when it shares the embedding's; returns whether anything changed."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return True


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fold norms and rotate ``model`` in place (function unchanged in exact arithmetic); returns it."""
    if getattr(model, "is_quantized", False):
        raise ValueError("rotate the dense model before quantizing it, not a quantized one")
    embed, head, norm, layers = _parts(model)
    untie_embeddings(model)
    hidden = embed.weight.shape[1]
    Q = random_orthogonal(hidden, seed).to(embed.weight.device)
    embed.weight.copy_((embed.weight.double() @ Q).to(embed.weight.dtype))
    for block in layers:
        attn, mlp = block.self_attn, block.mlp
        _fold(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_in(lin, Q)
        for lin in (attn.o_proj, mlp.down_proj):
            _rotate_out(lin, Q)
        head_dim = getattr(attn, "head_dim", None)
        if head_dim and head_dim & (head_dim - 1) == 0:  # exact per-head Hadamard on the value/output path
            Hh = sylvester_hadamard(head_dim).to(Q.device)
            kv = attn.v_proj.weight.shape[0] // head_dim
            heads = attn.o_proj.weight.shape[1] // head_dim
            _rotate_out(attn.v_proj, torch.block_diag(*[Hh] * kv))
            _rotate_in(attn.o_proj, torch.block_diag(*[Hh] * heads))
    _fold(norm, [head])
    _rotate_in(head, Q)
    model.config.hf_compress_rotation = {"seed": seed, "kind": "hadamard-based orthogonal, norms folded"}
    return model

"""GPTQ and RTN as pure tensor functions, on hand-built Hessians."""

import pytest
import torch

from hf_compress.formats.grid import QuantSpec, dequantize_weight
from hf_compress.solvers.gptq import gptq_quantize, relative_output_error
from hf_compress.solvers.rtn import rtn_quantize


def correlated_problem(rows=48, cols=96, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 2 + 0.2)
    W = torch.randn(rows, cols, generator=g)
    return W, 2 * X.T @ X / tokens


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(4, -1), QuantSpec(2, 32, True), QuantSpec(3, 40)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(spec, act_order):
    W, H = correlated_problem()
    rtn = rtn_quantize(W, spec, H)
    gptq = gptq_quantize(W, H, spec, act_order=act_order, block_size=32)
    assert gptq.output_error < 0.9 * rtn.output_error
    W_hat = dequantize_weight(gptq.codes, gptq.scales, gptq.zeros, spec)
    assert relative_output_error(W, W_hat, H) == pytest.approx(gptq.output_error, rel=1e-4)
    assert gptq.column_loss.shape == (W.shape[1],) and (gptq.column_loss >= 0).all()


def test_gptq_hand_built_8x6():
    W = torch.tensor([[0.9, -0.4, 0.3, 0.1, -0.7, 0.2]] * 8) + torch.arange(8).view(8, 1) * 0.05
    H = torch.tensor([[4.0, 1.9, 0, 0, 0, 0], [1.9, 1.0, 0, 0, 0, 0], [0, 0, 2, 0.5, 0, 0],
                      [0, 0, 0.5, 1, 0, 0], [0, 0, 0, 0, 3, 1.5], [0, 0, 0, 0, 1.5, 1]])
    spec = QuantSpec(2, -1)
    assert gptq_quantize(W, H, spec, act_order=False).output_error < rtn_quantize(W, spec, H).output_error


def test_clip_search_and_act_order_help_gptq():
    W, H = correlated_problem(seed=1)
    spec = QuantSpec(3, 32)
    plain = gptq_quantize(W, H, spec, act_order=False, clip_grid=0)
    tuned = gptq_quantize(W, H, spec, act_order=True, clip_grid=20)
    assert tuned.output_error < plain.output_error


def test_dead_inputs_and_singular_hessian():
    W, H = correlated_problem(cols=32)
    H[3, :] = 0
    H[:, 3] = 0
    res = gptq_quantize(W, H, QuantSpec(4, 16))
    assert torch.isfinite(res.scales).all() and res.codes.shape == W.shape


def test_gptq_rejects_bad_hessians():
    W, H = correlated_problem(cols=32)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(W, H[:16, :16], QuantSpec(4, 16))
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, H, QuantSpec(4, 16))

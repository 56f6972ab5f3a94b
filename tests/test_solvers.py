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


# -- grid refit (solvers/refit.py) ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,col_bits", [(QuantSpec(3, 32), None), (QuantSpec(2, 40, True), None),
                                           (QuantSpec(3, 32), torch.tensor([2, 3] * 48, dtype=torch.uint8))])
def test_refit_lowers_output_error_and_keeps_the_format(spec, col_bits):
    """Refitting scales/zero points to GPTQ's codes never loses (per row) and wins in total; stored shapes, dtypes,
    integer on-grid zero points and the codes' grid are unchanged, and the stored tensors dequantize to what the
    solver reports."""
    from hf_compress.solvers.refit import column_grid

    W, H = correlated_problem(seed=2)
    base = gptq_quantize(W, H, spec, block_size=32, clip_grid=10, col_bits=col_bits)
    ref = gptq_quantize(W, H, spec, block_size=32, clip_grid=10, col_bits=col_bits, refit=1)
    assert torch.equal(ref.codes, base.codes)  # one round: same codes, new grid
    assert ref.output_error < 0.97 * base.output_error
    assert ref.scales.shape == base.scales.shape and ref.zeros.shape == base.zeros.shape
    stored = ref.spec or spec
    assert torch.equal(ref.scales, ref.scales.half().float())  # fp16-representable, as stored
    assert torch.equal(ref.zeros, ref.zeros.round()) and (ref.zeros >= 0).all()
    W_hat = column_grid(ref.scales, ref.zeros, stored, W.shape[1], col_bits).dequantize(ref.codes)
    assert relative_output_error(W, W_hat, H) == pytest.approx(ref.output_error, rel=1e-4)
    two = gptq_quantize(W, H, spec, block_size=32, clip_grid=10, col_bits=col_bits, refit=2)
    assert two.output_error <= ref.output_error * 1.001
    rtn, rtn_ref = rtn_quantize(W, spec, H, 10, col_bits), rtn_quantize(W, spec, H, 10, col_bits, refit=1)
    assert rtn_ref.output_error < rtn.output_error


def test_refit_option_validates_and_reaches_the_solver():
    import hf_compress

    assert hf_compress.GPTQConfig(refit=2).refit == 2 and hf_compress.GPTQConfig().refit == 0
    assert hf_compress.BAQConfig(refit=1).refit == 1
    with pytest.raises(ValueError, match="refit"):
        hf_compress.GPTQConfig(refit=-1)


@pytest.mark.slow
def test_refit_lowers_gptq_output_error_on_smollm2_block(smollm2_dir):
    """Real weights and Hessians (SmolLM2-135M block 3, 4 × 256 WikiText-2 tokens), GPTQ 3-bit group 64 as in the
    benchmark: refit=1 leaves less output error than plain GPTQ in each Linear tried, by ≥ 1.5 % in total."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import WIKITEXT, require_wikitext
    from hf_compress.calibration.data import CalibrationSpec, calibration_batches

    require_wikitext()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = calibration_batches(CalibrationSpec(str(WIKITEXT / "valid.txt"), num_samples=4, seq_len=256, seed=0), tok)
    block = model.model.layers[3]
    linears = {n: block.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    hess = {}

    def hook(name):
        def f(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            hess[name] = hess.get(name, 0) + 2 * x.T @ x / x.shape[0]
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    model.model.layers = model.model.layers[:4]  # nothing after block 3 is needed
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    spec, total = QuantSpec(3, 64), [0.0, 0.0]
    for name, module in linears.items():
        W = module.weight.detach().float()
        base = gptq_quantize(W, hess[name], spec, clip_grid=20)
        ref = gptq_quantize(W, hess[name], spec, clip_grid=20, refit=1)
        assert ref.output_error < base.output_error, name
        total[0] += base.output_error
        total[1] += ref.output_error
    assert total[1] < 0.985 * total[0], total

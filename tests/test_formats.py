"""Packed storage: bit packing, grids with short last groups, and the packed module itself."""

import pytest
import torch

from hf_compress.formats.grid import QuantSpec, dequantize_weight, group_params, quantize_weight
from hf_compress.formats.linear import PackedLinear
from hf_compress.formats.packing import SUPPORTED_BITS, pack_codes, packed_numel, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (16, 64), (3, 577)])
def test_pack_roundtrip_and_exact_size(bits, shape):
    codes = torch.randint(0, 2**bits, shape)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    n = codes.numel()
    assert packed.numel() == packed_numel(n, bits) < (n * bits + 7) // 8 + bits  # padded to one run at most
    assert torch.equal(unpack_codes(packed, bits, n).view(shape).long(), codes)
    # one little-endian bitstream for every width: code i sits in bits [i·b, i·b + b)
    stream = "".join(format(int(byte), "08b")[::-1] for byte in packed)
    assert [int(stream[i * bits:(i + 1) * bits][::-1], 2) for i in range(n)] == codes.flatten().tolist()


@pytest.mark.parametrize("bits", [0, 9, 16, 4.0, True])
def test_unsupported_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        QuantSpec(bits)


def test_codes_out_of_range_and_wrong_stream_length():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 4, 12)


@pytest.mark.parametrize("group_size", [0, -2, 3.5])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, group_size)


@pytest.mark.parametrize("sym", [False, True])
def test_short_last_group_is_its_own_group(sym):
    torch.manual_seed(0)
    W = torch.randn(5, 70)
    W[:, 64:] *= 100  # the last 6 columns are huge: sharing a scale with the rest would ruin those
    spec = QuantSpec(4, 64, sym)
    scale, zero = group_params(W, spec)
    assert scale.shape == (5, 2)
    deq = dequantize_weight(quantize_weight(W, scale, zero, spec), scale, zero, spec)
    rel = ((deq - W)[:, :64].norm() / W[:, :64].norm()).item()
    assert rel < 0.2
    assert torch.allclose(deq[:, 64:], W[:, 64:], rtol=0.2, atol=W[:, 64:].abs().max().item() / 7)


def test_clip_search_lowers_weighted_error():
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    W[:, 5] *= 8  # an outlier column stretches every row's range
    imp = torch.rand(128) + 0.1
    spec = QuantSpec(3, 64)

    def err(s, z):
        return (((dequantize_weight(quantize_weight(W, s, z, spec), s, z, spec) - W) ** 2) * imp).sum()

    assert err(*group_params(W, spec, imp, clip_grid=20)) < err(*group_params(W, spec))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_packed_linear_matches_reference_dequantization(bits, sym):
    torch.manual_seed(bits)
    W = torch.randn(9, 40)
    spec = QuantSpec(bits, 16, sym)
    s, z = group_params(W, spec)
    codes = quantize_weight(W, s, z, spec)
    bias = torch.randn(9)
    mod = PackedLinear.from_codes(codes, s, z, spec, bias)
    expect = dequantize_weight(codes, s.half(), z, spec)
    assert torch.equal(mod.dequantized_weight(), expect)
    x = torch.randn(3, 40)
    assert torch.allclose(mod(x), x @ expect.T + bias, atol=1e-5)
    err = (mod.dequantized_weight() - W).abs().max()
    assert err <= (s.max() * (0.5 if bits > 2 else 2.0)) + 1e-3

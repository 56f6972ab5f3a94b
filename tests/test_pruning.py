"""Pruning: solver math on hand-built layers (N:M invariants, exact counts, error ordering), sparse storage sizes,
native save/load in a fresh process, and bad input."""

import json

import pytest
import torch

import hf_compress
from hf_compress.formats.sparse import SparseLinear, SparseSpec
from hf_compress.methods.sparse.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from hf_compress.methods.sparse.solvers import magnitude, output_error, sparsegpt, wanda

from conftest import fresh_process_logits, tiny_llama

IDS = torch.tensor([[5, 17, 99, 3, 64, 120, 7, 7, 31, 2]])


def calibrated_layer(out_f=48, in_f=64, n=512, seed=0):
    """A weight and a Hessian of correlated inputs with a few loud channels (where Wanda beats magnitude)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    scale = torch.ones(in_f)
    scale[torch.randperm(in_f, generator=g)[:6]] = 8.0
    X = (torch.randn(n, in_f, generator=g) @ mix) * scale
    return torch.randn(out_f, in_f, generator=g), 2 / n * X.T @ X


def solve(name, W, H, prune=None, nm=None):
    return {"magnitude": lambda: magnitude(W, prune, nm, H), "wanda": lambda: wanda(W, H, prune, nm),
            "sparsegpt": lambda: sparsegpt(W, H, prune, nm, block_size=16)}[name]()


@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_keep_exactly_n_of_every_m(solver, nm):
    W, H = calibrated_layer()
    r = solve(solver, W, H, nm=nm)
    counts = r.mask.view(W.shape[0], -1, nm[1]).sum(dim=2)
    assert bool((counts == nm[0]).all())
    assert bool((r.weight[~r.mask] == 0).all())
    if solver != "sparsegpt":  # the others keep the kept weights as they were
        assert torch.equal(r.weight[r.mask], W[r.mask])


@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("prune", [0, 1, 1535, 1536, 2000, 3071])
def test_unstructured_prunes_exactly_the_asked_count(solver, prune):
    W, H = calibrated_layer()
    r = solve(solver, W, H, prune=prune)
    assert int((~r.mask).sum()) == prune
    per_row = (~r.mask).sum(dim=1)
    assert int(per_row.max() - per_row.min()) <= 1  # every row compared on its own, counts as even as integers allow


@pytest.mark.parametrize("target", [{"prune": 32 * 64 // 2}, {"prune": 48 * 64 * 7 // 10}, {"nm": (2, 4)}])
def test_sparsegpt_beats_wanda_beats_magnitude_on_a_calibrated_layer(target):
    W, H = calibrated_layer()
    errors = {name: output_error(W, solve(name, W, H, **target).weight, H) for name in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("spec", [SparseSpec("2:4"), SparseSpec("4:8"), SparseSpec("unstructured", nnz=1000),
                                  SparseSpec("2:4", bits=4, group_size=32), SparseSpec("unstructured", nnz=777, bits=3, group_size=-1)])
def test_sparse_linear_stores_what_the_mask_keeps(spec):
    W, H = calibrated_layer()
    nm = spec.nm
    r = wanda(W, H, None if nm else W.numel() - spec.nnz, nm)
    mod = SparseLinear.from_dense(r.weight, r.mask, spec)
    assert torch.equal(mod.kept_mask(), r.mask)
    core = mod.core_weight()
    assert bool((core[~r.mask] == 0).all())
    if spec.bits is None:
        assert torch.equal(core, r.weight)
    else:  # kept values on the grid: within half a step of the original
        assert (core - r.weight).abs().max() < (r.weight.abs().max() / (2 ** spec.bits - 1))
    x = torch.randn(3, W.shape[1])
    torch.testing.assert_close(mod(x), x @ core.T)


def test_sparse_storage_is_really_smaller():
    out_f, in_f = 64, 256
    W, H = calibrated_layer(out_f, in_f)
    dense = W.numel() * 4  # fp32
    sizes = {}
    for key, spec in {"2:4": SparseSpec("2:4"), "50%": SparseSpec("unstructured", nnz=W.numel() // 2),
                      "2:4+4bit": SparseSpec("2:4", bits=4, group_size=128)}.items():
        r = wanda(W, H, None if spec.nm else W.numel() - spec.nnz, spec.nm)
        sizes[key] = SparseLinear.from_dense(r.weight, r.mask, spec).stored_bytes() / dense
    assert sizes["2:4"] == pytest.approx((0.5 * 4 + 0.5 * 2 / 8) / 4)  # values + 2-bit indices
    assert sizes["50%"] == pytest.approx((0.5 * 4 + 1 / 8) / 4)  # values + bitmask
    assert sizes["2:4+4bit"] < 0.1  # 4-bit codes of the kept half + 2-bit indices + scales/zeros


@pytest.mark.parametrize("make", [lambda: MagnitudeConfig(sparsity=0.6),
                                  lambda: WandaConfig(pattern="2:4", num_samples=8, seq_len=64),
                                  lambda: SparseGPTConfig(sparsity=0.5, num_samples=8, seq_len=64),
                                  lambda: WandaConfig(pattern="4:8", bits=4, group_size=32, num_samples=8, seq_len=64)])
def test_pruned_checkpoint_loads_natively_in_a_fresh_process(make, tmp_path, text_corpus, char_tokenizer):
    model = tiny_llama()
    dense = model(IDS).logits.detach()
    config = make()
    hf_compress.quantize(model, config, calibration=[text_corpus], tokenizer=char_tokenizer, progress=False)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14
    pruned = model(IDS).logits.detach()
    assert not torch.equal(pruned, dense)
    assert config.report["sparsity"] == pytest.approx(config.sparsity, abs=1e-4)
    hf_compress.save_pretrained(model, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == config.quant_method and len(saved["plan"]) == 14
    assert torch.equal(fresh_process_logits(tmp_path / "p", IDS, tmp_path), pruned)


def test_per_module_ratios_from_a_plan_are_exact(text_corpus, char_tokenizer):
    model = tiny_llama()
    plan = {"model.layers.0.mlp.down_proj": 0.7, "model.layers.1.self_attn.q_proj": 0.25,
            "model.layers.1.mlp.up_proj": {"pattern": "2:4"}}
    config = WandaConfig(plan=plan, num_samples=8, seq_len=64)
    hf_compress.quantize(model, config, calibration=[text_corpus], tokenizer=char_tokenizer, progress=False)
    assert sorted(config.plan) == sorted(plan)
    for name, target in (("model.layers.0.mlp.down_proj", 0.7), ("model.layers.1.self_attn.q_proj", 0.25)):
        mod = model.get_submodule(name)
        numel = mod.in_features * mod.out_features
        assert int(mod.kept_mask().sum()) == numel - round(target * numel)
    assert isinstance(model.get_submodule("model.layers.1.mlp.up_proj"), SparseLinear)
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), torch.nn.Linear)


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
    ({"sparsity": 0.6, "pattern": "2:4"}, "pattern 2:4 prunes exactly 0.5"),
    ({"pattern": "2:3"}, "M a power of two"),
    ({"pattern": "5:4"}, "0 < N < M"),
    ({"pattern": "half"}, "'unstructured' or 'N:M'"),
    ({"plan": {"model.layers.0.mlp.up_proj": 1.5}}, r"sparsity must be a number in \[0, 1\)"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WandaConfig(**kwargs)


def test_nm_pattern_must_divide_the_input_dimension():
    model = tiny_llama()  # hidden 64: 64:128 cannot tile it
    with pytest.raises(ValueError, match=r"q_proj: N:M pattern 64:128 needs in_features divisible by 128, got 64"):
        hf_compress.quantize(model, MagnitudeConfig(pattern="64:128"), progress=False)


def test_pruning_a_compressed_model_is_refused(calib, char_tokenizer):
    model = tiny_llama()
    hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(ValueError, match="already quantized or pruned.*set `bits` on the pruning config"):
        hf_compress.quantize(model, MagnitudeConfig(sparsity=0.5), progress=False)
    model = tiny_llama()
    hf_compress.quantize(model, MagnitudeConfig(sparsity=0.5), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        hf_compress.quantize(model, MagnitudeConfig(sparsity=0.5), progress=False)


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                             d_kv=16, decoder_start_token_id=0)).eval()
    with pytest.raises(ValueError, match="does not support T5ForConditionalGeneration"):
        hf_compress.quantize(t5, MagnitudeConfig(sparsity=0.5), progress=False)


def test_kernel_report_says_sparse_modules_run_dense():
    model = tiny_llama()
    hf_compress.quantize(model, MagnitudeConfig(pattern="2:4", bits=4, group_size=32), progress=False)
    rows = [r for r in hf_compress.kernel_report(model) if "decompressed" in r["kernels"][0]]
    assert len(rows) == 14 and "2:4 + 4-bit codes" in rows[0]["kernels"][0] and "CUDA-only" in rows[0]["fallback"][0]

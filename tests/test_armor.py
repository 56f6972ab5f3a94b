"""ARMOR: the proxy loss decreases from its Wanda-style start, every mask step keeps 2:4, it beats Wanda 2:4 on a
calibrated layer, and the checkpoint (sparse core + block-diagonal factors) loads natively in a fresh process."""

import json

import pytest
import torch

import hf_compress
from hf_compress.formats.sparse import SparseLinear
from hf_compress.methods.armor import solver
from hf_compress.methods.armor.config import ArmorConfig
from hf_compress.methods.sparse.solvers import output_error, wanda

from conftest import fresh_process_logits, tiny_llama
from test_pruning import IDS, calibrated_layer


def test_loss_decreases_and_every_mask_step_keeps_2_of_4(monkeypatch):
    W, H = calibrated_layer(64, 128)
    steps = []
    original = solver._mask_step

    def checked(Wp, mask, *args):
        before = float((mask.view(64, -1, 4).sum(-1) == 2).all())
        original(Wp, mask, *args)
        steps.append((before, bool((mask.view(64, -1, 4).sum(-1) == 2).all())))

    monkeypatch.setattr(solver, "_mask_step", checked)
    r = solver.armor(W, H, block=32, iters=40)
    assert len(steps) == 40 and all(a and b for a, b in steps)
    assert len(r.losses) == 41 and r.losses[-1] < 0.8 * r.losses[0]
    assert bool((r.mask.view(64, -1, 4).sum(-1) == 2).all()) and bool((r.weight[~r.mask] == 0).all())
    A, B = r.factors
    assert A.shape == (2, 32, 32) and B.shape == (4, 32, 32)
    assert r.output_error < output_error(W, wanda(W, H, nm=(2, 4)).weight, H)


def test_the_mask_step_alone_never_increases_the_loss():
    W, H = calibrated_layer(32, 64)
    r = solver.armor(W, H, block=16, iters=0)  # the Wanda-style start, A = B = I
    d = H.diagonal()
    weight = torch.ones(32)[:, None] * d[None, :]
    Wp, mask = r.weight.clone(), r.mask.clone()
    A, B = torch.eye(16).expand(2, 16, 16).clone(), torch.eye(16).expand(4, 16, 16).clone()
    gen = torch.Generator().manual_seed(0)
    loss = float((weight * (W - Wp * mask) ** 2).sum())
    for _ in range(20):
        solver._mask_step(Wp, mask, A, B, W - Wp * mask, torch.ones(32), d, 16, gen)
        new = float((weight * (W - Wp * mask) ** 2).sum())
        assert new <= loss * (1 + 1e-6)
        loss = new


def test_armor_checkpoint_loads_natively_in_a_fresh_process(tmp_path, text_corpus, char_tokenizer):
    model = tiny_llama()
    config = ArmorConfig(iters=5, num_samples=8, seq_len=64)
    hf_compress.quantize(model, config, calibration=[text_corpus], tokenizer=char_tokenizer, progress=False)
    mods = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(mods) == 14 and all(m.spec.factor_block == 32 and m.factor_a is not None for m in mods)
    assert all(bool((m.kept_mask().view(m.out_features, -1, 4).sum(-1) == 2).all()) for m in mods)
    pruned = model(IDS).logits.detach()
    hf_compress.save_pretrained(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hfc_armor" and all(e["factor_block"] == 32 for e in saved["plan"].values())
    assert torch.equal(fresh_process_logits(tmp_path / "a", IDS, tmp_path), pruned)


def test_bad_armor_input_is_refused(text_corpus, char_tokenizer):
    with pytest.raises(ValueError, match="sparse core is 2:4"):
        ArmorConfig(pattern="4:8")
    with pytest.raises(ValueError, match="factor_block must be a positive multiple of 4"):
        ArmorConfig(factor_block=6)
    with pytest.raises(ValueError, match="factor_block 64 must divide both in_features 64 and out_features 32"):
        hf_compress.quantize(tiny_llama(), ArmorConfig(factor_block=64, num_samples=4, seq_len=32),
                             calibration=[text_corpus], tokenizer=char_tokenizer, progress=False)

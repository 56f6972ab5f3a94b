"""ECoFLaP: water-filling meets the global ratio exactly under the per-block cap; zeroth-order scores use forward
passes only and restore the weights; the plan and the per-block allocation reach config.json, the card and the CLI."""

import json
import random

import pytest
import torch

import hf_compress
from hf_compress.formats.sparse import SparseLinear
from hf_compress.methods.ecoflap.allocation import split_keep, water_fill, zeroth_order_scores
from hf_compress.methods.ecoflap.config import EcoflapConfig

from conftest import fresh_process_logits, save_char_tokenizer, tiny_llama

IDS = torch.tensor([[5, 17, 99, 3, 64, 120, 7, 7, 31, 2]])


@pytest.mark.parametrize("seed", range(6))
def test_water_fill_meets_the_global_ratio_exactly_within_the_cap(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1_000, 50_000) for _ in range(rng.randint(2, 30))]
    scores = [rng.random() ** 3 for _ in sizes]
    sparsity = rng.choice([0.3, 0.5, 0.6, 0.7])
    cap = min(sparsity + rng.choice([0.0, 0.05, 0.1, 0.2]), 0.95)
    keep = water_fill(sizes, scores, sparsity, cap)
    assert sum(keep) == sum(sizes) - round(sparsity * sum(sizes))
    for n, k in zip(sizes, keep):
        assert 0 <= k <= n and 1 - k / n <= cap + 1 / n


def test_water_fill_gives_important_blocks_more_and_passes_on_what_a_full_block_cannot_take():
    keep = water_fill([1000] * 4, [1.0, 2.0, 4.0, 100.0], 0.6, 0.7)
    assert 300 <= keep[0] <= keep[1] <= keep[2] <= keep[3] and sum(keep) == 1600  # floors at the cap (1 − 0.7)
    keep = water_fill([1000] * 4, [1.0, 1.0, 1.0, 1000.0], 0.2, 0.3)
    assert keep[3] == 1000 and sum(keep) == 3200 and max(keep[:3]) - min(keep[:3]) <= 1  # its overflow went on
    parts = split_keep(999, [300, 600, 100])
    assert sum(parts) == 999 and all(p <= n for p, n in zip(parts, [300, 600, 100]))


@pytest.mark.parametrize("kwargs, match", [({"sparsity": 0.6, "max_sparsity": 0.5}, "at least the global sparsity"),
                                           ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
                                           ({"pattern": "2:4"}, "N:M pattern"), ({"local": "magnitude"}, "local must be")])
def test_bad_ecoflap_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EcoflapConfig(**kwargs)


def test_zeroth_order_scores_use_forward_passes_only_and_restore_the_weights():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [[m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)] for layer in model.model.layers]
    scores = zeroth_order_scores(model, groups, torch.randint(0, 128, (3, 24)), progress=False)
    assert len(scores) == 2 and all(s > 0 for s in scores)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ecoflap_prunes_the_global_count_exactly_and_records_its_plan(tmp_path, text_corpus, char_tokenizer):
    model = tiny_llama()
    config = EcoflapConfig(sparsity=0.6, zo_samples=3, num_samples=8, seq_len=64)
    hf_compress.quantize(model, config, calibration=[text_corpus], tokenizer=char_tokenizer, progress=False)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    total = sum(m.in_features * m.out_features for m in sparse)
    pruned = sum(int((~m.kept_mask()).sum()) for m in sparse)
    assert pruned == round(0.6 * total) == config.report["pruned_weights"]
    assert len(config.allocation) == 2 and all(a["sparsity"] <= 0.7 + 1e-6 for a in config.allocation)
    hf_compress.save_pretrained(model, tmp_path / "e")
    saved = json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]
    assert saved["allocation"] == config.allocation and saved["local"] == "wanda"
    card = (tmp_path / "e" / "README.md").read_text()
    assert "Per-layer sparsity plan" in card and "| 0 |" in card and "ECoFLaP" in card
    assert torch.equal(fresh_process_logits(tmp_path / "e", IDS, tmp_path), model(IDS).logits.detach())


def test_prune_command(tmp_path, text_corpus):
    from hf_compress.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    save_char_tokenizer(tmp_path / "m")
    (tmp_path / "calib.txt").write_text(text_corpus)
    common = ["--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seq-len", "32"]
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "p"), "--method", "ecoflap", "--sparsity",
                 "0.6", *common]) == 0
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hfc_ecoflap" and saved["report"]["sparsity"] == pytest.approx(0.6, abs=1e-6)
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "q"), "--method", "wanda", "--pattern", "2:4",
                 *common]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["pattern"] == "2:4"
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "r"), "--method", "wanda", "--sparsity", "1.2",
                 *common]) == 2

"""Sensitivity profile: one calibration run, JSON round trip, model check, plot; the model stays unchanged."""


import pytest
import torch

from hf_compress.sensitivity import SensitivityProfile, profile
from hf_compress.sensitivity.scores import fisher_loss_increase, lim_score, zd_score

from conftest import TINY_MODELS, tiny_llama


def test_scores_on_hand_built_tensors():
    x = torch.randn(10, 8)
    assert lim_score(x, x) == pytest.approx(-1.0)
    assert lim_score(x, -x) == pytest.approx(1.0)
    w = torch.zeros(100)
    w[:10] = 10.0  # 10% of the weights sit far above the mean
    assert zd_score([w]) == pytest.approx(0.10)
    assert fisher_loss_increase(torch.tensor([2.0, 0.0]), torch.tensor([3.0, 5.0])) == pytest.approx(9.0)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_profile_measures_every_layer_and_module_without_changing_the_model(arch, calib, char_tokenizer, tmp_path):
    model = TINY_MODELS[arch]()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
    prof = profile(model, calib, char_tokenizer, bits=3, group_size=32, fisher_samples=2, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert all(p.grad is None for p in model.parameters())
    assert [l["index"] for l in prof.layers] == [0, 1]
    n_modules = 14 if arch == "llama" else 8
    assert len(prof.modules) == n_modules
    for m in prof.modules.values():
        assert len(m["column_loss"]) == m["shape"][1]
        assert m["fisher"] > 0 and 0 < m["output_error"] < 1
    assert all(-1 <= l["lim"] <= 1 and 0 < l["zd"] < 1 for l in prof.layers)

    path = prof.save(tmp_path / "prof")
    assert path.name == "sensitivity_profile.json"
    again = SensitivityProfile.load(tmp_path / "prof")
    assert again == prof
    again.check_model(TINY_MODELS[arch]())
    png = prof.plot(tmp_path / "prof.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 |" in prof.table()


def test_profile_from_another_model_is_rejected(calib, char_tokenizer, tmp_path):
    prof = profile(tiny_llama(), calib, char_tokenizer, group_size=32, fisher_samples=0, progress=False)
    with pytest.raises(ValueError, match="does not match"):
        prof.check_model(TINY_MODELS["gpt2"]())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        SensitivityProfile.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        SensitivityProfile.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown layer score"):
        prof.layer_scores("nope")

"""Calibration sources, seeded windows, block discovery, Hessians and the perplexity protocol."""

import math

import pytest
import torch

from hf_compress.calibration.data import CalibrationSpec, calibration_batches, load_text, sample_windows
from hf_compress.calibration.discovery import decoder_layers
from hf_compress.calibration.runner import capture_block_inputs, collect_stats, discover_groups
from hf_compress.evaluation import eval_windows, perplexity

from conftest import tiny_gpt2, tiny_llama


def test_sources_list_file_and_datasets(tmp_path, text_corpus, char_tokenizer):
    f = tmp_path / "c.txt"
    f.write_text(text_corpus)
    from_list = calibration_batches(CalibrationSpec([text_corpus], 4, 32, seed=1), char_tokenizer)
    from_file = calibration_batches(CalibrationSpec(str(f), 4, 32, seed=1), char_tokenizer)
    from_ds = calibration_batches(
        CalibrationSpec({"path": "text", "data_files": str(f), "split": "train"}, 4, 32, seed=1), char_tokenizer)
    assert from_list.shape == (4, 32)
    assert torch.equal(from_list, from_file)
    assert from_ds.shape == (4, 32)  # the datasets path joins lines with blank lines, so tokens differ slightly


def test_windows_are_seeded():
    ids = torch.arange(1000)
    assert torch.equal(sample_windows(ids, 5, 50, 3), sample_windows(ids, 5, 50, 3))
    assert not torch.equal(sample_windows(ids, 5, 50, 3), sample_windows(ids, 5, 50, 4))


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(TypeError, match="strings"):
        load_text(["ok", 3])
    with pytest.raises(TypeError, match="unsupported"):
        load_text(42)
    with pytest.raises(ValueError, match="num_samples"):
        CalibrationSpec(["x"], num_samples=0)


@pytest.mark.parametrize("build,expected", [
    (tiny_llama, [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    (tiny_gpt2, [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_true_sequential_groups_found_by_hooks(build, expected, char_tokenizer, text_corpus):
    model = build()
    _, layers = decoder_layers(model)
    batches = calibration_batches(CalibrationSpec([text_corpus], 2, 16), char_tokenizer)
    inputs = capture_block_inputs(model, layers, batches)
    from hf_compress.calibration.discovery import quantizable_modules

    targets = dict(quantizable_modules(layers[0]))
    assert discover_groups(layers[0], targets, inputs[0]) == expected


def test_hessian_equals_2_xtx_over_n(char_tokenizer, text_corpus):
    model = tiny_llama()
    _, layers = decoder_layers(model)
    batches = calibration_batches(CalibrationSpec([text_corpus], 3, 16), char_tokenizer)
    inputs = capture_block_inputs(model, layers, batches)
    q = layers[0].self_attn.q_proj
    seen = []
    h = q.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 64)))
    stats = collect_stats(layers[0], {"self_attn.q_proj": q}, inputs, "layers.0")
    h.remove()
    X = torch.cat(seen)
    assert stats["self_attn.q_proj"].tokens == 48
    assert torch.allclose(stats["self_attn.q_proj"].hessian, 2 * X.T @ X / 48, atol=1e-4)


def test_perplexity_matches_manual_protocol(char_tokenizer, text_corpus):
    model = tiny_llama()
    ppl = perplexity(model, char_tokenizer, [text_corpus], seq_len=32, max_windows=3, progress=False)
    ids = char_tokenizer(text_corpus).input_ids[0]
    windows = eval_windows(ids, 32, 3)
    with torch.no_grad():
        nll = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert ppl == pytest.approx(math.exp(sum(nll) / 3), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, char_tokenizer, ["tiny"], seq_len=32, progress=False)

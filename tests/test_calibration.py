"""Calibration sources, seeded windows, block discovery, Hessians and the perplexity protocol."""

import math

import pytest
import torch

from hf_compress.calibration.data import CalibrationSpec, calibration_batches, load_text, sample_windows
from hf_compress.calibration.discovery import decoder_layers
from hf_compress.calibration.runner import capture_block_inputs, collect_stats, discover_groups
from hf_compress.evaluation import eval_windows, perplexity

from conftest import WIKITEXT, require_wikitext, tiny_gpt2, tiny_llama


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


# -- pre-tokenized calibration and the runner's memory (issue 17) ---------------------------------------------------

def test_pretokenized_sources_need_no_tokenizer(text_corpus, char_tokenizer):
    import datasets

    ids = char_tokenizer(text_corpus).input_ids[0]
    from_text = calibration_batches(CalibrationSpec([text_corpus], 4, 32, seed=1), char_tokenizer)
    from_stream = calibration_batches(CalibrationSpec(ids, 4, 32, seed=1))  # 1-D tensor: one token stream
    from_ints = calibration_batches(CalibrationSpec(ids.tolist(), 4, 32, seed=1))
    assert torch.equal(from_stream, from_text) and torch.equal(from_ints, from_text)
    windows = torch.randint(0, 128, (3, 20))
    assert torch.equal(calibration_batches(CalibrationSpec(windows, 4, 32)), windows)  # 2-D: the windows as given
    docs = [ids[:2000].tolist(), ids[2000:].tolist()]
    from_docs = calibration_batches(CalibrationSpec(docs, 4, 32, seed=1))  # documents joined, like text
    from_ds = calibration_batches(CalibrationSpec(datasets.Dataset.from_dict({"input_ids": docs}), 4, 32, seed=1))
    assert torch.equal(from_docs, from_text) and torch.equal(from_ds, from_text)
    text_ds = datasets.Dataset.from_dict({"text": [text_corpus]})
    assert torch.equal(calibration_batches(CalibrationSpec(text_ds, 4, 32, seed=1), char_tokenizer), from_text)


def test_bad_pretokenized_sources():
    with pytest.raises(TypeError, match="integer token ids"):
        calibration_batches(CalibrationSpec(torch.randn(2, 16), 2, 8))
    with pytest.raises(ValueError, match="negative token id"):
        calibration_batches(CalibrationSpec(torch.tensor([[1, -2, 3]]), 2, 2))
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        calibration_batches(CalibrationSpec(torch.zeros(2, 3, 4, dtype=torch.long), 2, 2))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_batches(CalibrationSpec(["some text"], 2, 2))


def test_quantize_with_pretokenized_calibration_and_a_json_safe_config(tmp_path, text_corpus, char_tokenizer):
    import hf_compress

    ids = char_tokenizer(text_corpus).input_ids[0]
    windows = sample_windows(ids, 8, 64, seed=0)
    from_ids = hf_compress.quantize(tiny_llama(), hf_compress.GPTQConfig(bits=4, group_size=32),
                                    calibration=windows, progress=False)  # no tokenizer anywhere
    from_text = hf_compress.quantize(tiny_llama(), hf_compress.GPTQConfig(bits=4, group_size=32), calibration=
                                     CalibrationSpec([text_corpus], 8, 64, seed=0), tokenizer=char_tokenizer, progress=False)
    x = ids[:40][None]
    with torch.no_grad():
        assert torch.equal(from_ids(x).logits, from_text(x).logits)
    cfg = hf_compress.GPTQConfig(bits=4, group_size=32, dataset=windows)
    assert cfg.to_dict()["dataset"] == "<in-memory token ids [8, 64]>"
    hf_compress.quantize(tiny_llama(), cfg, progress=False)


def test_calibration_runner_keeps_only_the_current_block_dense(char_tokenizer, text_corpus):
    """Each finished block's dense copies are dropped: at most one block is held dequantized at a time."""
    import hf_compress
    from hf_compress.calibration.runner import run_sequential
    from hf_compress.formats.linear import PackedLinear
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128)).eval()
    config = hf_compress.GPTQConfig(bits=4, group_size=32)
    batches = calibration_batches(CalibrationSpec([text_corpus], 4, 32), char_tokenizer)
    plan = config.resolve_plan(model)
    dense_blocks = []

    def solve(name, module, stats):
        W = module.weight.detach()
        r = config.solve(W, stats, plan[name], name=name)
        return PackedLinear.from_codes(r.codes, r.scales, r.zeros, plan[name], None)

    def on_block(idx, inputs, outputs):
        dense_blocks.append([i for i, block in enumerate(model.model.layers)
                             if any(isinstance(m, PackedLinear) and m._dense_cache is not None for m in block.modules())])

    run_sequential(model, batches, lambda n, m: n in plan, solve, progress=False, on_block=on_block)
    assert dense_blocks == [[0], [1], [2], [3]]
    assert not any(getattr(m, "_dense_cache", None) is not None for m in model.modules())


class _CallRecorder:
    """Wraps a tokenizer and records the length of every text it is called on."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_long_texts_are_tokenized_in_pieces_with_the_one_call_ids(smollm2_dir):
    """Calibration and perplexity tokenize long texts in pieces (the one-call peak was 140 MB on WikiText-2) and
    must get exactly the ids of one call, on every text the benchmarks read."""
    from transformers import AutoTokenizer

    from hf_compress.calibration.data import tokenize_text

    require_wikitext()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    files = [WIKITEXT / "valid.txt", WIKITEXT / "test.txt", WIKITEXT.parent / "tinyshakespeare" / "input.txt"]
    for path in [f for f in files if f.is_file()]:
        text = path.read_text(encoding="utf-8")
        recorder = _CallRecorder(tokenizer)
        pieces = tokenize_text(text, recorder)
        whole = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        assert torch.equal(pieces, whole), path.name
        assert max(recorder.lengths) < len(text) // 4, (path.name, max(recorder.lengths))  # really in pieces


def test_a_tokenizer_that_marks_each_text_start_gets_one_call(char_tokenizer):
    """A tokenizer whose ids depend on where a text starts (a dummy prefix, as SentencePiece adds) fails the cut
    check: the text is tokenized in one call, so the ids still equal the one-call ids."""
    from hf_compress.calibration.data import tokenize_text

    class PrefixTokenizer:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return char_tokenizer("^" + text)

    lines = [f"line {i} holds some words" for i in range(20000)]
    text = "\n".join(lines)
    tokenizer = _CallRecorder(PrefixTokenizer())
    ids = tokenize_text(text, tokenizer, piece_chars=4096)
    assert torch.equal(ids, char_tokenizer("^" + text).input_ids[0])
    assert max(tokenizer.lengths) == len(text)
    plain = _CallRecorder(char_tokenizer)  # the same text with a context-free tokenizer is cut
    assert torch.equal(tokenize_text(text, plain, piece_chars=4096), char_tokenizer(text).input_ids[0])
    assert max(plain.lengths) < 3 * 4096

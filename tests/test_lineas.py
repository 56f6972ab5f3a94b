"""LinEAS (issue 25): the loss and prox math on hand-made tensors, training on toy source/target distributions (the
loss falls, the per-coordinate distributions move), strength 0 is the base model exactly, the mean-shift baseline,
save → load in a fresh process, the CLI and the card, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CharTokenizer, fresh_adapter_outputs, save_char_tokenizer, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from hf_compress.methods.lineas import LineasConfig, fit_mean_shift, lineas_layers, read_prompts, train_lineas
from hf_compress.methods.lineas.layer import steer
from hf_compress.methods.lineas.loss import lineas_loss, pooled_mean, prox_sparse_group_, sorted_w2
from hf_compress.methods.lineas.train import encode_prompts, pooled_activations

TOK = CharTokenizer()
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
BOTH_NORMS = ["input_layernorm", "post_attention_layernorm"]



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for these small runs, restored after: a thread count set at import would leak into every later
    test of the session (bit-equality checks against fresh processes then fail)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def prompts(alphabet: str, n: int, seed: int) -> list[str]:
    """Toy "styles": random strings over disjoint alphabets."""
    g = torch.Generator().manual_seed(seed)
    return ["".join(alphabet[i] for i in torch.randint(0, len(alphabet), (int(n_),), generator=g))
            for n_ in torch.randint(8, 14, (n,), generator=g)]


SOURCE, TARGET = prompts("abcdefgh", 12, 0), prompts("TUVWXYZ!", 12, 1)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def steered(**config):
    return get_peft_model(tiny_llama(), LineasConfig(**{"target_modules": BOTH_NORMS, **config}))


def trained(steps=40, **config):
    model = steered(**config)
    history = train_lineas(model, TOK, SOURCE, TARGET, steps=steps, lr=3e-2, progress=False)
    return model, history


def w2_per_layer(model, source=SOURCE, target=TARGET):
    ids, mask = encode_prompts(TOK, source, 64)
    tids, tmask = encode_prompts(TOK, target, 64)
    strength = model.get_strength()
    model.set_strength(0.0)
    base_target = pooled_activations(model, tids, tmask)
    base_source = pooled_activations(model, ids, mask)
    model.set_strength(strength)
    now = pooled_activations(model, ids, mask)
    return ([sorted_w2(s, t).item() for s, t in zip(base_source, base_target)],
            [sorted_w2(s, t).item() for s, t in zip(now, base_target)])


# -- the math ----------------------------------------------------------------------------------------------------------
def test_sorted_w2_is_the_1d_wasserstein_distance_per_coordinate():
    u = torch.tensor([[0.0, 5.0], [1.0, 1.0]])
    v = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    # coordinate 0: sorted (0, 1) vs (2, 3) -> ((2)^2 + (2)^2) / 2 = 4; coordinate 1: same sets -> 0
    assert sorted_w2(u, v).item() == pytest.approx(4.0)
    # unequal sizes: a point mass at 0 against {-1, 1} has W2^2 = 1
    assert sorted_w2(torch.zeros(1, 1), torch.tensor([[-1.0], [1.0]])).item() == pytest.approx(1.0)
    # a permutation of the rows changes nothing (unpaired samples)
    x, y = torch.randn(7, 3), torch.randn(7, 3)
    assert sorted_w2(x, y).item() == pytest.approx(sorted_w2(x[torch.randperm(7)], y).item())


def test_pooled_mean_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert pooled_mean(h, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_steer_interpolates_and_strength_zero_returns_the_input_itself():
    z, omega, bias = torch.randn(2, 3, 4), torch.rand(4) + 0.5, torch.randn(4)
    assert steer(z, omega, bias, 0.0) is z
    torch.testing.assert_close(steer(z, omega, bias, 1.0), omega * z + bias)
    torch.testing.assert_close(steer(z, omega, bias, 0.5), (1 + 0.5 * (omega - 1)) * z + 0.5 * bias)


def test_prox_soft_thresholds_then_shrinks_the_group():
    omega, bias = torch.tensor([1.5, 1.05, 0.7, 1.0]), torch.tensor([0.2, -0.01, 0.0, -0.5])
    prox_sparse_group_(omega, bias, l1=0.1, group=0.0)
    torch.testing.assert_close(omega, torch.tensor([1.4, 1.0, 0.8, 1.0]))
    torch.testing.assert_close(bias, torch.tensor([0.1, 0.0, 0.0, -0.4]))
    prox_sparse_group_(omega, bias, l1=0.0, group=1.0)  # threshold √4 · 1 = 2 exceeds both norms: identity
    assert torch.equal(omega, torch.ones(4)) and torch.equal(bias, torch.zeros(4))


# -- the adapter -------------------------------------------------------------------------------------------------------
def test_default_targets_are_the_pre_mlp_norms_and_start_as_identity():
    base = tiny_llama()
    expected = logits(base)
    model = get_peft_model(base, LineasConfig())
    names = [n for n, m in model.named_modules() if m in set(lineas_layers(model))]
    assert [n.rsplit(".", 1)[-1] for n in names] == ["post_attention_layernorm"] * 2
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 64  # ω and b of two 64-wide norms
    assert torch.equal(logits(model), expected)


def test_strength_zero_gives_exactly_the_base_logits():
    expected = logits(tiny_llama())
    model, _ = trained(steps=10)
    full = logits(model)
    assert (full - expected).abs().max() > 1e-3, "training changed nothing; the test would be vacuous"
    model.set_strength(0.0)
    assert torch.equal(logits(model), expected)
    model.set_strength(0.5)
    half = logits(model)
    assert not torch.equal(half, expected) and not torch.equal(half, full)
    model.set_strength(1.0)
    assert torch.equal(logits(model), full)


def test_training_lowers_the_loss_and_moves_every_layer_towards_the_target():
    model, history = trained(steps=40)
    assert history["final_loss"] < 0.3 * history["initial_loss"]
    assert history["loss"][-1] < history["loss"][0]
    before, after = w2_per_layer(model)
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    # beyond the training prompts: fresh strings of the same two alphabets
    before, after = w2_per_layer(model, prompts("abcdefgh", 12, 7), prompts("TUVWXYZ!", 12, 8))
    assert sum(after) < 0.5 * sum(before), (before, after)


def test_micro_batches_give_the_same_gradient_as_one_batch():
    """The loss sorts across the batch, so the micro-batched path takes the gradient in two passes: same result."""
    runs = []
    for micro in (100, 5):
        model = steered()
        train_lineas(model, TOK, SOURCE, TARGET, steps=3, lr=1e-2, micro_batch=micro, progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-6)


def test_sparse_group_penalty_switches_coordinates_off():
    dense, _ = trained(steps=20)
    sparse, history = trained(steps=20, l1_penalty=1.0)

    def moved(model):
        return sum(int(((l.lineas_omega["default"] != 1) | (l.lineas_bias["default"] != 0)).sum())
                   for l in lineas_layers(model))

    assert moved(sparse) < 0.75 * moved(dense) and history["final_loss"] < 0.5 * history["initial_loss"]
    off, _ = trained(steps=5, group_penalty=10.0)  # a huge group weight keeps every layer at the identity
    assert moved(off) == 0


def test_mean_shift_matches_the_target_means_layer_by_layer():
    model = steered()
    fit_mean_shift(model, TOK, SOURCE, TARGET, progress=False)
    ids, mask = encode_prompts(TOK, SOURCE, 64)
    tids, tmask = encode_prompts(TOK, TARGET, 64)
    steered_source = pooled_activations(model, ids, mask)
    model.set_strength(0.0)
    target = pooled_activations(model, tids, tmask)
    for s, t in zip(steered_source, target):
        torch.testing.assert_close(s.mean(0), t.mean(0), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(l.lineas_omega["default"], torch.ones(64)) for l in lineas_layers(model))


def test_merging_is_refused():
    model, _ = trained(steps=2)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()


LOAD = '''
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
base_dir, adapter_dir, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], torch.tensor(eval(sys.argv[4]))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
assert "hf_compress.methods.lineas.model" in sys.modules  # registered by the autoload hook, not imported here
with torch.no_grad():
    result = {"steered": model(input_ids=ids).logits}
    model.set_strength(0.0)
    result["zero"] = model(input_ids=ids).logits
save_file(result, out)
'''


def test_save_then_load_in_a_fresh_process_gives_identical_logits(tmp_path):
    from hf_compress.integrations.hub import enable_hub_cards, save_pretrained

    tiny_llama().save_pretrained(tmp_path / "base")
    model, _ = trained(steps=10)
    model.set_strength(0.7)
    enable_hub_cards(model, tags=["lineas"])
    save_pretrained(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["strength"] == 0.7
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "LinEAS" in card and "set_strength" in card
    expected = logits(model)
    out = fresh_adapter_outputs(LOAD, tmp_path / "base", tmp_path / "adapter", IDS, tmp_path)
    assert torch.equal(out["steered"], expected)
    assert torch.equal(out["zero"], logits(tiny_llama()))


def test_cli_steer_writes_a_loadable_adapter(tmp_path):
    from hf_compress import cli

    tiny_llama().save_pretrained(tmp_path / "model")
    save_char_tokenizer(tmp_path / "model")
    (tmp_path / "src.txt").write_text("\n".join(SOURCE) + "\n\n")
    (tmp_path / "tgt.txt").write_text("\n".join(TARGET))
    args = ["steer", str(tmp_path / "model"), "--source", str(tmp_path / "src.txt"), "--target",
            str(tmp_path / "tgt.txt"), "--out", str(tmp_path / "out"), "--steps", "3", "--strength", "0.5"]
    assert cli.main(args) == 0
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    assert loaded.get_strength() == 0.5 and len(lineas_layers(loaded)) == 2
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    assert cli.main([*args[:7], str(tmp_path / "shift"), "--mean-shift"]) == 0
    shifted = PeftModel.from_pretrained(tiny_llama(), tmp_path / "shift")
    assert all(torch.equal(l.lineas_omega["default"], torch.ones(64)) for l in lineas_layers(shifted))
    assert any(l.lineas_bias["default"].abs().sum() > 0 for l in lineas_layers(shifted))
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert cli.main([*args[:3], str(tmp_path / "empty.txt"), *args[4:7], str(tmp_path / "out2")]) == 2


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_prompts_raise_clearly(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(OSError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    model = steered()
    with pytest.raises(ValueError, match="no prompts given"):
        train_lineas(model, TOK, [], TARGET, steps=1, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        train_lineas(model, TOK, SOURCE + [""], TARGET, steps=1, progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        train_lineas(model, TOK, "one string", TARGET, steps=1, progress=False)
    with pytest.raises(TypeError, match="LineasConfig"):
        train_lineas(tiny_llama(), TOK, SOURCE, TARGET, steps=1, progress=False)


def test_bad_config_and_modules_raise_clearly():
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(tiny_llama(), LineasConfig(target_modules=["no_such_norm"]))
    with pytest.raises(ValueError, match="finite"):
        LineasConfig(strength=math.nan)
    with pytest.raises(ValueError, match="l1_penalty"):
        LineasConfig(l1_penalty=-1.0)
    with pytest.raises(ValueError, match="lr"):
        train_lineas(steered(), TOK, SOURCE, TARGET, steps=1, lr=math.nan, progress=False)
    model = steered()
    with pytest.raises(ValueError, match="finite"):
        model.set_strength(float("inf"))
    with pytest.raises(TypeError, match="real number"):
        model.set_strength("1")


def test_unknown_model_type_needs_target_modules():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                           attention_types=[[["global"], 2]]))
    with pytest.raises(ValueError, match="no default modules for model type 'gpt_neo'"):
        get_peft_model(model, LineasConfig())
    assert len(lineas_layers(get_peft_model(model, LineasConfig(target_modules=["ln_2"])))) == 2


def test_nan_activations_and_corrupt_adapters_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="non-finite activations at steered layer 1"):
        lineas_loss([torch.zeros(2, 3), torch.full((2, 3), math.nan)], [torch.zeros(2, 3)] * 2)
    model = steered()
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.down_proj.weight.fill_(math.nan)
    with pytest.raises(ValueError, match="non-finite activations"):
        train_lineas(model, TOK, SOURCE, TARGET, steps=1, progress=False)
    good, _ = trained(steps=2)
    good.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lineas_bias"))
    tensors[key][3] = math.nan
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="corrupt.*NaN"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")


def test_an_adapter_for_another_width_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    good, _ = trained(steps=2)
    good.save_pretrained(tmp_path / "a")
    narrow = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(ValueError, match="does not fit this base model"):
        PeftModel.from_pretrained(narrow, tmp_path / "a")


def test_a_frozen_adapter_refuses_training(tmp_path):
    model, _ = trained(steps=2)
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match="is_trainable=True"):
        train_lineas(loaded, TOK, SOURCE, TARGET, steps=1, progress=False)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", is_trainable=True)
    train_lineas(trainable, TOK, SOURCE, TARGET, steps=1, progress=False)


def test_transformers_load_adapter_and_auto_peft_model_steer_the_same(tmp_path):
    from peft import AutoPeftModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model, _ = trained(steps=5)
    model.set_strength(0.6)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    plain = tiny_llama()
    plain.load_adapter(str(tmp_path / "adapter"))  # transformers' PEFT integration reads peft_type.value
    assert torch.equal(logits(plain), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(auto), expected)
    assert auto.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)


def test_loss_gradients_set_the_l1_scale():
    from hf_compress.methods.lineas.train import loss_gradients

    model = steered()
    grads = loss_gradients(model, TOK, SOURCE, TARGET)
    assert grads.shape == (4 * 2 * 64,) and (grads > 0).any()  # 2 layers × 2 norms × (ω, b) × 64
    assert all(p.grad is None for p in model.parameters())
    l1 = torch.quantile(grads, 0.9).item()  # ~90 % of the coordinates start below the threshold
    sparse = steered(l1_penalty=l1)
    train_lineas(sparse, TOK, SOURCE, TARGET, steps=20, lr=3e-2, progress=False)
    moved = sum(int(((l.lineas_omega["default"] != 1) | (l.lineas_bias["default"] != 0)).sum())
                for l in lineas_layers(sparse))
    assert 0 < moved < 0.5 * grads.numel()

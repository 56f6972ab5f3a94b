"""LISA as a PEFT method (issue 26): ``get_peft_model(model, LisaConfig(...))``, the Trainer and custom-loop drivers,
the adapter (only the changed tensors, base fingerprint), a fresh-process round trip, merging, wrong bases, the card
and ``hf-compress lisa --adapter``. The schedule itself is tested through both paths in ``test_lisa.py``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fresh_adapter_outputs, save_char_tokenizer, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from hf_compress.methods.lisa import LisaCallback, LisaConfig, LisaSchedule
from test_lisa import dataset, llama, train

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def custom_loop(model, steps: int, step_fn) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(2))
    for step in range(steps):
        step_fn(step, opt, "before")
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        step_fn(step, opt, "after")


def trained_peft(steps=6, **settings):
    model = get_peft_model(llama(), LisaConfig(**{"num_active_layers": 2, "interval_steps": 2, "seed": 3, **settings}))
    custom_loop(model, steps, lambda step, opt, when: when == "after" and model.step(opt))
    return model


def test_get_peft_model_trains_embeddings_head_and_the_sampled_layers():
    model = get_peft_model(llama(), LisaConfig(num_active_layers=2, interval_steps=20, seed=3))
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "HFC_LISA"
    base = model.get_base_model()
    active = model.active_layers
    expected = {n for n, _ in base.named_parameters()
                if not n.startswith("model.layers.") or int(n.split(".")[2]) in active}
    assert {n for n, p in base.named_parameters() if p.requires_grad} == expected and len(active) == 2
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in base.named_parameters() if n in expected) < total


def test_custom_loop_step_matches_the_bare_schedule():
    """``model.step(opt)`` after each optimizer step trains exactly what ``LisaSchedule.apply`` before it does."""
    peft = trained_peft(steps=7)
    bare = llama()
    schedule = LisaSchedule(bare, num_active_layers=2, interval_steps=2, seed=3)
    custom_loop(bare, 7, lambda step, opt, when: when == "before" and schedule.apply(step, opt))
    for (n, a), b in zip(peft.get_base_model().named_parameters(), bare.parameters()):
        assert torch.equal(a, b), n
    trained = sorted({i for s in range(7) for i in schedule.layers_for_step(s)})
    assert peft.trained_layers == trained and len(trained) < 6  # the layers sampled for step 7 never trained


def test_training_without_the_callback_or_step_warns_once(monkeypatch):
    """A forgotten ``callbacks=[LisaCallback()]`` would train the first layers all run long: it is said, once."""
    from hf_compress.methods.lisa.model import LisaModel

    monkeypatch.setattr(LisaModel, "UNSCHEDULED_FORWARDS_WARNING", 12)  # 256 in use; max(4 × interval, this)
    model = get_peft_model(llama(), LisaConfig(num_active_layers=2, interval_steps=2, seed=3)).train()
    batch = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="without resampling") as record:
        for _ in range(30):
            model(input_ids=batch)
    assert len([w for w in record if "without resampling" in str(w.message)]) == 1
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(30):  # step() after every (here: simulated) optimizer step: no warning
            model(input_ids=batch)
            model.step()
    assert not [w for w in seen if "without resampling" in str(w.message)]


def test_step_refuses_an_optimizer_without_the_frozen_layers():
    model = get_peft_model(llama(), LisaConfig(num_active_layers=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # the usual PEFT idiom
    with pytest.raises(ValueError, match="not in the optimizer"):
        model.step(opt)


def test_trainer_path_equals_the_bare_callback_path(tmp_path):
    """``Trainer(model=peft_model, callbacks=[LisaCallback()])`` is the bare callback run, weight for weight
    (``seed=None`` takes the Trainer's seed on both paths)."""
    peft = get_peft_model(llama(), LisaConfig(num_active_layers=2, interval_steps=2))
    driver = LisaCallback()
    train(peft, tmp_path / "peft", [driver], 6)
    bare, callback = llama(), LisaCallback(num_active_layers=2, interval_steps=2)
    train(bare, tmp_path / "bare", [callback], 6)
    assert driver.history == callback.history and driver.config.interval_steps == 2
    for (n, a), b in zip(peft.get_base_model().named_parameters(), bare.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="contradict the model's LisaConfig"):
        train(get_peft_model(llama(), LisaConfig(num_active_layers=2)), tmp_path / "x",
              [LisaCallback(num_active_layers=3)], 1)


def test_adapter_holds_only_the_changed_tensors(tmp_path):
    model = trained_peft(steps=4)
    base = model.get_base_model()
    before = llama()
    changed = {n for (n, p), q in zip(base.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    model.save_pretrained(tmp_path / "a")
    stored = {k.removeprefix("base_model.model.") for k in load_file(tmp_path / "a" / "adapter_model.safetensors")}
    assert stored == changed  # every changed tensor, and nothing else
    layers = sorted({int(n.split(".")[2]) for n in stored if n.startswith("model.layers.")})
    assert layers == model.trained_layers and 0 < len(layers) < 6
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["stored_layers"] == layers and config["base_fingerprint"] and config["peft_type"] == "HFC_LISA"
    full = sum(p.numel() for p in base.parameters())
    assert sum(base.get_parameter(n).numel() for n in stored) < full
    # with the embeddings, head and norm switched off only the sampled layers are stored
    only_layers = trained_peft(steps=2, train_embeddings=False, train_head=False, train_final_norm=False)
    only_layers.save_pretrained(tmp_path / "b")
    keys = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert {int(k.split(".")[4]) for k in keys} == set(only_layers.trained_layers)


LOAD = r'''
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
base_dir, adapter_dir, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], torch.tensor(eval(sys.argv[4]))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
assert not any(p.requires_grad for p in model.parameters())
with torch.no_grad():
    result = {"peft": model(input_ids=ids).logits}
    result["merged"] = model.merge_and_unload()(input_ids=ids).logits
save_file(result, out)
'''


def test_fresh_process_round_trip_restores_identical_logits(tmp_path):
    """Train a few steps, save the adapter, load it onto the base in a new interpreter (registration by the
    installed autoload hook, no ``import hf_compress``): identical logits, also after merge_and_unload."""
    llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LisaConfig(num_active_layers=2, interval_steps=2, seed=3))
    custom_loop(model, 5, lambda step, opt, when: when == "after" and model.step(opt))
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    assert not torch.equal(expected, logits(llama())), "training changed nothing; the test would be vacuous"
    out = fresh_adapter_outputs(LOAD, tmp_path / "base", tmp_path / "adapter", IDS, tmp_path)
    assert torch.equal(out["peft"], expected) and torch.equal(out["merged"], expected)


def test_merge_and_unload_gives_the_plain_model():
    from transformers import LlamaForCausalLM

    model = trained_peft(steps=3)
    expected = logits(model)
    with pytest.raises(TypeError, match="cannot be disabled"):
        model.base_model.disable_adapter_layers()
    with pytest.raises(ValueError):  # PEFT's context manager refuses first: LISA wraps no layers it could switch off
        with model.disable_adapter():
            pass
    with pytest.raises(TypeError, match="merge_and_unload"):
        model.unload()
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and not hasattr(merged, "peft_config")
    assert all(p.requires_grad for p in merged.parameters())  # as a freshly loaded model
    assert torch.equal(logits(merged), expected)


def test_loading_onto_a_wrong_base_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    trained_peft(steps=2).save_pretrained(tmp_path / "a")
    assert torch.equal(logits(PeftModel.from_pretrained(llama(), tmp_path / "a")), logits(PeftModel.from_pretrained(
        llama(), tmp_path / "a")))  # the right base loads
    with pytest.raises(ValueError, match="same tensor shapes but different weights"):
        PeftModel.from_pretrained(llama(seed=1), tmp_path / "a")
    with pytest.raises(ValueError, match="names or shapes differ"):
        PeftModel.from_pretrained(llama(layers=4), tmp_path / "a")
    with pytest.raises(ValueError, match="another dtype"):
        PeftModel.from_pretrained(llama().to(torch.bfloat16), tmp_path / "a")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(ValueError, match="another base model"):
        PeftModel.from_pretrained(other, tmp_path / "a")
    # tensors the base lacks (a hand-edited adapter) are refused, not silently ignored
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    weights["base_model.model.model.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks"):
        PeftModel.from_pretrained(llama(), tmp_path / "a")


def test_continue_training_a_loaded_adapter_keeps_its_layers(tmp_path):
    first = trained_peft(steps=2)
    first.save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(llama(), tmp_path / "a", is_trainable=True)
    assert model.trained_layers == first.trained_layers
    with pytest.raises(ValueError, match="is_trainable=True"):
        PeftModel.from_pretrained(llama(), tmp_path / "a").step()
    custom_loop(model, 3, lambda step, opt, when: when == "after" and model.step(opt))
    model.save_pretrained(tmp_path / "b")
    stored = {int(k.split(".")[4]) for k in load_file(tmp_path / "b" / "adapter_model.safetensors")
              if ".layers." in k}
    assert set(first.trained_layers) <= stored == set(model.trained_layers)


def test_pushed_adapter_gets_the_lisa_card(tmp_path):
    from hub_standin import GOOD_TOKEN, HubStandIn, installed

    import hf_compress
    from hf_compress.integrations.model_card import PLOT_FILE

    trained_peft(steps=2).save_pretrained(tmp_path / "a")
    with installed(HubStandIn()) as hub:
        hf_compress.push_to_hub(tmp_path / "a", "me/tiny-lisa", token=GOOD_TOKEN, base_model="me/tiny-base")
        from huggingface_hub import ModelCard

        card = ModelCard(hub.repos["me/tiny-lisa"]["files"]["README.md"].decode())
        card.validate()
        assert hub.repos["me/tiny-lisa"]["files"][PLOT_FILE].startswith(b"\x89PNG")
    assert card.data.library_name == "peft" and "lisa" in card.data.tags and card.data.base_model == "me/tiny-base"
    assert "**LISA** adapter" in card.text and "| layer " in card.text and "num_active_layers" in card.text


def test_cli_adapter_flag_saves_a_lisa_adapter(tmp_path):
    from hf_compress import cli

    tiny_llama().save_pretrained(tmp_path / "model")  # vocabulary 128: the character tokenizer's ids fit
    save_char_tokenizer(tmp_path / "model")
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog " * 40)
    cli.main(["lisa", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--dataset",
                       str(tmp_path / "train.txt"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                       "--num-active-layers", "1", "--interval-steps", "1", "--adapter"])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HFC_LISA" and config["num_active_layers"] == 1
    assert "**LISA** adapter" in (tmp_path / "out" / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), tmp_path / "out")
    assert not torch.equal(logits(loaded), logits(tiny_llama())) and torch.isfinite(logits(loaded)).all()

"""LISA: what trains in each interval, bounded optimizer state, schedule determinism and Trainer resume — each
through the bare callback / schedule on a plain model and through the PEFT method (``mode="peft"``)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from hf_compress.methods.lisa import LisaCallback, LisaConfig, LisaSchedule
from hf_compress.methods.lisa.callback import optimizer_state_numel


def llama(layers: int = 6, seed: int = 0):
    """Untied embeddings/head, no dropout (so resumed runs can match exactly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64))


def gpt2(layers: int = 5, seed: int = 0):
    """Tied embeddings/head (one Parameter), position embeddings, final ln_f."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=64, n_positions=64))


def dataset(n: int = 64, seq: int = 12):
    ids = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in ids]


def layer_list(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def lisa_model(model, mode, **settings):
    """(model to train, LisaCallback): the bare callback configured by ``settings`` on the plain ``model``, or
    ``get_peft_model(model, LisaConfig(**settings))`` and the argument-free callback that drives it."""
    if mode == "bare":
        return model, LisaCallback(**settings)
    from peft import get_peft_model

    return get_peft_model(model, LisaConfig(**settings)), LisaCallback()


def plain(model):
    """The transformers model inside a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Recorder:
    """Snapshots the weights at every interval start (after LISA switched layers) and the optimizer state size."""

    def __new__(cls, interval):
        from transformers import TrainerCallback

        class _Rec(TrainerCallback):
            def __init__(self):
                self.snaps, self.state_keys, self.numel = [], [], []

            def on_step_begin(self, args, state, control, model=None, **kw):
                if state.global_step % interval == 0:
                    self.snaps.append(snapshot(model))

            def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
                self.state_keys.append(set(optimizer.optimizer.state))
                self.numel.append(optimizer_state_numel(optimizer))

            def on_train_end(self, args, state, control, model=None, **kw):
                self.snaps.append(snapshot(model))

        return _Rec()


def snapshot(model):
    return {n: p.detach().clone() for n, p in plain(model).named_parameters()}


def changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


def train(model, out_dir, callbacks, steps, resume_from_checkpoint=None, **kwargs):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(out_dir), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_strategy="no", disable_tqdm=True, seed=0,
                             **{"save_strategy": "no", **kwargs})
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


@pytest.mark.parametrize("mode", ["bare", "peft"])
@pytest.mark.parametrize("build,accumulation", [(llama, 1), (gpt2, 2)], ids=["llama", "gpt2-accumulate2"])
def test_only_embeddings_head_and_sampled_layers_change(build, accumulation, mode, tmp_path):
    """Per interval, the changed decoder layers are exactly the sampled ones — including layers first picked in a
    later interval (the classic bug: freezing before the Trainer builds its optimizer leaves them untrained). The PEFT
    model is frozen to E + H + γ layers when made; its callback reopens the rest while the Trainer builds the optimizer."""
    K, steps = 2, 8
    trained, lisa = lisa_model(build(), mode, num_active_layers=2, interval_steps=K, seed=3)
    model, rec = plain(trained), Recorder(K)
    train(trained, tmp_path, [lisa, rec], steps, gradient_accumulation_steps=accumulation)

    assert [s for s, _ in lisa.history] == [0, 2, 4, 6]  # once per optimizer step, whatever the accumulation
    prefix = "model.layers." if build is llama else "transformer.h."
    first_seen = set(lisa.history[0][1])
    assert any(set(layers) - first_seen for _, layers in lisa.history[1:]), "seed gives no new layer later; change it"
    for (step, layers), before, after in zip(lisa.history, rec.snaps, rec.snaps[1:]):
        diff = changed(before, after)
        moved_layers = {int(n[len(prefix):].split(".")[0]) for n in diff if n.startswith(prefix)}
        assert moved_layers == set(layers), f"interval at step {step}"
        outside = {n for n in before if not n.startswith(prefix)}
        assert outside <= diff, f"embeddings/head/final norm must train in every interval: {outside - diff}"
    # state held only for E/H/norm + the active layers
    layers = layer_list(model)
    outside = set(model.parameters()) - set(layers.parameters())
    assert len(rec.state_keys) == steps
    for step, keys in enumerate(rec.state_keys):
        active = {p for i in lisa.schedule.layers_for_step(step) for p in layers[i].parameters()}
        assert keys == active | outside, f"optimizer state after step {step}"
    if mode == "bare":
        assert all(p.requires_grad for p in model.parameters()), "on_train_end restores requires_grad"
    else:  # the PEFT model keeps its last interval's layers trainable, and knows every layer that trained
        last = {p for i in lisa.history[-1][1] for p in layers[i].parameters()}
        assert {p for p in model.parameters() if p.requires_grad} == last | outside
        assert trained.trained_layers == sorted({i for _, ls in lisa.history for i in ls})


def test_switches_and_gradient_checkpointing(tmp_path):
    """Frozen embeddings/head/norm stay put and, with activation checkpointing, the sampled layers still train."""
    model, K = llama(), 3
    lisa = LisaCallback(num_active_layers=1, interval_steps=K, seed=0, train_embeddings=False, train_head=False,
                        train_final_norm=False)
    rec = Recorder(K)
    train(model, tmp_path, [lisa, rec], 6, activation_checkpointing=True)
    assert model.is_activation_checkpointing
    for (_, layers), before, after in zip(lisa.history, rec.snaps, rec.snaps[1:]):
        diff = changed(before, after)
        assert diff and all(n.startswith(f"model.layers.{layers[0]}.") for n in diff), diff


def test_tied_head_follows_either_switch():
    model = gpt2()
    with pytest.warns(UserWarning, match="tied"):
        sched = LisaSchedule(model, num_active_layers=1, train_embeddings=False, train_head=True)
    assert model.lm_head.weight in sched.groups.always
    assert model.transformer.wpe.weight in sched.groups.frozen  # position embeddings follow train_embeddings


def test_schedule_is_deterministic_and_covers_every_layer():
    sched = LisaSchedule(llama(layers=12), num_active_layers=3, interval_steps=5, seed=7)
    picks = [sched.layers_for_interval(i) for i in range(200)]
    assert all(len(set(p)) == 3 and all(0 <= i < 12 for i in p) for p in picks)
    counts = torch.bincount(torch.tensor(picks).flatten(), minlength=12)
    assert counts.min() > 20 and counts.max() < 85, counts  # uniform: 50 expected per layer
    again = LisaSchedule(llama(layers=12, seed=5), num_active_layers=3, interval_steps=5, seed=7)
    assert [again.layers_for_step(5 * i + 4) for i in range(200)] == picks
    other = LisaSchedule(llama(layers=12), num_active_layers=3, interval_steps=5, seed=8)
    assert [other.layers_for_interval(i) for i in range(200)] != picks


@pytest.mark.parametrize("mode", ["bare", "peft"])
@pytest.mark.parametrize("release", [True, False])
def test_optimizer_state_bounded_with_release(release, mode):
    """Plain-loop API (``schedule.apply(step, opt)`` before a step; ``peft_model.step(opt)`` after one): with release
    the state covers E/H/norm + γ layers at every step; without it, it grows to every layer visited so far (the
    memory leak of callbacks that only toggle requires_grad)."""
    settings = dict(num_active_layers=1, interval_steps=2, seed=0, release_state=release)
    model = llama(layers=8)
    if mode == "peft":
        from peft import get_peft_model

        trained = get_peft_model(model, LisaConfig(**settings))
        sched = trained.base_model.schedule
    else:
        trained, sched = model, LisaSchedule(model, **settings)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    layers = layer_list(model)
    outside = set(model.parameters()) - set(layers.parameters())
    per_layer = 2 * sum(p.numel() for p in layers[0].parameters()) + len(list(layers[0].parameters()))
    base = 2 * sum(p.numel() for p in outside) + len(outside)
    batch = torch.randint(0, 64, (2, 10))
    visited, sizes = set(), []
    for step in range(24):
        if mode == "bare":
            sched.apply(step, opt)
        active = set(sched.active_layers)
        visited |= active
        trained(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sizes.append(optimizer_state_numel(opt))
        held = {i for i in range(len(layers)) if any(p in opt.state for p in layers[i].parameters())}
        assert held == (active if release else visited)
        if mode == "peft":
            trained.step(opt)
    assert len(visited) >= 5
    if release:
        assert max(sizes) == base + per_layer
    else:
        assert sizes[-1] == base + len(visited) * per_layer > base + per_layer


def test_release_gives_fresh_state_each_interval():
    """A layer sampled in two consecutive intervals restarts its Adam step count (paper: fresh state per interval)."""
    model = llama(layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = LisaSchedule(model, num_active_layers=2, interval_steps=3, seed=0)  # γ = N: same layers every interval
    batch = torch.randint(0, 64, (2, 10))
    p = model.model.layers[0].mlp.up_proj.weight
    steps = []
    for step in range(6):
        sched.apply(step, opt)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(int(opt.state[p]["step"]))
    assert steps == [1, 2, 3, 1, 2, 3]
    assert int(opt.state[model.lm_head.weight]["step"]) == 6  # E/H keep theirs


@pytest.mark.parametrize("mode", ["bare", "peft"])
def test_resume_from_checkpoint_continues_the_schedule(tmp_path, mode):
    """Resuming mid-interval (step 3) and at a boundary (step 6) gives the uninterrupted run's layers and weights.
    A PEFT run's checkpoints hold the LISA adapter (changed tensors only), which the Trainer loads into a fresh
    PEFT model of the same base."""
    K, steps = 2, 8
    settings = dict(num_active_layers=2, interval_steps=K, seed=11)
    ref, full = lisa_model(llama(), mode, **settings)
    train(ref, tmp_path / "run", [full], steps, save_strategy="steps", save_steps=3)
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["LisaCallback"]
    assert saved["attributes"]["active_layers"] == full.history[1][1] and saved["args"]["interval_steps"] == K
    if mode == "peft":
        assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    for ckpt in (3, 6):
        model, lisa = lisa_model(llama(), mode, **settings)
        train(model, tmp_path / f"resume{ckpt}", [lisa], steps,
              resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{ckpt}"))
        assert lisa.history == [(ckpt, dict(full.history)[ckpt // K * K])] + [h for h in full.history if h[0] > ckpt]
        for (n, a), b in zip(plain(model).named_parameters(), plain(ref).parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{n} after resuming from step {ckpt}")


def test_optimizer_missing_parameters_is_an_error():
    model = llama()
    sched = LisaSchedule(model)
    with pytest.raises(ValueError, match="not in the optimizer"):
        sched.apply(0, torch.optim.AdamW(model.lm_head.parameters()))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"num_active_layers": 0}, ValueError, "num_active_layers"),
    ({"interval_steps": 0}, ValueError, "interval_steps"),
    ({"num_active_layers": 2.0}, TypeError, "int"),
    ({"seed": -1}, ValueError, "seed"),
    ({"layers": 3}, TypeError, "dotted"),
])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LisaCallback(**kwargs)


def test_bad_model_or_layer_path():
    with pytest.raises(ValueError, match="exceeds the 6 decoder layers"):
        LisaSchedule(llama(), num_active_layers=7)
    with pytest.raises(ValueError, match="no such submodule"):
        LisaSchedule(llama(), layers="model.blocks")
    with pytest.raises(ValueError, match="ModuleList"):
        LisaSchedule(llama(), layers="model.norm")
    with pytest.raises(ValueError, match="decoder blocks"):
        LisaSchedule(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="either"):
        LisaSchedule(llama(), LisaConfig(), num_active_layers=1)
    assert LisaSchedule(llama(), layers="model.layers").num_layers == 6


@pytest.mark.parametrize("args,match", [
    ({"deepspeed": "ds_zero3.json"}, "DeepSpeed"),
    ({"fsdp": ["full_shard"]}, "FSDP"),
    ({"world_size": 2, "ddp_find_unused_parameters": False}, "ddp_find_unused_parameters=True"),
    ({"world_size": 2, "gradient_checkpointing": True}, "ddp_find_unused_parameters=True"),
])
def test_sharded_and_misconfigured_ddp_are_refused(args, match):
    base = {"deepspeed": None, "fsdp": [], "world_size": 1, "ddp_find_unused_parameters": None, "seed": 0}
    cb = LisaCallback()
    with pytest.raises(ValueError, match=match):
        cb.on_train_begin(types.SimpleNamespace(**{**base, **args}), None, None, model=llama(), optimizer=None)

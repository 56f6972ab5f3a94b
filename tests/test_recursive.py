"""Relaxed Recursive Transformers: conversion, the registered architecture, relaxed LoRA (PEFT), early exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import fresh_process_logits, subprocess_env, tiny_gpt2

from hf_compress.methods.recursive import confidence_exit_loops, convert, early_exit_generate, init_sources, loop_logits, oracle_exit_loops, position_groups, relax, save_relaxed, simulate_throughput, to_llama

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 23, 77, 8, 120, 1, 56]])


def tiny_llama4(seed: int = 0):
    """4-layer Llama with non-trivial norm gains (so tied and per-position norms actually differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_schemes_and_inits_map_positions_to_blocks():
    assert position_groups(6, 2, "cycle") == [[0, 3], [1, 4], [2, 5]]
    assert position_groups(6, 2, "sequence") == [[0, 1], [2, 3], [4, 5]]
    assert init_sources(30, 2, "cycle", "stepwise")[0] == [0] and init_sources(30, 2, "cycle", "stepwise")[-1] == [29]
    assert init_sources(6, 2, "cycle", "average") == [[0, 3], [1, 4], [2, 5]]
    assert init_sources(6, 3, "sequence", "lower") == [[0], [1]]


def test_bad_input_is_refused():
    model = tiny_llama4()
    with pytest.raises(ValueError, match="does not divide"):
        convert(model, num_loops=3)
    with pytest.raises(ValueError, match="scheme"):
        convert(model, scheme="zigzag")
    with pytest.raises(ValueError, match="init"):
        convert(model, init="random")
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        convert(tiny_gpt2())
    recursive = convert(model)
    with pytest.raises(TypeError, match="already recursive"):
        convert(recursive)
    with pytest.raises(ValueError, match="rank"):
        relax(recursive, model, ranks=1000)
    with pytest.raises(ValueError, match="every rank is 0"):
        relax(recursive, model, ranks=0)
    with pytest.raises(ValueError, match="original"):
        relax(recursive, None, ranks=4)
    with pytest.raises(ValueError, match="scheme='cycle'"):
        convert(model, scheme="sequence").loop_boundaries()


@pytest.mark.parametrize("scheme", ["cycle", "sequence"])
@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_conversion_shares_blocks_as_initialised(scheme, init):
    model = tiny_llama4()
    recursive = convert(model, num_loops=2, scheme=scheme, init=init)
    layers = recursive.model.layers
    for block, (sources, positions) in enumerate(zip(init_sources(4, 2, scheme, init), position_groups(4, 2, scheme))):
        expected = torch.stack([model.model.layers[i].mlp.up_proj.weight for i in sources]).mean(0)
        for p in positions:
            assert layers[p].mlp.up_proj.weight is layers[positions[0]].mlp.up_proj.weight
            assert layers[p].input_layernorm.weight is layers[positions[0]].input_layernorm.weight
        torch.testing.assert_close(layers[positions[0]].mlp.up_proj.weight, expected)
    with torch.no_grad():  # the copy owns its storage: training it must not move the original
        for p in recursive.parameters():
            p.add_(1.0)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), recursive.parameters()))
    torch.testing.assert_close(model.model.embed_tokens.weight, tiny_llama4().model.embed_tokens.weight)
    dense = sum(p.numel() for p in model.model.layers.parameters())
    assert sum(p.numel() for p in recursive.model.layers.parameters()) == dense // 2


def test_checkpoint_stores_unique_blocks_and_reloads_in_a_fresh_process(tmp_path):
    from safetensors import safe_open

    recursive = convert(tiny_llama4(), num_loops=2, init="average").eval()
    recursive.save_pretrained(tmp_path / "rec")
    with safe_open(tmp_path / "rec" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in keys)
    assert any(k.startswith("model.layers.1.") for k in keys)
    with torch.no_grad():
        expected = recursive(IDS).logits
    torch.testing.assert_close(fresh_process_logits(tmp_path / "rec", IDS, tmp_path), expected, rtol=0, atol=0)


def test_generate_with_kv_cache_matches_recomputation():
    recursive = convert(tiny_llama4(), num_loops=2, init="stepwise", tie_norms=False).eval()
    generated = recursive.generate(IDS, max_new_tokens=6, do_sample=False)
    ids = IDS
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, recursive(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_full_rank_svd_lora_reproduces_the_original_only_with_per_position_norms():
    model = tiny_llama4()
    with torch.no_grad():
        reference = model(IDS).logits
        for init in ("stepwise", "average", "lower"):
            relaxed = relax(convert(model, init=init, tie_norms=False), model, ranks="full", progress=False)
            torch.testing.assert_close(relaxed(IDS).logits, reference, rtol=0, atol=1e-4)
        tied = relax(convert(model, init="average", tie_norms=True), model, ranks="full", progress=False)
        assert (tied(IDS).logits - reference).abs().max() > 1e-2


def test_svd_init_beats_zero_init_and_low_rank_lies_between():
    model = tiny_llama4()
    with torch.no_grad():
        reference = model(IDS).logits.log_softmax(-1)

        def kl(m):
            return torch.nn.functional.kl_div(m(IDS).logits.log_softmax(-1), reference, log_target=True,
                                              reduction="batchmean").item()

        pure = convert(model, init="average", tie_norms=False)
        pure_kl = kl(pure)
        zero = relax(convert(model, init="average", tie_norms=False), model, ranks=8, init="zero", progress=False)
        torch.testing.assert_close(zero(IDS).logits, pure(IDS).logits)
        svd8 = relax(convert(model, init="average", tie_norms=False), model, ranks=8, progress=False)
        assert kl(svd8) < pure_kl


def test_relaxed_adapter_round_trips_through_peft_and_transformers(tmp_path):
    model = tiny_llama4()
    relaxed = relax(convert(model, init="average", tie_norms=False), model, ranks={"q_proj": 4, "up_proj": 8},
                    progress=False)
    assert all(p.requires_grad for p in relaxed.parameters())  # the paper trains shared weights too
    optimizer = torch.optim.AdamW(relaxed.parameters(), lr=1e-2)
    relaxed.train()
    relaxed(IDS, labels=IDS).loss.backward()
    optimizer.step()
    relaxed.eval()
    with torch.no_grad():
        expected = relaxed(IDS).logits
    save_relaxed(relaxed, tmp_path / "relaxed")
    with pytest.raises(TypeError, match="cannot be merged"):
        relaxed.merge_and_unload()
    torch.testing.assert_close(to_llama(relaxed)(IDS).logits, expected, rtol=0, atol=1e-5)
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM, PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.tensor(eval(sys.argv[2])); d = sys.argv[1]\n"
        "a = AutoPeftModelForCausalLM.from_pretrained(d + '/relaxed_lora')(ids).logits\n"
        "b = AutoModelForCausalLM.from_pretrained(d); b.load_adapter(d + '/relaxed_lora')\n"
        "c = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), d + '/relaxed_lora')(ids).logits\n"
        "from safetensors.torch import save_file\n"
        "save_file({'logits': torch.stack([a, b(ids).logits, c]).detach()}, d + '/out.safetensors')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "relaxed"), str(IDS.tolist())],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    for logits in load_file(str(tmp_path / "relaxed" / "out.safetensors"))["logits"]:
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_trainer_uptrains_with_early_exit_loss_and_keeps_weights_shared(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    recursive = convert(tiny_llama4(), init="stepwise")
    recursive.config.early_exit_loss_weight = 0.1
    before = recursive.model.layers[0].mlp.up_proj.weight.detach().clone()
    data = Dataset.from_dict({"input_ids": [IDS[0].tolist()] * 8, "labels": [IDS[0].tolist()] * 8})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    result = Trainer(model=recursive, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    layers = recursive.model.layers
    assert not torch.equal(layers[0].mlp.up_proj.weight, before)
    assert layers[2].mlp.up_proj.weight is layers[0].mlp.up_proj.weight
    recursive.train()
    with_exit = recursive(IDS, labels=IDS).loss
    recursive.config.early_exit_loss_weight = 0.0
    assert with_exit > recursive(IDS, labels=IDS).loss


def test_distillation_uptrainer_pulls_the_recursive_model_towards_the_teacher(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_compress.methods.recursive import RecursiveUptrainer, forward_kl

    teacher = tiny_llama4()
    data = Dataset.from_dict({"input_ids": [IDS[0].tolist()] * 8, "labels": [IDS[0].tolist()] * 8})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no")
    with torch.no_grad():
        target = teacher(IDS).logits
    gaps = []
    for weight in (0.0, 10.0):
        student = convert(teacher, init="lower")
        RecursiveUptrainer(model=student, args=args, train_dataset=data, teacher=teacher,
                           distill_weight=weight).train()
        with torch.no_grad():
            gaps.append(float(forward_kl(student.eval()(IDS).logits, target)))
    assert gaps[1] < gaps[0]
    assert not any(p.requires_grad for p in teacher.parameters())


def test_early_exit_generation_and_exit_loops():
    recursive = convert(tiny_llama4(), init="stepwise").eval()
    logits, out = loop_logits(recursive, IDS)
    assert len(logits) == 2 and torch.equal(logits[-1], out.logits)
    exits = oracle_exit_loops(logits)
    assert torch.equal(exits == 1, logits[0].argmax(-1) == logits[1].argmax(-1))
    never, _ = early_exit_generate(recursive, IDS, max_new_tokens=5, threshold=1.0)
    assert torch.equal(never, recursive.generate(IDS, max_new_tokens=5, do_sample=False))
    always, loops = early_exit_generate(recursive, IDS, max_new_tokens=3, threshold=1e-9)
    assert loops == [1, 1, 1]
    with torch.no_grad():
        first, _ = loop_logits(recursive, always[:, :-1])
    assert torch.equal(always[0, IDS.shape[1]:], first[0][0, IDS.shape[1] - 1:].argmax(-1))
    with pytest.raises(ValueError, match="threshold"):
        confidence_exit_loops(logits, 0.0)


def test_depthwise_batching_simulation():
    no_exit = simulate_throughput([[2] * 10] * 4, num_loops=2, batch_size=2)
    assert no_exit["depthwise"] == no_exit["vanilla"] == no_exit["vanilla_early_exit"]
    all_exit = simulate_throughput([[1] * 10] * 4, num_loops=2, batch_size=2)
    assert all_exit["depthwise"] == pytest.approx(2 * all_exit["vanilla"])
    mixed = simulate_throughput([[1, 1, 2] * 4, [1, 2, 1] * 4], num_loops=2, batch_size=2)
    assert (mixed["vanilla"], mixed["vanilla_early_exit"], mixed["depthwise"]) == pytest.approx((1.0, 1.2, 1.5))
    with pytest.raises(ValueError, match="exit loops"):
        simulate_throughput([[3]], num_loops=2, batch_size=1)


@pytest.mark.slow
def test_smollm2_recursive_checkpoint_is_half_the_decoder_and_round_trips(smollm2_dir, tmp_path):
    """A 6-block slice of SmolLM2 keeps the test small; the full 30 → 15×2 conversion is in the benchmark."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    model.config.layer_types = model.config.layer_types[:6] if getattr(model.config, "layer_types", None) else None
    recursive = convert(model, num_loops=2, init="stepwise").eval()
    recursive.save_pretrained(tmp_path / "rec")
    decoder = sum(p.numel() for p in model.model.layers.parameters()) * 4
    size = (tmp_path / "rec" / "model.safetensors").stat().st_size - model.model.embed_tokens.weight.numel() * 4
    assert abs(size - decoder / 2) / (decoder / 2) < 0.01
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2914, 16, 1167]])
    with torch.no_grad():
        expected = recursive(ids).logits
    torch.testing.assert_close(fresh_process_logits(tmp_path / "rec", ids, tmp_path), expected, rtol=0, atol=0)

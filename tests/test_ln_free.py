"""LayerNorm-free models: FakeLN maths, σ estimation, the removal schedule through a real Trainer run, both
exports (logits and fresh-process loads), exact direct logit attribution, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_process_logits, tiny_gpt2, tiny_llama
from transformers import TrainerCallback

from hf_compress.methods.ln_free import FakeLayerNorm, FakeRMSNorm, LNFreeTrainer, LNRemovalCallback, LNRemovalSchedule, direct_logit_attribution, estimate_std, export_compatible, export_structural, fake_status, make_removable, to_compatible, to_structural
from hf_compress.methods.ln_free.export import load_compatible
from hf_compress.methods.ln_free.swap import remove

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
# 2 layers: ln_2 at 2, 3; ln_1qk at 5, 6; ln_1v at 8, 9 (gap 1 -> next group one step later); ln_f at 11
SCHEDULE = LNRemovalSchedule(start=2, gap_ln2=1, gap_ln1qk=1, gap_ln1v=1, gap_ln_f=2, start_ln1qk=5, start_ln1v=8)
STEPS = 13


def test_fake_layernorm_math():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    fake = FakeLayerNorm.from_norm(ln)
    x = torch.randn(3, 5, 16) * 4 + 1
    torch.testing.assert_close(fake(x), ln(x))  # still real: identical to LayerNorm
    fake.train()
    fake(x)  # first batch initialises the σ estimate
    assert float(fake.std_ema) == pytest.approx(float(x.std(-1, unbiased=False).mean()), rel=1e-4)
    fake.freeze()
    sigma = float(fake.avg_std)
    y = (x - x.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias
    torch.testing.assert_close(fake(x), y)
    assert not torch.allclose(fake(x), ln(x), atol=1e-3)  # really no longer per-token


def test_fake_rmsnorm_math():
    model = tiny_llama()
    norm = model.model.norm
    x = torch.randn(2, 4, 64) * 3
    fake = FakeRMSNorm.from_norm(norm)
    torch.testing.assert_close(fake(x), norm(x))
    fake.std_ema.fill_(2.5)
    fake.std_seen.fill_(True)
    fake.freeze()
    torch.testing.assert_close(fake(x), x / 2.5 * norm.weight)


def test_estimate_std_is_mean_token_std():
    model = make_removable(tiny_gpt2())
    seen = []
    # σ is what LayerNorm divides by: sqrt(var + eps)
    handle = model.transformer.ln_f.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].var(-1, unbiased=False) + m.eps).sqrt().mean()))
    sigmas = estimate_std(model, [IDS[:1], IDS[1:]])
    handle.remove()
    assert set(sigmas) == set(fake_status(model))
    assert sigmas["ln_f"] == pytest.approx(float(sum(seen) / 2), rel=1e-4)
    assert float(model.transformer.ln_f.std_ema) == pytest.approx(sigmas["ln_f"], rel=1e-5)
    assert sigmas["ln_1qk.0"] == sigmas["ln_1v.0"]  # one input, two paths


def test_schedule_events_and_errors():
    events = SCHEDULE.events(2)
    assert events == [(2, "ln_2.0"), (3, "ln_2.1"), (5, "ln_1qk.0"), (6, "ln_1qk.1"), (8, "ln_1v.0"),
                      (9, "ln_1v.1"), (11, "ln_f")]
    default = LNRemovalSchedule().events(4)  # the CPU experiment: ln_2 every 10 from 50, then every 15
    assert default[:5] == [(50, "ln_2.0"), (60, "ln_2.1"), (70, "ln_2.2"), (80, "ln_2.3"), (95, "ln_1qk.0")]
    assert default[-1] == (215, "ln_f")  # qk 95..140, v 155..200
    at_once = LNRemovalSchedule(start=1, gap_ln2=0, gap_ln1qk=0, gap_ln1v=0, gap_ln_f=1).events(3)
    assert [s for s, _ in at_once] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert SCHEDULE.fake_at(5, 2) == {"ln_2.0", "ln_2.1", "ln_1qk.0"}
    with pytest.raises(ValueError, match="gap_ln2"):
        LNRemovalSchedule(gap_ln2=-1)
    with pytest.raises(ValueError, match="start"):
        LNRemovalSchedule(start=1.5)
    with pytest.raises(ValueError, match="ln_1v starts"):
        LNRemovalSchedule(start=0, gap_ln2=5, start_ln1v=3).events(2)
    with pytest.raises(ValueError, match="num_layers"):
        SCHEDULE.events(0)
    grouped = LNRemovalSchedule(start=2, gap_ln2=1, gap_ln1qk=1, gap_ln1v=1, gap_ln_f=2, layers_per_step=2,
                                gap_pos0=1).events(3)
    assert [s for s, _ in grouped] == [2, 2, 3, 4, 4, 5, 6, 6, 7, 9, 10]
    assert grouped[-2:] == [(9, "ln_f"), (10, "pos0")]
    with pytest.raises(ValueError, match="layers_per_step"):
        LNRemovalSchedule(layers_per_step=0)


def _dataset(n=64, seq=24):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in data]


class _Probe(TrainerCallback):
    """Records which norms are fake when each optimizer step begins (added after the removal callback)."""

    def __init__(self):
        self.seen = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = {n for n, f in fake_status(model).items() if f}


def _train(model, tmp_path, schedule=SCHEDULE, steps=STEPS, aux=0.1, callbacks=()):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    removal = LNRemovalCallback(schedule)
    trainer = LNFreeTrainer(model=model, args=args, train_dataset=_dataset(), aux_loss_weight=aux,
                            callbacks=[removal, *callbacks])
    trainer.train()
    return removal


@pytest.fixture(scope="module")
def removed_gpt2(tmp_path_factory):
    """A tiny GPT-2 fine-tuned through the whole schedule (aux loss on), with its probe records."""
    model = tiny_gpt2()
    probe = _Probe()
    removal = _train(model, tmp_path_factory.mktemp("gpt2"), callbacks=[probe])
    return model.eval(), probe, removal


def test_callback_removes_on_schedule(removed_gpt2):
    model, probe, removal = removed_gpt2
    assert sorted(probe.seen) == list(range(STEPS))
    for step in range(STEPS):
        assert probe.seen[step] == SCHEDULE.fake_at(step, 2), step
    assert probe.seen[1] == set() and probe.seen[2] == {"ln_2.0"}
    assert [name for _, name in removal.removed] == [name for _, name in SCHEDULE.events(2)]
    assert all(fake_status(model).values())
    ln1 = model.transformer.h[0].ln_1
    # each path froze its own σ estimate (the EMA moved between the QK and V removals)
    assert float(ln1.avg_std) != float(ln1.avg_std_v)
    assert all(float(n.avg_std) > 0 for n in (ln1, model.transformer.ln_f))


def test_callback_rejects_schedule_longer_than_training(tmp_path):
    with pytest.raises(ValueError, match="stops at"):
        _train(tiny_gpt2(), tmp_path, steps=8)
    with pytest.raises(TypeError, match="LNRemovalSchedule"):
        LNRemovalCallback({"start": 1})
    with pytest.raises(ValueError, match="aux_loss_weight"):
        LNFreeTrainer(model=tiny_gpt2(), aux_loss_weight=-1)


def test_gpt2_exports_reproduce_logits_in_fresh_process(removed_gpt2, tmp_path):
    model, _, _ = removed_gpt2
    with torch.no_grad():
        ref = model(IDS).logits
    for name, export in (("structural", export_structural), ("compatible", export_compatible)):
        path = export(model, tmp_path / name)
        assert (path / "model.safetensors").is_file()
        fresh = fresh_process_logits(path, IDS, tmp_path)
        assert (fresh - ref).abs().max() < 1e-4, name
    import json

    assert json.loads((tmp_path / "structural" / "config.json").read_text())["model_type"] == "hfc_ln_free_gpt2"
    compat = json.loads((tmp_path / "compatible" / "config.json").read_text())
    assert compat["model_type"] == "gpt2" and compat["layer_norm_epsilon"] == 1e12


def test_llama_structural_export_fresh_process(tmp_path):
    model = make_removable(tiny_llama())
    estimate_std(model, [IDS])
    for name in fake_status(model):
        remove(model, name)
    layer = model.model.layers[0].input_layernorm
    layer.avg_std_v.mul_(1.7)  # QK and V paths frozen at different σ: the export folds the ratio into v_proj
    with torch.no_grad():
        ref = model(IDS).logits
        assert (to_structural(model)(IDS).logits - ref).abs().max() < 1e-4
    path = export_structural(model, tmp_path / "llama")
    fresh = fresh_process_logits(path, IDS, tmp_path)
    assert (fresh - ref).abs().max() < 1e-4


def test_direct_logit_attribution_is_exact(removed_gpt2):
    model, _, _ = removed_gpt2
    structural = to_structural(model)
    contributions, logits = direct_logit_attribution(structural, IDS)
    assert list(contributions) == ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1", "bias"]
    total = sum(contributions.values())
    assert (total - logits).abs().max() < 1e-4
    # not trivially exact: dropping one component changes the logits a lot
    assert (total - contributions["mlp.1"] - logits).abs().max() > 1e-2


def test_bad_input():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="GPT-2 and Llama"):
        make_removable(bert)
    half = make_removable(tiny_gpt2())
    with pytest.raises(ValueError, match="no data"):
        remove(half, "ln_f")
    estimate_std(half, [IDS])
    with pytest.raises(ValueError, match="no norm named"):
        remove(half, "ln_3.0")
    remove(half, "ln_2.0")
    with pytest.raises(ValueError, match="not removed yet"):
        to_structural(half)
    for name in fake_status(half):
        if not fake_status(half)[name]:
            remove(half, name)
    with pytest.raises(ValueError, match="float16"):
        to_compatible(half, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        load_compatible("unused", dtype=torch.float16)
    llama = make_removable(tiny_llama())
    with pytest.raises(TypeError, match="GPT-2 only"):
        to_compatible(llama)
    with pytest.raises(TypeError, match="structurally LN-free"):
        direct_logit_attribution(tiny_gpt2(), IDS)


def test_compatible_export_in_bf16_matches_roughly(removed_gpt2):
    model, _, _ = removed_gpt2
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16 = to_compatible(model, dtype=torch.bfloat16)
        assert torch.isfinite(bf16(IDS).logits).all()
        ref = F.log_softmax(model(IDS).logits, -1)
        got = F.log_softmax(bf16(IDS).logits.float(), -1)
    assert (got - ref).abs().mean() < 0.1


def test_small_gpt2_script(tmp_path):
    from hf_compress.methods.ln_free.small_gpt2 import SmallGPT2Spec, data_path, small_gpt2

    try:
        data_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = SmallGPT2Spec(n_layer=1, n_head=2, n_embd=16, block=16, batch=2, steps=3, warmup=1)
    path = small_gpt2(spec, root=tmp_path)
    assert path.name.startswith("small-gpt2-shakespeare-")
    tok = AutoTokenizer.from_pretrained(path)
    text = "First Citizen:\nBefore we proceed"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tok) == 65
    assert small_gpt2(spec, root=tmp_path) == path  # cached: not retrained


def _final_norm(model):
    return model.model.norm if hasattr(model, "model") else model.transformer.ln_f


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_position0_sigma_keeps_structural_export_exact(family, tmp_path):
    from hf_compress.methods.ln_free.swap import position0_active, removable_norms

    model = make_removable((tiny_llama if family == "llama" else tiny_gpt2)(), position0=True)
    seen = []
    norm = _final_norm(model)
    handle = norm.register_forward_pre_hook(lambda m, a: seen.append(m.token_std(a[0])[..., 0]))
    estimate_std(model, [IDS])
    handle.remove()
    # position 0 and positions 1: are estimated apart
    assert float(norm.std_ema_first) == pytest.approx(float(seen[0][:, 0].mean()), rel=1e-4)
    assert float(norm.std_ema) == pytest.approx(float(seen[0][:, 1:].mean()), rel=1e-4)
    names = list(fake_status(model))
    for name in names:
        if not name.startswith(("ln_1v", "ln_f")):
            remove(model, name)
    for n, _ in removable_norms(model).values():  # σ drifts between the QK and V removals; position 0 is an outlier
        n.std_ema.mul_(1.3)
        n.std_ema_first.mul_(4.0)
    for name in names:
        if name.startswith(("ln_1v", "ln_f")):
            remove(model, name)
    first = model.model.layers[0].input_layernorm if family == "llama" else model.transformer.h[0].ln_1
    assert float(first.avg_std_first / first.avg_std_v_first) == pytest.approx(float(first.avg_std / first.avg_std_v))
    assert float(first.avg_std_first) != pytest.approx(float(first.avg_std))
    with torch.no_grad():
        ref = model(IDS).logits
        structural = to_structural(model)
        assert structural.config.position0_scale
        assert (structural(IDS).logits - ref).abs().max() < 1e-4
        # position 0 comes from the positions, not the row index: decoding with a KV cache matches the full forward
        for m in (model, structural):
            out = m(IDS[:, :10], use_cache=True)
            step = m(IDS[:, 10:11], cache=out.past_key_values, use_cache=True).logits
            assert (step[:, 0] - ref[:, 10]).abs().max() < 1e-4
    fresh = fresh_process_logits(export_structural(model, tmp_path / family), IDS, tmp_path)
    assert (fresh - ref).abs().max() < 1e-4
    if family == "gpt2":
        contributions, logits = direct_logit_attribution(structural, IDS)
        assert (sum(contributions.values()) - logits).abs().max() < 1e-4
        with pytest.raises(ValueError, match="position 0"):
            to_compatible(model)
    # collapsing the position-0 σ (the papers' last step) changes position 0 only, and exports stay exact
    remove(model, "pos0")
    assert not position0_active(model)
    with torch.no_grad():
        after = model(IDS).logits
        assert (after[:, 0] - ref[:, 0]).abs().max() > 1e-3
        assert not to_structural(model).config.position0_scale
        assert (to_structural(model)(IDS).logits - after).abs().max() < 1e-4
        if family == "gpt2":
            assert (to_compatible(model)(IDS).logits - after).abs().max() < 1e-4

"""Teacher Intervention QAT (issue 23): straight-through gradients, fake-quant forward == packed export (also in a
fresh process), starting from a packed checkpoint, the intervention points doing what they say, the callback's
phase switches and restore, and save/resume mid-schedule continuing identically (tiny random Llamas)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fresh_process_logits, save_char_tokenizer, tiny_llama
from torch import nn

from hf_compress.formats.grid import QuantSpec, dequantize_weight
from hf_compress.formats.linear import PackedLinear
from hf_compress.methods.ti_qat.callback import TeacherInterventionCallback
from hf_compress.methods.ti_qat.config import TIQATConfig
from hf_compress.methods.ti_qat.convert import export_packed, fake_quant_modules, prepare_qat
from hf_compress.methods.ti_qat.fake_quant import FakeQuantLinear
from hf_compress.methods.ti_qat.intervention import TeacherIntervention, TIConfig, TISchedule
from hf_compress.methods.ti_qat.losses import DistillationLoss

IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _student(teacher, **kw):
    student = copy.deepcopy(teacher)
    return prepare_qat(student, TIQATConfig(**{"bits": 2, "group_size": 16, **kw}))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# -- the fake-quant module ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_scales", [False, True])
def test_ste_gradients_flow_inside_the_range_and_stop_outside(learn_scales):
    torch.manual_seed(0)
    layer = nn.Linear(24, 6)
    fq = FakeQuantLinear.from_linear(layer, QuantSpec(2, 8, sym=True), learn_scales=learn_scales)
    with torch.no_grad():
        fq.weight[0, 0] = 50.0  # far outside its group's range: clipped, so no gradient
    x = torch.randn(5, 24)
    fq(x).pow(2).sum().backward()
    g = fq.weight.grad
    assert g is not None and g[0, 0] == 0 and (g[1:] != 0).float().mean() > 0.9
    assert fq.bias.grad is not None and fq.bias.grad.abs().sum() > 0
    assert (fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0) == learn_scales
    # the forward value is exactly the grid's dequantization of the codes
    w = dequantize_weight(fq.codes(), fq.stored_scale(), fq.zero, fq.spec)
    assert torch.equal(fq.quantized_weight().detach(), w)


def test_ternary_weights_take_three_values_and_store_as_2bit_codes():
    torch.manual_seed(0)
    fq = FakeQuantLinear.from_linear(nn.Linear(32, 4), QuantSpec(2, 16, sym=True), ternary=True)
    codes = fq.codes()
    assert set(codes.unique().tolist()) <= {1, 2, 3} and len(codes.unique()) == 3
    w = fq.quantized_weight().detach()
    for row, s in zip(w.view(4, 2, 16), fq.stored_scale()):
        for group, scale in zip(row, s):
            assert set(group.unique().tolist()) <= {-scale.item(), 0.0, scale.item()}
    with pytest.raises(ValueError, match="2-bit symmetric"):
        TIQATConfig(bits=3, ternary=True)


# -- export ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(bits=2), dict(bits=3, sym=True, group_size=24), dict(bits=4, group_size=-1),
                                dict(bits=2, sym=True, ternary=True)],
                         ids=["2bit-asym", "3bit-sym-short-group", "4bit-per-row", "ternary"])
def test_fake_quant_forward_equals_packed_export(kw):
    teacher = tiny_llama()
    student = _student(teacher, learn_scales=True, **kw)
    with torch.no_grad():  # move off the starting point, as training would
        for fq in fake_quant_modules(student).values():
            fq.weight.add_(0.01 * torch.randn_like(fq.weight))
            fq.scale.mul_(1.05)
    before = _logits(student)
    export_packed(student)
    assert not fake_quant_modules(student) and isinstance(student.model.layers[0].mlp.down_proj, PackedLinear)
    assert torch.equal(_logits(student), before)
    assert not torch.allclose(before, _logits(teacher), atol=1e-3)  # the model really is quantized


def test_exported_checkpoint_loads_natively_in_a_fresh_process(tmp_path):
    from hf_compress import save_pretrained

    student = _student(tiny_llama(), bits=2, sym=True, ternary=True)
    student.hfc_qat_config.training = {"intervention_steps": 4, "schedule": "output:1,context:1,map:4"}
    export_packed(student)
    save_pretrained(student, tmp_path / "q")
    assert torch.equal(fresh_process_logits(tmp_path / "q", IDS, tmp_path), _logits(student))
    card = (tmp_path / "q" / "README.md").read_text()
    assert "Teacher Intervention QAT" in card and "intervention_steps" in card and "ternary" in card


def test_start_from_a_packed_checkpoint_reproduces_it():
    from hf_compress import RTNConfig, quantize

    teacher = tiny_llama()
    packed = quantize(copy.deepcopy(teacher), RTNConfig(bits=3, group_size=32), progress=False)
    expected = _logits(packed)
    prepare_qat(packed, TIQATConfig(bits=3, group_size=32))
    assert len(fake_quant_modules(packed)) == 14 and not getattr(packed, "is_quantized", False)
    assert packed.hfc_qat_config.init == "packed"
    assert torch.equal(_logits(packed), expected)
    other = quantize(tiny_llama(), RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(ValueError, match="keeps the checkpoint's grid"):
        prepare_qat(other, TIQATConfig(bits=3, group_size=32))


# -- Teacher Intervention -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point,exact", [(None, False), ("output", True), ("context", True), ("map", True)])
def test_intervention_points_replace_the_student_signals(point, exact):
    """Only the attention's q/k (and for "output"/"context" v/o too) are quantized: each point then hands the
    teacher's signal downstream of everything quantized, so the student's logits equal the teacher's exactly."""
    teacher = tiny_llama()
    excluded = {"map": "mlp|v_proj|o_proj", "context": "mlp|o_proj", "output": "mlp", None: "mlp"}[point]
    student = _student(teacher, modules_to_not_convert=excluded)
    wrapper = TeacherIntervention(student, teacher)
    wrapper.point = point
    out = wrapper(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    close = torch.allclose(out["logits"], _logits(teacher), atol=1e-5)
    assert close == exact
    out["loss"].backward()  # the own (not substituted) signals still train q/k through the map/output losses
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def _trainer(wrapper, out_dir, steps, callbacks, save_steps=None):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": row, "labels": row}
            for row in torch.randint(1, 128, (16, 12), generator=torch.Generator().manual_seed(1))]
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    return Trainer(model=wrapper, args=args, train_dataset=data, callbacks=callbacks)


class _PointSpy(TeacherInterventionCallback.__mro__[1]):  # a plain TrainerCallback
    def __init__(self):
        self.points = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.points.append(model.point)


def test_callback_switches_phases_at_the_configured_steps_and_restores_the_student(tmp_path):
    teacher = tiny_llama()
    student = _student(teacher, learn_scales=True)
    config = TIConfig(intervention_steps=6)  # TI-G: output [0, 1), context [1, 2), map [2, 6), then plain KD
    wrapper = TeacherIntervention(student, teacher, config)
    callback, spy = TeacherInterventionCallback(config), _PointSpy()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    _trainer(wrapper, tmp_path, 8, [callback, spy]).train()
    assert spy.points == ["output", "context", "map", "map", "map", "map", None, None]
    assert callback.history == [(0, "output"), (1, "context"), (2, "map"), (6, None)]
    assert TISchedule(TIConfig(intervention_steps=60)).describe() == [
        {"point": "output", "start": 0, "end": 10}, {"point": "context", "start": 10, "end": 20},
        {"point": "map", "start": 20, "end": 60}]
    # restored: no hooks, the original attention implementation, and the plain student forward
    assert student.config._attn_implementation == tiny_llama().config._attn_implementation
    for name in wrapper.output_modules:  # (transformers keeps its own output-capturing hooks on blocks/attention)
        m = student.get_submodule(name)
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())  # it trained
    plain = copy.deepcopy(student)
    assert torch.equal(_logits(student), _logits(plain))


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_save_and_resume_mid_schedule_continues_identically(tmp_path):
    teacher = tiny_llama()
    config = TIConfig(intervention_steps=4, schedule="output:1,map:1")  # output [0, 2), map [2, 4), KD after
    student_a, student_b = _student(teacher, learn_scales=True), _student(teacher, learn_scales=True)
    full = _trainer(TeacherIntervention(student_a, teacher, config), tmp_path / "a", 6,
                    [TeacherInterventionCallback(config)], save_steps=3)
    full.train()
    callback = TeacherInterventionCallback(config)
    resumed = _trainer(TeacherIntervention(student_b, teacher, config), tmp_path / "b", 6, [callback])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert callback.history == [(3, "map"), (4, None)]
    assert all("kd_logits" in h for h in resumed.state.log_history if "loss" in h)  # the curve survives a resume
    a, b = _losses(full), _losses(resumed)
    assert set(b) == set(a) == {1, 2, 3, 4, 5, 6} and all(a[s] == b[s] for s in b)  # 1-3 restored, 4-6 rerun
    for (k, va), vb in zip(student_a.state_dict().items(), student_b.state_dict().values()):
        assert torch.equal(va, vb), k


# -- bad input -----------------------------------------------------------------------------------------------------


def test_bad_settings_are_refused_with_the_problem_named():
    with pytest.raises(ValueError, match="unknown intervention point 'attn'"):
        TIConfig(schedule="attn:1")
    with pytest.raises(ValueError, match="intervention_steps"):
        TIConfig(intervention_steps=-1)
    with pytest.raises(ValueError, match="nothing to train on"):
        DistillationLoss(logits=0, hidden=0, attention=0, attention_output=0)
    with pytest.raises(ValueError, match="init must be one of"):
        TIQATConfig(init="gptq")
    teacher = tiny_llama()
    with pytest.raises(ValueError, match="same module"):
        TeacherIntervention(teacher, teacher)
    with pytest.raises(ValueError, match="output_module"):
        TeacherIntervention(_student(teacher), teacher, TIConfig(output_module="no_such_module"))
    with pytest.raises(TypeError, match="TIQATConfig"):
        prepare_qat(tiny_llama(), TIConfig())


def test_qat_command_trains_and_saves_a_native_packed_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_compress.cli.commands import main

    tiny_llama().save_pretrained(tmp_path / "m")
    save_char_tokenizer(tmp_path / "m")
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 40)
    assert main(["qat", str(tmp_path / "m"), "--out", str(tmp_path / "q"), "--dataset", str(tmp_path / "t.txt"),
                 "--steps", "3", "--intervention-steps", "2", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-3",
                 "--bits", "2", "--group-size", "16"]) == 0
    assert "3 steps (2 with Teacher Intervention)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    quant = model.config.quantization_config
    assert quant.quant_method == "hfc_ti_qat" and quant.training["intervention_steps"] == 2
    assert isinstance(model.model.layers[1].self_attn.o_proj, PackedLinear)
    assert torch.isfinite(_logits(model)).all()


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("point", ["output", "context", "map"])
def test_encoder_path_on_a_tiny_bert_classifier(point, tmp_path):
    """The paper's setting: a BERT encoder with a task head; padding masked; interventions exact; export exact."""
    teacher = tiny_bert_classifier()
    excluded = {"map": "intermediate|output|value", "context": "intermediate|output", "output": "intermediate|output\\.dense$"}
    student = prepare_qat(copy.deepcopy(teacher), TIQATConfig(bits=2, group_size=16,
                                                              modules_to_not_convert=excluded[point]))
    wrapper = TeacherIntervention(student, teacher)
    assert wrapper.output_modules == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense"]
    mask = torch.ones_like(IDS)
    mask[1, 8:] = 0
    wrapper.point = point
    out = wrapper(input_ids=IDS, attention_mask=mask)
    with torch.no_grad():
        expected = teacher(IDS, attention_mask=mask).logits
    err = (out["logits"] - expected).abs().max()
    wrapper.point = None
    plain_err = (wrapper(input_ids=IDS, attention_mask=mask)["logits"] - expected).abs().max()
    assert err < 1e-7 and plain_err > 50 * err  # (a random tiny classifier's logits are ~0.01)
    wrapper.close()
    with torch.no_grad():
        before = student(IDS, attention_mask=mask).logits
        export_packed(student)
        assert torch.equal(student(IDS, attention_mask=mask).logits, before)


@pytest.mark.parametrize("point", ["output", "context", "map"])
def test_gradient_checkpointing_recomputes_the_intervened_forward(point):
    """Checkpointed blocks rerun during backward; they must substitute the same teacher signals, else the gradients
    belong to a different forward (torch's checks compare shapes, not values)."""
    teacher = tiny_llama()
    grads = []
    for checkpointing in (False, True):
        student = _student(tiny_llama(), learn_scales=True).train()
        if checkpointing:
            student.gradient_checkpointing_enable()
        wrapper = TeacherIntervention(student, teacher)
        wrapper.point = point
        wrapper(input_ids=IDS, attention_mask=torch.ones_like(IDS))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        wrapper.close()
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("kw", [dict(bits=3), dict(bits=2, sym=True, ternary=True)], ids=["3bit", "ternary"])
def test_quantize_with_the_config_stores_the_zero_step_qat_model(kw):
    """``quantize(model, TIQATConfig)`` (``hf-compress quantize --method ti-qat``) is QAT after zero steps."""
    from hf_compress import quantize

    packed = quantize(tiny_llama(), TIQATConfig(group_size=16, **kw), progress=False)
    exported = export_packed(_student(tiny_llama(), **kw))
    assert torch.equal(_logits(packed), _logits(exported))
    if kw.get("ternary"):
        assert set(packed.model.layers[0].self_attn.q_proj.codes().unique().tolist()) == {1, 2, 3}

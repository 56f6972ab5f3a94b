"""QLoRA-style fine-tuning of packed models: PEFT's plain LoRA call works on them (no registration call), Trainer
trains the adapters only (with and without gradient checkpointing), the adapter reloads exactly in a fresh process,
and merging into packed weights is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env, tiny_llama

import hf_compress
from hf_compress import RTNConfig
from hf_compress.formats.linear import PackedLinear

TARGETS = ["q_proj", "v_proj"]
SEQ, WINDOWS = 64, 8


def packed_model():
    return hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32), progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora") / "base"
    hf_compress.save_pretrained(packed_model(), folder)
    return folder


def load_base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def windows() -> torch.Tensor:
    """Training windows of seeded word salad, as character ids (the tiny model's vocabulary)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (SEQ * WINDOWS,), generator=g).tolist())
    return torch.tensor([ord(c) % 128 for c in text[: SEQ * WINDOWS]]).view(WINDOWS, SEQ)


def mean_loss(model, ids) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was)
    return loss


def packed_buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, PackedLinear)
            for b, t in m.named_buffers(recurse=False)}


def train(model, ids, tmp_path, steps: int = 20, lr: float = 1e-2):
    """A few Trainer steps; returns the names of the parameters that had a gradient at each optimizer step and how
    often one packed base's forward ran during the first step (twice when checkpointing recomputes it)."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Windows(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    seen: dict = {"grads": set(), "calls": []}
    probe = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj.base_layer"))
    calls = [0]
    handle = probe.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            calls[0] = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["grads"] |= {n for n, p in model.named_parameters() if p.grad is not None}
            seen["calls"].append(calls[0])

    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=lr, lr_scheduler_type="constant",
                             warmup_steps=0, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Record()]).train()
    handle.remove()
    return seen


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A packed base loaded from disk, LoRA on q/v, 20 Trainer steps (shared by the training and reload tests)."""
    from peft import LoraConfig, get_peft_model

    ids = windows()
    model = get_peft_model(load_base(base_dir), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    before, buffers = mean_loss(model, ids), packed_buffers(model)
    seen = train(model, ids, tmp_path_factory.mktemp("run"))
    return {"model": model, "ids": ids, "before": before, "after": mean_loss(model, ids), "buffers": buffers,
            "seen": seen}


FRESH_GET_PEFT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
pm = get_peft_model(m, LoraConfig(target_modules=["q_proj", "v_proj"]))
ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])
pm(input_ids=ids, labels=ids).loss.backward()
print(json.dumps({"layers": sorted({type(x).__name__ for n, x in pm.named_modules() if n.endswith(("q_proj", "v_proj"))}),
                  "with_grad": sorted({n.split(".")[-3] for n, p in pm.named_parameters() if p.grad is not None})}))
"""


def test_plain_get_peft_model_works_in_a_fresh_process(base_dir, tmp_path):
    """Only transformers and peft are imported by the script: no registration call by the user."""
    run = subprocess.run([sys.executable, "-c", FRESH_GET_PEFT, str(base_dir)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["layers"] == ["PackedLoraLinear"]
    assert out["with_grad"] == ["lora_A", "lora_B"]


def test_trainer_lowers_the_loss_and_trains_only_the_adapters(trained):
    model = trained["model"]
    assert trained["after"] < trained["before"] - 0.1, (trained["before"], trained["after"])
    after = packed_buffers(model)
    assert after.keys() == trained["buffers"].keys() and len(after) >= 14 * 2  # weight + scales (+ qzeros) per module
    assert all(torch.equal(after[k], trained["buffers"][k]) for k in after)
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(TARGETS) * 2  # A and B, two targets, two layers
    assert trained["seen"]["grads"] == lora
    assert trained["seen"]["calls"][0] == 1  # no checkpointing: one forward of the packed base per step


def test_gradient_checkpointing_recomputes_packed_forward_and_trains(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    ids = windows()
    base = load_base(base_dir)
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()  # as peft.prepare_model_for_kbit_training does for reentrant checkpointing
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    before = mean_loss(model, ids)
    seen = train(model, ids, tmp_path, steps=10)
    assert seen["calls"][0] == 2  # the backward pass re-ran the block: checkpointing was in effect
    assert seen["grads"] == {n for n, p in model.named_parameters() if "lora_" in n}
    assert mean_loss(model, ids) < before - 0.05


def test_bf16_base_keeps_fp32_adapters_and_bf16_activations(base_dir):
    """As PEFT's bnb layers: the adapter runs in its own dtype and its output is cast to the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                           LoraConfig(target_modules=TARGETS, init_lora_weights="gaussian"))
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.lora_A["default"].weight.dtype == torch.float32
    ids = windows()[:2, :16]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grad = layer.lora_B["default"].weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


FRESH_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import save_file
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
with torch.no_grad():
    save_file({"logits": m(torch.tensor(eval(sys.argv[4]))).logits.contiguous()}, sys.argv[3])
print(type(m.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__name__)
"""


def test_adapter_reloads_in_a_fresh_process_with_identical_logits(trained, base_dir, tmp_path):
    from safetensors.torch import load_file

    model = trained["model"].eval()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = trained["ids"][:2, :32]
    with torch.no_grad():
        expected = model(ids).logits
        assert not torch.allclose(expected, load_base(base_dir)(ids).logits, atol=1e-3)  # the adapter matters
    out = tmp_path / "logits.safetensors"
    run = subprocess.run([sys.executable, "-c", FRESH_RELOAD, str(base_dir), str(tmp_path / "adapter"), str(out),
                          str(ids.tolist())], capture_output=True, text=True, env=subprocess_env(), timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "PackedLoraLinear"
    torch.testing.assert_close(load_file(str(out))["logits"], expected, atol=1e-6, rtol=0)


def test_merging_into_packed_weights_is_refused_and_changes_nothing():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(packed_model(), LoraConfig(target_modules=TARGETS, init_lora_weights="gaussian"))
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])
    with torch.no_grad():
        before = model(ids).logits
    message = r"cannot merge LoRA adapters into hf-compress packed modules \(model\.layers\.0\.self_attn\.q_proj.*integer codes"
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=message):
        model.merge_adapter()
    layer = model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    with pytest.raises(ValueError, match=r"packed modules \(model\.layers\.1\.self_attn\.v_proj\)"):
        layer.merge()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert type(layer).__name__ == "PackedLoraLinear" and not layer.merged
    assert isinstance(model.unload().get_submodule("model.layers.1.self_attn.v_proj"), PackedLinear)  # unmerged unload


def test_unsupported_lora_options_are_refused_by_name_and_dense_lora_is_untouched():
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match=r"packed module 'model\.layers\.0\.self_attn\.q_proj': use_dora"):
        get_peft_model(packed_model(), LoraConfig(target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        get_peft_model(packed_model(), LoraConfig(target_modules=TARGETS, init_lora_weights="pissa"))
    dense = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))  # PEFT's own dispatch, merge works
    assert type(dense.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__name__ == "Linear"
    assert isinstance(dense.merge_and_unload().model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_registration_is_idempotent_and_trainer_still_refuses_a_bare_packed_model(tmp_path):
    from peft.tuners.lora import LoraModel
    from transformers import Trainer, TrainingArguments

    from hf_compress.integrations import peft_packed

    create, check = LoraModel.__dict__["_create_new_module"], LoraModel.__dict__["_check_merge_allowed"]
    peft_packed.register()
    peft_packed.register()
    assert LoraModel.__dict__["_create_new_module"] is create and LoraModel.__dict__["_check_merge_allowed"] is check
    assert getattr(create.__func__, "__hf_compress_packed__", False)  # the autoload registered it on `import peft`
    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ValueError, match="purely quantized"):  # adapters required: packed weights do not train
        Trainer(model=packed_model(), args=args)


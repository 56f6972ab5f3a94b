"""Multi-process calibration (issue 20, item 4): two CPU processes under torchrun (gloo), each calibrating on half
the windows with all-reduced Hessians, give the one-process model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env

SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from conftest import tiny_llama, CharTokenizer
import hf_compress
from hf_compress import CalibrationSpec

distributed = "RANK" in os.environ
if distributed:
    torch.distributed.init_process_group("gloo")
torch.set_num_threads(1)
words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
g = torch.Generator().manual_seed(0)
text = " ".join(words[i] for i in torch.randint(0, len(words), (4000,), generator=g).tolist())
calib = CalibrationSpec([text], num_samples=8, seq_len=64, seed=0)
config = getattr(hf_compress, sys.argv[3])(**eval(sys.argv[4]))
model = hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=CharTokenizer(), progress=False)
rank = int(os.environ.get("RANK", 0))
with torch.no_grad():
    logits = model(torch.tensor([[3, 9, 27, 81, 4, 60]])).logits
state = {k: v for k, v in model.state_dict().items()}
from safetensors.torch import save_file
save_file({"logits": logits, **{"state." + k: v.contiguous() for k, v in state.items()}}, f"{sys.argv[2]}.rank{rank}.safetensors")
if distributed:
    torch.distributed.destroy_process_group()
'''


def run(tmp_path, processes, method, kwargs):
    script = tmp_path / "calibrate.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{method}_{processes}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--standalone"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(script), str(REPO), str(out), method, repr(kwargs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    results = [load_file(f"{out}.rank{r}.safetensors") for r in range(processes)]
    return [{"logits": r["logits"], "state": {k[len("state."):]: v for k, v in r.items() if k.startswith("state.")}}
            for r in results]


@pytest.mark.parametrize("method,kwargs", [("GPTQConfig", {"bits": 3, "group_size": 32}),
                                           ("BAQConfig", {"target_bits": 3.0, "group_size": 32})])
def test_two_processes_give_the_one_process_model(tmp_path, method, kwargs):
    (single,) = run(tmp_path, 1, method, kwargs)
    first, second = run(tmp_path, 2, method, kwargs)
    for key, value in first["state"].items():  # both processes hold the same model
        assert torch.equal(value, second["state"][key]), key
    codes = [k for k in single["state"] if k.endswith(".weight") and single["state"][k].dtype == torch.uint8]
    assert codes
    same = sum(torch.equal(single["state"][k], first["state"][k]) for k in codes)
    differing = sum(int((single["state"][k] != first["state"][k]).sum()) for k in codes)
    total = sum(single["state"][k].numel() for k in codes)
    assert differing / total < 1e-3, (same, len(codes), differing, total)  # summation order: a rare rounding tie
    assert torch.allclose(first["logits"], single["logits"], atol=1e-3 * float(single["logits"].abs().max()))

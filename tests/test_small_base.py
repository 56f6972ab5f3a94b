"""benchmarks/small_base.py: a killed pretraining run resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import small_base  # noqa: E402

TEXT = "".join(f"To be or not to be, line {i}: that is the question.\n" for i in range(200))


def tiny(arch: str) -> small_base.Spec:
    return replace(small_base.SPECS[arch], layers=2, d=32, heads=2, ffn=64, block=32, batch=4, steps=6, warmup=2,
                   eval_every=2, ckpt_every=2, eval_windows=4)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(autouse=True)
def one_thread():
    """The training runs compare bit for bit, so they use one thread; the process-wide setting is put back so later
    tests (e.g. fresh-process logit comparisons, whose child uses every core) are not affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_interrupted_run_resumes_identically(tmp_path, arch):
    spec = tiny(arch)
    full = small_base.train(spec, tmp_path / "full", text=TEXT, log=lambda m: None)

    class Interrupt(Exception):
        pass

    def stop_after_step_3(message):  # the log after step 4's eval: interrupt before step 4's checkpoint
        if message.startswith("step 4/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        small_base.train(spec, tmp_path / "resumed", text=TEXT, log=stop_after_step_3)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2  # steps 3-4 were lost with the interruption and are recomputed
    resumed = small_base.train(spec, tmp_path / "resumed", text=TEXT, log=lambda m: None)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    info_a = json.loads((full / "training.json").read_text())
    info_b = json.loads((resumed / "training.json").read_text())
    assert info_a["heldout"] == info_b["heldout"] and info_a["train"][-1] == info_b["train"][-1]
    assert not (resumed / "checkpoint").exists()
    assert not list(resumed.rglob("*.pt")) and not list(resumed.rglob("*.bin")) and not list(resumed.rglob("*.pth"))


def test_sigkilled_process_resumes_identically(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "small_base.py"), "--tiny", "--text", str(text)]
    killed = subprocess.run(cmd + ["--out", str(tmp_path / "r"), "--kill-after", "3"], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    done = subprocess.run(cmd + ["--out", str(tmp_path / "r")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "resumed at step 2" in done.stdout, done.stderr[-2000:]
    full = small_base.train(tiny("llama"), tmp_path / "full", text=TEXT, log=lambda m: None)
    a, b = _weights(full), _weights(tmp_path / "r")
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Resumable calibration (issue 20, item 3): a run that dies after block k restarts from block k+1 and gives the
same checkpoint as an uninterrupted run; a state from other settings is refused."""

from __future__ import annotations

import json

import pytest
import torch

import hf_compress
from hf_compress.calibration import runner
from hf_compress.calibration.resume import STATE

from conftest import tiny_llama


class Killed(Exception):
    pass


def gptq():
    return hf_compress.GPTQConfig(bits=3, group_size=32)


def _quantize(calib, char_tokenizer, **kw):
    return hf_compress.quantize(tiny_llama(), gptq(), calibration=calib, tokenizer=char_tokenizer, progress=False, **kw)


def test_a_killed_run_resumes_from_the_last_finished_block_with_an_identical_result(calib, char_tokenizer, tmp_path,
                                                                                    monkeypatch):
    expected = _quantize(calib, char_tokenizer)
    solve_block = runner._solve_block
    solved = []

    def dies_in_block_1(block, block_name, *args, **kwargs):
        if block_name.endswith(".1"):
            raise Killed
        solved.append(block_name)
        yield from solve_block(block, block_name, *args, **kwargs)

    monkeypatch.setattr(runner, "_solve_block", dies_in_block_1)
    with pytest.raises(Killed):
        _quantize(calib, char_tokenizer, resume_dir=tmp_path / "state")
    assert json.loads((tmp_path / "state" / STATE).read_text())["done"] == 0 and solved == ["model.layers.0"]

    def records(block, block_name, *args, **kwargs):
        solved.append(block_name)
        yield from solve_block(block, block_name, *args, **kwargs)

    monkeypatch.setattr(runner, "_solve_block", records)
    resumed = _quantize(calib, char_tokenizer, resume_dir=tmp_path / "state")
    assert solved == ["model.layers.0", "model.layers.1"]  # block 0 was not solved again
    ids = torch.tensor([[3, 9, 27, 81, 4]])
    for (name, a), (_, b) in zip(sorted(expected.state_dict().items()), sorted(resumed.state_dict().items())):
        assert torch.equal(a, b), name
    assert torch.equal(expected(ids).logits, resumed(ids).logits)
    assert resumed.config.quantization_config.report["modules"] == expected.config.quantization_config.report["modules"]
    assert not (tmp_path / "state").exists()  # removed once the run completed


def test_a_state_from_other_settings_is_refused(calib, char_tokenizer, tmp_path, monkeypatch):
    solve_block = runner._solve_block

    def dies_in_block_1(block, block_name, *args, **kwargs):
        if block_name.endswith(".1"):
            raise Killed
        yield from solve_block(block, block_name, *args, **kwargs)

    monkeypatch.setattr(runner, "_solve_block", dies_in_block_1)
    with pytest.raises(Killed):
        _quantize(calib, char_tokenizer, resume_dir=tmp_path / "state")
    monkeypatch.setattr(runner, "_solve_block", solve_block)
    with pytest.raises(ValueError, match="different config"):
        hf_compress.quantize(tiny_llama(), hf_compress.GPTQConfig(bits=4, group_size=32), calibration=calib,
                             tokenizer=char_tokenizer, progress=False, resume_dir=tmp_path / "state")
    with pytest.raises(ValueError, match="different model"):
        hf_compress.quantize(tiny_llama(seed=1), gptq(), calibration=calib, tokenizer=char_tokenizer, progress=False,
                             resume_dir=tmp_path / "state")
    (tmp_path / "state" / STATE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        _quantize(calib, char_tokenizer, resume_dir=tmp_path / "state")

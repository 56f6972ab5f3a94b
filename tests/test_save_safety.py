"""Saving never deletes what it did not write, a forgotten OUT never touches the input, and the start hook is cheap."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, save_char_tokenizer, subprocess_env, tiny_llama

import hf_compress
from hf_compress import RTNConfig
from hf_compress.cli.commands import main

IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        digest.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def user_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("four years of work")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.md").write_text("- finish chapter 3")


def quantized(seed=0, bits=4):
    return hf_compress.quantize(tiny_llama(seed), RTNConfig(bits=bits, group_size=32), progress=False)


@pytest.fixture
def dense_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    save_char_tokenizer(tmp_path / "dense")
    return tmp_path / "dense"


def test_save_into_folder_with_unrelated_files_is_refused_then_keeps_them(tmp_path):
    target = tmp_path / "d"
    user_files(target)
    before = tree_hash(target)
    with pytest.raises(ValueError, match="not empty and holds no checkpoint.*thesis.txt.*overwrite"):
        hf_compress.save_pretrained(quantized(), target)
    assert tree_hash(target) == before  # nothing written, nothing removed
    model = quantized()
    hf_compress.save_pretrained(model, target, overwrite=True)
    assert (target / "thesis.txt").read_text() == "four years of work"
    assert (target / "notes" / "todo.md").read_text() == "- finish chapter 3"
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(target)(IDS).logits, model(IDS).logits)


def test_resave_over_own_checkpoint_keeps_user_files_and_drops_stale_shards(tmp_path):
    target = tmp_path / "q"
    hf_compress.save_pretrained(quantized(0, bits=4), target)
    (target / "my-eval.txt").write_text("ppl 12.3")
    (target / "model-00001-of-00002.safetensors").write_bytes((target / "model.safetensors").read_bytes())
    model = quantized(1, bits=3)
    hf_compress.save_pretrained(model, target)  # ours: no overwrite needed
    assert (target / "my-eval.txt").read_text() == "ppl 12.3"
    assert not (target / "model-00001-of-00002.safetensors").exists()  # a stale shard would shadow the new weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or backup folder left
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert loaded.config.quantization_config.bits == 3
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "q"
    hf_compress.save_pretrained(quantized(0), target)
    (target / "keep.txt").write_text("mine")
    before = tree_hash(target)
    import hf_compress.checkpoint.atomic as ckpt

    real_replace, calls = ckpt.os.replace, []

    def failing_replace(src, dst):  # fail half-way through moving the new files in
        if ckpt.STAGING_PREFIX in str(src):
            calls.append(src)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        hf_compress.save_pretrained(quantized(1), target)
    monkeypatch.undo()
    assert tree_hash(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging or backup left inside


def test_save_refuses_a_foreign_model_and_a_file(tmp_path, dense_dir):
    before = tree_hash(dense_dir)
    with pytest.raises(ValueError, match="did not make"):
        hf_compress.save_pretrained(quantized(), dense_dir)
    assert tree_hash(dense_dir) == before
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        hf_compress.save_pretrained(quantized(), tmp_path / "f")


def test_unwritable_target_is_an_oserror(tmp_path):
    (tmp_path / "plain-file").write_text("x")  # its "subfolder" can never be created, even by root
    with pytest.raises(OSError, match="cannot write a checkpoint"):
        hf_compress.save_pretrained(quantized(), tmp_path / "plain-file" / "q")


def test_cli_quantize_into_folder_keeps_unrelated_files(dense_dir, tmp_path):
    out = tmp_path / "out"
    user_files(out)
    args = ["quantize", str(dense_dir), "--out", str(out), "--method", "rtn", "--bits", "4", "--group-size", "32"]
    before = tree_hash(out)
    assert main(args) == 2  # refused before any work
    assert tree_hash(out) == before
    assert main([*args, "--overwrite"]) == 0
    assert (out / "thesis.txt").read_text() == "four years of work" and (out / "notes" / "todo.md").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "hfc_rtn"


def test_cli_forgotten_out_never_touches_the_input_model(dense_dir, capsys):
    before = tree_hash(dense_dir)
    assert main(["quantize", str(dense_dir), "--method", "rtn"]) == 2  # the old `[MODEL] OUT` misuse
    assert "--out" in capsys.readouterr().err
    assert main(["quantize", str(dense_dir), "--out", str(dense_dir), "--method", "rtn", "--overwrite"]) == 2
    assert "input model's folder" in capsys.readouterr().err
    assert main(["quantize", str(dense_dir), str(dense_dir.parent / "x"), "--method", "rtn"]) == 2  # two positionals
    assert tree_hash(dense_dir) == before


def test_cli_forgotten_out_exits_before_loading_anything(dense_dir):
    """In a fresh process: the usage error comes before any model is loaded or quantized."""
    code = ("import sys; from hf_compress.cli import main; rc = main(['quantize', sys.argv[1]]);"
            "print(rc, any(m.startswith(('transformers.models.llama.modeling', 'hf_compress.models')) for m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(dense_dir)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120, cwd=REPO)
    assert run.stdout.split() == ["2", "False"], run.stderr[-2000:]


PROBE = ("import sys, json; import transformers; from transformers import AutoTokenizer;"
         "print(json.dumps(sorted(m for m in ('torch', 'triton', 'accelerate', 'hf_compress.pipeline.hf_quantizer',"
         "'hf_compress.methods.recursive.modeling', 'transformers.models.llama.modeling_llama') if m in sys.modules)))")


def test_import_transformers_does_not_pay_for_the_plugin(tmp_path):
    """`import transformers` (fresh process, start hook on) imports no torch/triton/accelerate and none of our
    modules; the hook is installed (else the next test would prove nothing)."""
    code = ("import sys, json; import transformers;"
            "print(json.dumps([sorted(m for m in ('torch', 'triton', 'accelerate') if m in sys.modules),"
            "sorted(m for m in sys.modules if m.startswith('hf_compress.') and m != 'hf_compress.integrations.autoload'"
            " and m != 'hf_compress.integrations' and m != 'hf_compress._imports'), "
            "[type(f).__name__ for f in sys.meta_path]]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    heavy, ours, finders = json.loads(run.stdout)
    assert heavy == [] and ours == []
    assert "RegisterAfterImport" in finders


def test_native_loading_still_needs_no_import(tmp_path):
    model = quantized()
    model.save_pretrained(tmp_path / "q")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); from safetensors.torch import save_file; save_file({'l': m(torch.tensor(eval(sys.argv[3]))).logits.detach()}, sys.argv[2]);"
            "print('hf_compress' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), str(tmp_path / "o.safetensors"), str(IDS.tolist())],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        from safetensors.torch import load_file

        assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["l"], model(IDS).logits)


# -- saves that misbehaved (issue 17) ------------------------------------------------------------------------------

def test_save_onto_a_file_is_refused_and_the_file_kept(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        hf_compress.save_pretrained(quantized(), f)
    assert f.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # nothing hidden left beside it


@pytest.mark.parametrize("previous", ["empty", "checkpoint"])
def test_save_onto_a_mount_root_stages_inside_it_and_never_renames_it(tmp_path, monkeypatch, previous):
    """A mount root cannot be renamed (EBUSY) and its parent may be another filesystem: stage inside it."""
    import errno
    import tempfile

    import hf_compress.checkpoint.atomic as ckpt

    mount = tmp_path / "volume"
    mount.mkdir()
    if previous == "checkpoint":
        hf_compress.save_pretrained(quantized(0), mount)
    real_replace, real_mkdtemp, staged = ckpt.os.replace, tempfile.mkdtemp, []

    def replace(src, dst):
        if Path(src) == mount or Path(dst) == mount:
            raise OSError(errno.EBUSY, "Device or resource busy", str(mount))
        return real_replace(src, dst)

    def mkdtemp(*args, dir=None, **kwargs):
        staged.append(Path(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.tempfile, "mkdtemp", mkdtemp)
    model = quantized(1)
    hf_compress.save_pretrained(model, mount)
    monkeypatch.undo()
    assert staged and all(d == mount for d in staged)  # never the parent filesystem
    assert not [p for p in mount.iterdir() if p.name.startswith(".")]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(mount)(IDS).logits, model(IDS).logits)


def test_checkpoint_folders_respect_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        hf_compress.save_pretrained(quantized(), tmp_path / "q")
        quantized().save_pretrained(tmp_path / "native")
    finally:
        os.umask(old)
    for folder in (tmp_path / "q", tmp_path / "native"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f  # readable by a server under another user


def test_unwritable_target_names_the_target_not_a_temp_path(tmp_path, monkeypatch):
    import errno
    import tempfile

    import hf_compress.checkpoint.atomic as ckpt

    target = tmp_path / "readonly"
    target.mkdir()

    def mkdtemp(*args, dir=None, **kwargs):  # what a read-only folder does (tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".tmp-xyz"))

    monkeypatch.setattr(ckpt.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(OSError, match=rf"cannot write a checkpoint to {target}: .*Permission denied") as info:
        hf_compress.save_pretrained(quantized(), target)
    assert ".tmp-" not in str(info.value)


def test_cli_checks_out_before_loading_or_quantizing(tmp_path, monkeypatch, capsys):
    import hf_compress.cli.commands as commands

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(commands, "load_model_arg", never)
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert main(["quantize", "--out", str(out), "--method", "rtn"]) == 2
        assert "is a file" in capsys.readouterr().err
    import hf_compress.checkpoint.atomic as ckpt

    monkeypatch.setattr(ckpt.os, "access", lambda path, mode: False)  # a read-only parent (root ignores modes)
    assert main(["quantize", "--out", str(tmp_path / "new"), "--method", "rtn"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_model_save_pretrained_is_atomic_too(tmp_path, monkeypatch):
    """`model.save_pretrained` over a checkpoint on a full disk leaves the previous one loadable."""
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM

    first = quantized(0)
    first.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "thesis.txt").write_text("mine")
    before = tree_hash(tmp_path / "q")

    def full_disk(tensors, filename, **kwargs):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        quantized(1).save_pretrained(tmp_path / "q")
    monkeypatch.undo()
    assert tree_hash(tmp_path / "q") == before
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(IDS).logits, first(IDS).logits)

"""CLI commands, the optimum-cli extension, and the built wheel used from outside the source tree."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_compress.cli.commands import main

from conftest import REPO, save_char_tokenizer, subprocess_env, tiny_llama


@pytest.fixture
def dense_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    save_char_tokenizer(tmp_path / "dense")
    return tmp_path / "dense"


def test_cli_quantize_rtn_and_eval(dense_dir, tmp_path, capsys, monkeypatch):
    assert main(["quantize", str(dense_dir), "--out", str(tmp_path / "q"), "--method", "rtn", "--bits", "3", "--group-size", "32"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.config.quantization_config.plan["model.layers.0.mlp.up_proj"]["bits"] == 3
    (tmp_path / "eval.txt").write_text("the quick brown fox jumps over the lazy dog " * 40)
    eval_args = ["eval", str(tmp_path / "q"), "--eval-dataset", str(tmp_path / "eval.txt"), "--eval-seq-len", "32",
                 "--max-windows", "2"]
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    assert main(eval_args) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "kernels: int4 × 14" in out  # which kernel serves generate()


def test_cli_errors_are_clear(dense_dir, tmp_path, capsys):
    assert main(["quantize", str(dense_dir), "--out", str(tmp_path / "q"), "--method", "rtn", "--bits", "9"]) == 2
    assert "--bits: invalid choice: 9" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    assert main(["eval", str(tmp_path / "nope" / "model")]) == 2
    assert "not found" in capsys.readouterr().err


def test_optimum_cli_exposes_the_commands():
    exe = Path(sys.executable).with_name("optimum-cli")
    if not exe.exists():
        pytest.skip("optimum-cli is not installed next to this interpreter")
    run = subprocess.run([str(exe), "hf-compress", "quantize", "--help"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--group-size" in run.stdout


def test_wheel_ships_root_folders_hook_and_cards_and_loads_a_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("hf_compress/kernels/dispatch.py", "hf_compress/integrations/hub.py",
                     "hf_compress/integrations/autoload.py", "hf_compress/model_cards/quantized.md",
                     "hf_compress/methods/gptq/config.py", "hf_compress-autoload.pth",
                     "_hf_compress_autoload.py", "optimum/commands/register/hf_compress.py"):
        assert required in names, required
    assert not any(n.startswith(("kernels/", "integrations/", "model_cards/")) for n in names)  # no top-level packages
    assert not any("site_packages" in n for n in names)
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # a fresh interpreter with the wheel's files first on the path, its .pth processed as site-packages would:
    # the start hook registers, and a v1 checkpoint loads with the reference logits, without `import hf_compress`
    code = ("import site, sys; site.addsitedir(sys.argv[1]);"
            "import torch; from transformers import AutoModelForCausalLM; from safetensors.torch import load_file;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[2]);"
            "ref = load_file(sys.argv[3])['v1_baq_llama'];"
            "out = m(torch.tensor([[3, 17, 42, 99, 5, 64, 23, 77, 8, 120, 1, 56]])).logits;"
            "import hf_compress.kernels.dispatch as k, importlib.resources as r;"
            "print(hf_compress.__file__, k.__file__, (r.files('hf_compress.model_cards') / 'quantized.md').is_file(), bool((out - ref).abs().max() <= 1e-6))")
    fixtures = REPO / "tests" / "fixtures"
    env = subprocess_env(PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code.replace("hf_compress.__file__", "sys.modules['hf_compress'].__file__"),
                          str(target), str(fixtures / "v1_baq_llama"), str(fixtures / "v1_reference_logits.safetensors")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    package, kernel, card, same = out.stdout.split()[-4:]
    assert package.startswith(str(target)) and kernel.startswith(str(target / "hf_compress" / "kernels"))
    assert card == "True" and same == "True"


def test_cli_profile_writes_json_png_and_table(dense_dir, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text("a quick brown fox jumps over the lazy dog. " * 200)
    assert main(["profile", str(dense_dir), "--out", str(tmp_path / "prof"), "--dataset", str(data),
                 "--num-samples", "4", "--seq-len", "64", "--group-size", "32", "--fisher-samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "| layer | LIM |" in out
    prof = json.loads((tmp_path / "prof" / "sensitivity_profile.json").read_text())
    assert len(prof["layers"]) == 2 and len(prof["modules"]) == 14
    assert (tmp_path / "prof" / "sensitivity_profile.png").stat().st_size > 1000


def test_cli_layerwise_with_target_average(dense_dir, tmp_path):
    assert main(["quantize", str(dense_dir), "--out", str(tmp_path / "q"), "--method", "layerwise", "--score", "zd",
                 "--high-bits", "4", "--low-bits", "2", "--target-bits", "3", "--solver", "rtn", "--group-size", "32"]) == 0
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "q").config.quantization_config
    assert sorted(cfg.layer_bits) == [2, 4]
    assert main(["quantize", str(dense_dir), "--out", str(tmp_path / "r"), "--method", "layerwise", "--target-bits", "5"]) == 2


def test_top_level_help_and_unknown_commands_import_no_torch():
    """`hf-compress --help` builds only command stubs: no config (torch, transformers) is imported for it."""
    code = ("import sys, json; from hf_compress.cli.commands import main; codes = [main(['--help']), main(['nosuch'])];"
            "print(json.dumps([codes, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    codes, heavy = json.loads(run.stdout.strip().splitlines()[-1])
    assert codes == [0, 2] and heavy == [], run.stderr[-2000:]
    assert "invalid choice: 'nosuch'" in run.stderr


QUANTIZE_ARGS = ("import sys, json; from hf_compress.cli.commands import main; codes = [main(ARGS)];"
                 "print(json.dumps([codes, sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))")


def test_quantize_help_and_argument_errors_import_no_torch_once_the_option_table_is_cached(tmp_path):
    """The first `quantize --help` builds the option table from the configs (imports torch); later runs, and
    argument errors, read the cached table and import neither torch nor transformers. Editing a config (a new
    source fingerprint) rebuilds it, so a new option shows up at once."""
    env = subprocess_env(HF_COMPRESS_CACHE=str(tmp_path / "cache"))

    def run(args):
        out = subprocess.run([sys.executable, "-c", QUANTIZE_ARGS.replace("ARGS", repr(args))], capture_output=True,
                             text=True, env=env, timeout=120)
        return (*json.loads(out.stdout.strip().splitlines()[-1]), out)

    codes, heavy, first = run(["quantize", "--help"])
    assert codes == [0] and heavy == ["torch", "transformers"] and "--embedding-bits {1..8}" in first.stdout
    codes, heavy, second = run(["quantize", "--help"])
    assert codes == [0] and heavy == [] and second.stdout.splitlines()[:-1] == first.stdout.splitlines()[:-1]
    codes, heavy, bad = run(["quantize", "x", "--out", str(tmp_path / "o"), "--bits", "11"])
    assert codes == [2] and heavy == [] and "invalid choice: 11" in bad.stderr
    assert len(list((tmp_path / "cache").glob("cli-options-*.json"))) == 1


def test_quantize_usage_reads_as_meant(capsys):
    assert main(["quantize", "--help"]) == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage == "usage: hf-compress quantize [MODEL] --out OUT [--overwrite] [--dtype DTYPE] [options]"

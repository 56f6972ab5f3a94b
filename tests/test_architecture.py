"""The shape of the package: no import cycles, stages never import methods, the registry is the only way generic
code learns about methods (a toy method defined here goes through every generic path), design-card root folders."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env, tiny_llama

import hf_compress

PACKAGE_ROOTS = {"hf_compress": REPO / "hf_compress", "hf_compress.kernels": REPO / "kernels",
                 "hf_compress.integrations": REPO / "integrations", "hf_compress.model_cards": REPO / "model_cards"}
STAGES = ("calibration", "sensitivity", "allocation", "solvers", "formats", "checkpoint", "pipeline", "kernels")
IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])


def package_modules() -> dict[str, Path]:
    found = {}
    for prefix, root in PACKAGE_ROOTS.items():
        for path in root.rglob("*.py"):
            if "site_packages" in path.parts or path.name == "optimum_command.py":
                continue  # installed outside the package (site-packages, optimum's namespace)
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if name.startswith("hf_compress.hf_compress") or not any(name == p or name.startswith(p + ".") for p in PACKAGE_ROOTS):
                continue
            if prefix == "hf_compress" and parts and parts[0] in ("kernels", "integrations", "model_cards"):
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """Every hf_compress module ``path`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:  # `from pkg import submodule` or a name inside a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 60
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_stages_and_generic_code_never_import_methods():
    graph = import_graph()
    generic = [n for n in graph if (n.split(".") + [""])[1] in STAGES or n in ("hf_compress.config", "hf_compress.registry")
               or n.startswith(("hf_compress.integrations", "hf_compress.cli"))]
    bad = {n: sorted(t for t in graph[n] if t.startswith("hf_compress.methods")) for n in generic}
    assert not {n: t for n, t in bad.items() if t}


def test_generic_code_names_no_method():
    """No quant_method or method name is spelled out in generic modules (they ask the registry)."""
    names = ("hfc_gptq", "hfc_rtn", "hfc_baq", "hfc_rsq", "hfc_layerwise", "hfc_high_impact", "BAQConfig", "RSQConfig",
             "HighImpactConfig", "LayerwiseQuantConfig", "rotate_model", "token_weighting", "recursive", "ln_free")
    modules = package_modules()
    offenders = []
    for name, path in modules.items():
        if name.startswith("hf_compress.methods") or name in ("hf_compress", "hf_compress.registry"):  # API, builtin list
            continue
        text = path.read_text()
        offenders += [f"{name}: {n}" for n in names if n in text]
    assert not offenders, offenders


def test_architecture_doc_matches_the_tree():
    doc = (REPO / "docs" / "architecture.md").read_text()
    folders = [p.name for p in (REPO / "hf_compress").iterdir() if p.is_dir() and p.name != "__pycache__"]
    methods = [p.name for p in (REPO / "hf_compress" / "methods").iterdir() if p.is_dir() and p.name != "__pycache__"]
    for folder in [*folders, *methods, "kernels/", "integrations/", "model_cards/"]:
        assert folder in doc, folder


class ToyConfig(hf_compress.HfcConfig):
    """Toy: RTN with every code rounded toward zero first (a method defined only in this test)."""

    quant_method = "hfc_toy"
    method_keys = ("shrink",)

    def __init__(self, bits: int = 4, group_size: int = 32, shrink: float = 1.0, **kwargs):
        super().__init__(bits=bits, group_size=group_size, shrink=shrink, **kwargs)

    def solve(self, weight, stats, spec, name=None):
        from hf_compress.solvers.rtn import rtn_quantize

        return rtn_quantize(weight * self.shrink, spec, None, 0)


def test_a_toy_method_goes_through_every_generic_path(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_compress.cli import main
    from hf_compress.registry import Method, methods, register_method

    register_method(Method(name="toy", title="Toy rounding", summary="toy: RTN after shrinking weights (test only)",
                           paper="(no paper)", config=f"{__name__}:ToyConfig"), replace=True)
    try:
        # quantizable and saveable
        model = hf_compress.quantize(tiny_llama(), ToyConfig(bits=3, shrink=0.9), progress=False)
        hf_compress.save_pretrained(model, tmp_path / "q")
        # loadable (the late registration reached transformers' mappings)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        assert type(loaded.config.quantization_config).__name__ == "ToyConfig"
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        # in the card
        card = (tmp_path / "q" / "README.md").read_text()
        assert "Toy rounding" in card and "(no paper)" in card
        # in the CLI, with its own option
        assert main(["methods"]) == 0
        assert "toy: RTN after shrinking" in capsys.readouterr().out
        dense = tmp_path / "dense"
        from conftest import save_char_tokenizer

        tiny_llama().save_pretrained(dense)
        save_char_tokenizer(dense)
        assert main(["quantize", str(dense), "--out", str(tmp_path / "c"), "--method", "toy", "--shrink", "0.5",
                     "--bits", "2"]) == 0
        saved = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
        assert saved["quant_method"] == "hfc_toy" and saved["shrink"] == 0.5 and saved["bits"] == 2
        assert main(["quantize", str(dense), "--out", str(tmp_path / "d"), "--method", "gptq", "--shrink", "2"]) == 2
        assert "takes no --shrink" in capsys.readouterr().err
    finally:
        from hf_compress import registry

        registry._METHODS.pop("toy", None)
    assert "toy" not in [m.name for m in methods()]


def test_every_method_has_a_cli_path_and_a_readme_row(capsys):
    from hf_compress.cli import build_parser
    from hf_compress.registry import methods

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    quant = next(a for a in sub.choices["quantize"]._actions if a.dest == "method")
    readme = (REPO / "README.md").read_text()
    for method in methods():
        if method.kind == "quantization":
            assert method.name in quant.choices, method.name
        else:
            assert (method.command or method.name) in sub.choices, method.name
        assert f"| `{method.name}` |" in readme, f"README methods table lacks {method.name}"


def test_rsq_options_reach_every_method_from_the_cli():
    from hf_compress.cli import build_parser
    from hf_compress.cli.method_options import config_from_args

    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "baq", "--target-bits", "2.5",
                                      "--rotate", "--token-weighting", "attention", "--r-min", "0.05", "--no-act-order"])
    config = config_from_args(args)
    assert type(config).__name__ == "BAQConfig"
    assert config.rotate and config.token_weighting == "attention" and config.r_min == 0.05 and not config.act_order
    assert config.target_bits == 2.5 and config.group_size == 64


def test_root_folders_are_subpackages_and_do_not_shadow_hf_kernels(tmp_path):
    import hf_compress.integrations.hub
    import hf_compress.kernels.dispatch

    assert Path(hf_compress.kernels.dispatch.__file__).parent in (REPO / "kernels", )
    for folder in ("kernels", "integrations", "model_cards"):
        assert not (REPO / folder / "__init__.py").exists(), folder
    # a stand-in for Hugging Face's `kernels` package wins over our root folder, from the repository root
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'huggingface'\n")
    code = "import kernels; print(getattr(kernels, 'WHO', None))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=subprocess_env(PYTHONPATH=str(tmp_path / "site")))
    assert run.stdout.strip() == "huggingface", run.stderr[-2000:]
    # transformers probes `kernels` (and from 5.25 installs it): what it finds from the repository root is the
    # installed distribution when there is one, and never taken for one when there is none
    code = ("import importlib.metadata as md, importlib.util as u; from transformers.utils import is_kernels_available\n"
            "try: md.version('kernels'); installed = True\nexcept md.PackageNotFoundError: installed = False\n"
            "spec = u.find_spec('kernels'); print(installed, is_kernels_available(), spec and spec.origin)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    installed, available, origin = run.stdout.strip().splitlines()[-1].split(" ", 2)
    assert available == installed, run.stderr[-2000:]
    if installed == "True":
        assert not origin.startswith(str(REPO / "kernels")), origin


FIXTURES = REPO / "tests" / "fixtures"


@pytest.mark.parametrize("name", ["v1_gptq3_llama", "v1_baq_llama", "v1_recursive_llama", "v1_ln_free_gpt2"])
def test_v1_checkpoints_load_unchanged_in_a_fresh_process(name, tmp_path):
    from safetensors.torch import load_file

    code = ("import sys, torch; from transformers import AutoModelForCausalLM;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
            "from safetensors.torch import save_file; save_file({'l': m(torch.tensor(eval(sys.argv[3]))).logits.detach()}, sys.argv[2])")
    ids = [[3, 17, 42, 99, 5, 64, 23, 77, 8, 120, 1, 56]]
    run = subprocess.run([sys.executable, "-c", code, str(FIXTURES / name), str(tmp_path / "l.safetensors"), str(ids)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert run.returncode == 0, run.stderr[-3000:]
    expected = load_file(str(FIXTURES / "v1_reference_logits.safetensors"))[name]
    # unchanged up to float rounding: transformers/torch releases reorder a few sums (5.25 moved the last bit);
    # a misread plan or a wrong grid moves logits by orders of magnitude more than 1e-6
    torch.testing.assert_close(load_file(str(tmp_path / "l.safetensors"))["l"], expected, rtol=0, atol=1e-6)


def test_methods_listing_names_each_methods_own_sub_command(capsys):
    from hf_compress.cli import main

    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "[hf-compress steer ...]" in lines["lineas"]
    assert "[hf-compress qat ...]" in lines["ti-qat"]
    assert "[hf-compress prune --method wanda ...]" in lines["wanda"]
    assert "[hf-compress quantize --method gptq]" in lines["gptq"]

"""DiffRate: fixed schedules are respected, 100 % is the identity, the rates learn, FLOPs are counted right, and a
compressed model saves and loads natively (tiny ViT/DeiT built in code, one thread)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

from hf_compress.methods.diffrate import (FlopsSpec, RateSearch, apply_token_reduction, check_schedule, compress,
                                          count_flops, kept_schedule, merge_tokens, remove_token_reduction,
                                          search_rates, uniform_schedule)

SHAPE = dict(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=64)
PRUNE, MERGE = [17, 14, 12, 8], [17, 12, 10, 6]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**SHAPE, num_labels=3)).eval()


def tiny_deit(seed=0):
    torch.manual_seed(seed)
    return DeiTForImageClassification(DeiTConfig(**SHAPE, num_labels=3)).eval()


def pixels(n=3, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def tokens_per_layer(model, x):
    """Tokens each encoder layer receives, and the tokens leaving the last one."""
    seen, hooks = [], []
    for layer in model.vit.layers if hasattr(model, "vit") else model.deit.layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])))
        last = layer
    hooks.append(last.register_forward_hook(lambda m, a, out: seen.append(out.shape[1])))
    with torch.no_grad():
        model(pixel_values=x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("make, prefix", [(tiny_vit, 1), (tiny_deit, 2)])
def test_kept_token_counts_respected(make, prefix):
    model = make()
    prune, merge = [n + prefix - 1 for n in PRUNE], [n + prefix - 1 for n in MERGE]
    reduced = compress(model, prune, merge)
    assert reduced.config.num_prefix_tokens == prefix
    assert tokens_per_layer(reduced, pixels()) == [16 + prefix] + merge
    assert kept_schedule(reduced) == (prune, merge)
    # pruning only, then merging only: each layer's own step is respected too
    only_prune = compress(model, prune, prune)
    assert tokens_per_layer(only_prune, pixels()) == [16 + prefix] + prune


@pytest.mark.parametrize("make", [tiny_vit, tiny_deit])
def test_full_rate_is_the_unmodified_model(make):
    model = make()
    x = pixels()
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        full = model.config.num_hidden_layers * [16 + (2 if make is tiny_deit else 1)]
        assert torch.equal(compress(model, full, full)(pixel_values=x).logits, reference)
        reduced = compress(model, *( [[n + (1 if make is tiny_deit else 0) for n in s] for s in (PRUNE, MERGE)]))
        assert not torch.allclose(reduced(pixel_values=x).logits, reference)  # the reduction does something
        apply_token_reduction(model, full, full)
        assert torch.equal(model(pixel_values=x).logits, reference)
        remove_token_reduction(model)
        assert type(model.vit.layers[0] if hasattr(model, "vit") else model.deit.layers[0]).__name__ in ("ViTLayer", "DeiTLayer")


def test_merge_is_size_weighted_mean():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]]])
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0], [1.0]]])
    merged, merged_size = merge_tokens(x, size, keep=3, num_prefix=1)
    assert merged_size.flatten().tolist() == [1.0, 2.0, 3.0]  # CLS never absorbs; token 3 → 1, token 4 → 2
    assert torch.allclose(merged[0, 0], x[0, 0])
    assert torch.allclose(merged[0, 1], (x[0, 1] + x[0, 3]) / 2)
    assert torch.allclose(merged[0, 2], (2 * x[0, 2] + x[0, 4]) / 3)


def test_rates_get_gradients():
    model = tiny_vit().requires_grad_(False)  # as search_rates does: only the rates learn
    search = RateSearch(model, granularity=2)
    with search:
        logits = model(pixel_values=pixels(4)).logits
        task = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    flops = search.flops()
    (task + (flops / count_flops(search.spec) - 0.3) ** 2).backward()
    for proxy in [*search.prune, *search.merge]:
        assert proxy.logits.grad is not None and proxy.logits.grad.abs().sum() > 0
    # the task loss alone reaches the rates through the straight-through token masks
    search.zero_grad()
    with search:
        torch.nn.functional.cross_entropy(model(pixel_values=pixels(4)).logits, torch.tensor([0, 1, 2, 0])).backward()
    assert search.prune[0].logits.grad.abs().sum() > 0
    assert type(model.vit.layers[0]).forward is model.vit.layers[0].forward.__func__  # search forward removed


def test_search_moves_toward_the_target_and_returns_a_valid_schedule():
    model = tiny_vit()
    found = search_rates(model, pixels(32), torch.randint(0, 3, (32,)), target_flops=0.4, steps=40, batch_size=16,
                         lr=0.1, granularity=1, progress=False)
    spec = FlopsSpec.from_config(model.config, 1)
    check_schedule(found["prune_kept"], found["merge_kept"], 17, 1, 4)
    assert found["flops"] == count_flops(spec, found["prune_kept"], found["merge_kept"])
    assert found["history"][-1]["flops_ratio"] < found["history"][0]["flops_ratio"]
    assert abs(found["flops_ratio"] - 0.4) < 0.15
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_flops_hand_count():
    # 4 patches (image 4, patch 2, 1 channel) + CLS, width 8, MLP 16, 2 layers, 3 classes
    spec = FlopsSpec(num_tokens=5, num_prefix=1, hidden=8, intermediate=16, num_layers=2, patch_dim=4, num_labels=3)
    embed, head = 4 * 8 * 4, 8 * 3
    layer0 = 4 * 5 * 64 + 2 * 25 * 8 + 2 * 5 * 8 * 16
    layer1 = 4 * 5 * 64 + 2 * 25 * 8 + 5 * 8 + (3 - 2) * (2 - 1) * 8 + 2 * 2 * 8 * 16
    assert count_flops(spec) == embed + head + 2 * layer0
    assert count_flops(spec, [5, 3], [5, 2]) == embed + head + layer0 + layer1
    from hf_compress.methods.diffrate.search import straight_min

    as_tensors = [[torch.tensor(5.0), torch.tensor(3.0)], [torch.tensor(5.0), torch.tensor(2.0)]]
    assert count_flops(spec, *as_tensors, minimum=straight_min).item() == embed + head + layer0 + layer1


@pytest.mark.parametrize("schedule", [None, (PRUNE, MERGE), ([17, 10, 10, 10], [17, 10, 10, 10])])
def test_flops_match_torch_flop_counter(schedule):
    """Matmuls/convs counted by torch agree with the formula; torch does not count the fused attention core
    (2·N²·C per layer), so that is added back by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_vit()
    if schedule:
        model = compress(model, *schedule)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels(1))
    tokens_in = [17] + (schedule[1][:-1] if schedule else [17] * 3)
    core = sum(2 * n * n * 32 for n in tokens_in)
    spec = FlopsSpec.from_config(model.config, 1)
    assert counter.get_total_flops() // 2 + core == count_flops(spec, *(schedule or (None, None)))


def test_save_and_fresh_process_load(tmp_path):
    model = compress(tiny_vit(), PRUNE, MERGE, search_info={"source": "test"})
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "reduced")
    assert (tmp_path / "reduced" / "README.md").exists()
    from safetensors.torch import load_file, save_file

    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = ("import sys, torch; from transformers import AutoModelForImageClassification;"
              "from safetensors.torch import load_file, save_file;"
              "m = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval();"
              "assert type(m).__name__ == 'DiffRateViTForImageClassification', type(m);"
              "assert 'hf_compress.methods.diffrate.search' not in sys.modules;"
              "x = load_file(sys.argv[2])['x'];"
              "save_file({'logits': m(pixel_values=x).logits.detach()}, sys.argv[3])")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "reduced"), str(tmp_path / "x.safetensors"),
                          str(tmp_path / "out.safetensors")], cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], expected)


@pytest.mark.parametrize("prune, merge, error, match", [
    ([17, 14, 15, 8], [17, 14, 12, 8], ValueError, "must not increase"),    # pruning count grows
    ([17, 14, 12, 8], [17, 15, 10, 6], ValueError, "must not increase"),    # merge keeps more than pruning
    ([18, 14, 12, 8], [18, 12, 10, 6], ValueError, "outside"),              # more tokens than the model has
    ([17, 14, 12, 1], [17, 12, 10, 1], ValueError, "outside"),              # nothing but the CLS token
    ([17, 14.5, 12, 8], [17, 12, 10, 6], TypeError, "integer"),             # non-integer
    ([17, 14, 12, 8], [17, "12", 10, 6], TypeError, "integer"),
    ([17, 14, 12], [17, 12, 10], ValueError, "encoder layers"),             # wrong length
    (17, [17, 12, 10, 6], TypeError, "list"),
])
def test_bad_schedules_raise(prune, merge, error, match):
    with pytest.raises(error, match=match):
        compress(tiny_vit(), prune, merge)
    with pytest.raises(error, match=match):
        apply_token_reduction(tiny_vit(), prune, merge)


def test_bad_config_and_models_raise():
    from hf_compress.methods.diffrate import DiffRateViTConfig

    with pytest.raises(Exception, match="must not increase"):
        DiffRateViTConfig(**SHAPE, prune_kept=[17, 12, 14, 8], merge_kept=[17, 12, 12, 8])
    with pytest.raises(Exception, match="together"):
        DiffRateViTConfig(**SHAPE, prune_kept=[17, 12, 12, 8])
    with pytest.raises(TypeError, match="pre-norm ViT"):
        apply_token_reduction(torch.nn.Sequential(torch.nn.Linear(2, 2)), [1], [1])
    with pytest.raises(ValueError, match="fraction"):
        search_rates(tiny_vit(), pixels(4), torch.zeros(4, dtype=torch.long), target_flops=1.5)
    with pytest.raises(ValueError, match="NaN"):
        search_rates(tiny_vit(), pixels(4) * float("nan"), torch.zeros(4, dtype=torch.long), target_flops=0.5)


def test_bad_image_files_raise(tmp_path):
    from safetensors.torch import save_file

    from hf_compress.methods.diffrate import load_images

    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_images(tmp_path / "corrupt.safetensors")
    save_file({"pixel_values": pixels(2)}, str(tmp_path / "nolabels.safetensors"))
    with pytest.raises(ValueError, match="labels"):
        load_images(tmp_path / "nolabels.safetensors")
    save_file({"pixel_values": pixels(2), "labels": torch.zeros(3, dtype=torch.long)}, str(tmp_path / "n.safetensors"))
    with pytest.raises(ValueError, match="expected pixel_values"):
        load_images(tmp_path / "n.safetensors")


def test_uniform_schedule_removes_evenly():
    assert uniform_schedule(17, 1, 4, 3, "merge") == ([17, 17, 14, 11], [17, 14, 11, 8])
    assert uniform_schedule(17, 1, 4, 3, "prune") == ([17, 14, 11, 8], [17, 14, 11, 8])
    assert uniform_schedule(17, 1, 5, 2.5, "prune")[1] == [17, 15, 12, 10, 7]


def test_cli_search_and_fixed_schedule(tmp_path, capsys):
    from safetensors.torch import save_file

    from hf_compress.cli.commands import main

    tiny_vit().save_pretrained(tmp_path / "vit")
    save_file({"pixel_values": pixels(16), "labels": torch.randint(0, 3, (16,))}, str(tmp_path / "images.safetensors"))
    assert main(["diffrate", str(tmp_path / "vit"), "--out", str(tmp_path / "searched"), "--target-flops", "0.6",
                 "--dataset", str(tmp_path / "images.safetensors"), "--steps", "3", "--batch-size", "8"]) == 0
    from hf_compress.methods.diffrate import DiffRateViTForImageClassification

    searched = DiffRateViTForImageClassification.from_pretrained(tmp_path / "searched")
    assert searched.config.diffrate_search["target_flops"] == 0.6
    check_schedule(searched.config.prune_kept, searched.config.merge_kept, 17, 1, 4)
    assert main(["diffrate", str(tmp_path / "vit"), "--out", str(tmp_path / "fixed"), "--prune-kept", "17,14,12,8",
                 "--merge-kept", "17,12,10,6"]) == 0
    card = (tmp_path / "fixed" / "README.md").read_text()
    assert "| 3 | 10 | 8 | 6 |" in card and "hf_compress_plan.png" in card
    assert "pipeline_tag: image-classification" in card and "text-generation" not in card
    # bad input: increasing counts, a missing image file
    assert main(["diffrate", str(tmp_path / "vit"), "--out", str(tmp_path / "bad"), "--prune-kept", "17,14,15,8",
                 "--merge-kept", "17,12,10,6"]) == 2
    assert main(["diffrate", str(tmp_path / "vit"), "--out", str(tmp_path / "bad"), "--dataset",
                 str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "must not increase" in err and "does not exist" in err
    assert not (tmp_path / "bad").exists()


def test_rate_proxy_inits_and_masks():
    from hf_compress.methods.diffrate import RateProxy

    uniform, full = RateProxy(65, 1, 2), RateProxy(65, 1, 2, init="full")
    assert uniform.expected_kept().item() == 34  # ceil(mean of 64, 62, …, 2) + CLS
    assert full.expected_kept().item() > 0.8 * 65
    mask = uniform.token_mask(kept=30, end=50, length=65)
    assert mask[:30].eq(1).all() and mask[30:50].eq(0).all() and mask[50:].eq(1).all()
    mask[30:50].sum().backward()
    assert uniform.logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="init"):
        RateProxy(65, 1, 2, init="zeros")
    with pytest.raises(ValueError, match="granularity"):
        RateProxy(65, 1, 0)

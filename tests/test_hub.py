"""Hub publishing against an in-process stand-in of the Hub's HTTP API (tests/hub_standin.py): what a push
uploads (files, card metadata parsed back by huggingface_hub, the plot), downloads that reproduce the logits, the
CLI, and bad input (token, existing repo, network failure, folders that are not hf-compress artifacts)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import pytest
import torch
from conftest import WIKITEXT, fresh_process_logits, require_wikitext, tiny_llama
from hub_standin import GOOD_TOKEN, HubStandIn, installed

import hf_compress
from hf_compress import cli
from hf_compress.integrations.card_inputs import perplexity_result, record_card_inputs
from hf_compress.integrations.model_card import PLOT_FILE

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def hub():
    with installed(HubStandIn()) as h:
        yield h


@pytest.fixture
def quantized(tmp_path):
    model = tiny_llama()
    skip = [r"layers\.1\.mlp\.(gate|up|down)_proj"]  # a pipe: must not break the card's settings table
    hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=32, modules_to_not_convert=skip), progress=False)
    return model


def _card(hub, repo_id):
    from huggingface_hub import ModelCard

    card = ModelCard(hub.repos[repo_id]["files"]["README.md"].decode())
    card.validate()  # POSTs to the stand-in's /api/validate-yaml, as against the Hub
    return card


def _folder_digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_push_to_hub_uploads_checkpoint_card_and_plot(hub, quantized, tmp_path):
    url = quantized.push_to_hub("me/tiny-rtn", token=GOOD_TOKEN)
    assert "me/tiny-rtn/commit/" in url
    files = hub.repos["me/tiny-rtn"]["files"]
    assert {"config.json", "model.safetensors", "README.md", PLOT_FILE} <= set(files)
    assert files[PLOT_FILE].startswith(PNG_MAGIC)
    card = _card(hub, "me/tiny-rtn")
    assert card.data.library_name == "transformers"
    assert {"hf-compress", "quantized", "rtn", "4-bit"} <= set(card.data.tags)
    assert f"![per-layer bit widths]({PLOT_FILE})" in card.text
    assert 'from_pretrained("me/tiny-rtn")' in card.text and "pip install hf-compress" in card.text
    assert card.text.count("| model.layers.") == 11  # per-module plan: 14 linears, layer 1's MLP (3) dense
    assert "Not measured" in card.text  # no evaluation recorded: nothing invented
    assert "| modules_to_not_convert | `layers\\.1\\.mlp\\.(gate\\|up\\|down)_proj` |" in card.text

    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    local = snapshot_download("me/tiny-rtn", token=GOOD_TOKEN, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        expect = quantized(IDS).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(local)(IDS).logits, expect)
    assert torch.equal(fresh_process_logits(local, IDS, tmp_path), expect)


def test_save_pretrained_writes_the_card_locally(hub, quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)
    assert "## Per-layer plan" in (tmp_path / "q" / "README.md").read_text()
    quantized.save_pretrained(tmp_path / "q2", push_to_hub=True, repo_id="me/saved-and-pushed", token=GOOD_TOKEN)
    assert "## Per-layer plan" in _card(hub, "me/saved-and-pushed").text  # our card, not transformers' generic one
    quantized.save_pretrained(tmp_path / "q3", is_main_process=False)  # other ranks write nothing, and do not fail
    assert not (tmp_path / "q3" / "README.md").exists()


def test_push_uploads_the_checkpoint_not_trainer_state_and_forgets_stale_results(hub, quantized, tmp_path):
    folder = hf_compress.save_pretrained(quantized, tmp_path / "out", results=[perplexity_result(9.5)])
    torch.save({}, folder / "training_args.bin")  # what a Trainer leaves in its output_dir
    torch.save({}, folder / "optimizer.pt")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    hf_compress.push_to_hub(folder, "me/out", token=GOOD_TOKEN)
    assert set(hub.repos["me/out"]["files"]) == {"config.json", "generation_config.json", "model.safetensors",
                                                  "hf_compress_card.json", "README.md", PLOT_FILE}
    assert "9.5" in _card(hub, "me/out").text
    other = tiny_llama(seed=1)
    hf_compress.quantize(other, hf_compress.RTNConfig(bits=3, group_size=32), progress=False)
    other.save_pretrained(folder)  # other weights saved over the folder: the old result no longer applies
    assert "Not measured" in (folder / "README.md").read_text()


def test_branches_pull_requests_and_refused_uploads(hub, quantized, tmp_path):
    folder = hf_compress.save_pretrained(quantized, tmp_path / "ckpt")
    hf_compress.push_to_hub(folder, "me/rev", token=GOOD_TOKEN)
    main_sha = hub.repos["me/rev"]["sha"]
    hf_compress.push_to_hub(folder, "me/rev", token=GOOD_TOKEN, exist_ok=True, revision="dev", tags=["my-tag"])
    assert hub.repos["me/rev"]["sha"] == main_sha and "README.md" in hub.repos["me/rev"]["branches"]["dev"]["files"]
    assert "my-tag" in hub.repos["me/rev"]["branches"]["dev"]["files"]["README.md"].decode()
    url = hf_compress.push_to_hub(folder, "me/rev", token=GOOD_TOKEN, exist_ok=True, create_pr=True)
    assert url.endswith("/discussions/1") and hub.repos["me/rev"]["sha"] == main_sha
    with pytest.raises(ValueError, match=r"(?s)refused the upload.*base_model is not a model id"):  # the Hub validates card metadata
        hf_compress.push_to_hub(folder, "me/rev", token=GOOD_TOKEN, exist_ok=True, base_model="not a model id")


def test_cli_card_and_push_carry_recorded_results(hub, quantized, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    hf_compress.save_pretrained(quantized, folder, base_model="me/tiny-base",
                                results=[perplexity_result(31.25, protocol="512-token windows, 40 windows")])
    before = _folder_digest(folder)
    assert cli.main(["card", str(folder), "--repo-id", "me/preview"]) == 0
    printed = capsys.readouterr().out
    assert "base_model: me/tiny-base" in printed and "31.25" in printed
    assert not [r for r in hub.requests if "/api/models/" in r[1]]  # rendering a card never touches the Hub
    assert cli.main(["card", str(folder), "--out", str(tmp_path / "preview")]) == 0
    assert (tmp_path / "preview" / PLOT_FILE).is_file()

    record_card_inputs(folder, results=[perplexity_result(30.5, protocol="512-token windows, 40 windows")])  # re-eval replaces
    assert cli.main(["push", str(folder), "me/tiny-cli", "--token", GOOD_TOKEN]) == 0
    card = _card(hub, "me/tiny-cli")
    assert card.data.base_model == "me/tiny-base"
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type, result.dataset_split) == ("perplexity", 30.5, "wikitext", "test")
    assert _folder_digest(folder) == {**before, "hf_compress_card.json": _folder_digest(folder)["hf_compress_card.json"]}
    assert set(_folder_digest(folder)) == set(before)  # the push added nothing locally


def test_bad_input_gives_clear_errors(hub, quantized, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = hf_compress.save_pretrained(quantized, tmp_path / "ckpt")
    before = _folder_digest(folder)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="no Hugging Face token"):
        hf_compress.push_to_hub(folder, "me/x")
    with pytest.raises(ValueError, match="rejected the token"):
        hf_compress.push_to_hub(folder, "me/x", token="hf_wrong")
    with pytest.raises(ValueError):
        hf_compress.push_to_hub(folder, "not a repo id!", token=GOOD_TOKEN)

    hf_compress.push_to_hub(folder, "me/exists", token=GOOD_TOKEN)
    with pytest.raises(ValueError, match="already exists.*--update"):
        hf_compress.push_to_hub(folder, "me/exists", token=GOOD_TOKEN)
    hf_compress.push_to_hub(folder, "me/exists", token=GOOD_TOKEN, exist_ok=True)  # an update is one more commit

    for stage in ("preupload", "commit"):  # the connection drops while the files or the commit go up
        hub.fail_on = {stage}
        with pytest.raises(ConnectionError, match="Nothing was committed.*unchanged.*exist_ok=True"):
            hf_compress.push_to_hub(folder, f"me/flaky-{stage}", token=GOOD_TOKEN)
        assert hub.repos[f"me/flaky-{stage}"]["files"] == {}
    assert cli.main(["push", str(folder), "me/flaky2", "--token", GOOD_TOKEN]) == 2
    assert _folder_digest(folder) == before

    with pytest.raises(FileNotFoundError, match="not found"):
        hf_compress.push_to_hub(tmp_path / "missing", "me/x", token=GOOD_TOKEN)
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    with pytest.raises(ValueError, match="not one hf-compress made"):
        hf_compress.push_to_hub(dense, "me/x", token=GOOD_TOKEN)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        hf_compress.push_to_hub(broken, "me/x", token=GOOD_TOKEN)
    with pytest.raises(ValueError, match="non-finite"):
        record_card_inputs(folder, results=[{"metric": "perplexity", "value": float("nan")}])


def test_recursive_model_and_relaxed_adapter_push(hub, tmp_path):
    from peft import PeftModel

    from hf_compress.methods.recursive import convert, relax, save_relaxed

    original = tiny_llama()
    rec = convert(original, num_loops=2, init="average")
    rec.push_to_hub("me/tiny-rec", token=GOOD_TOKEN)
    card = _card(hub, "me/tiny-rec")
    assert "recursive" in card.data.tags and "1 unique decoder blocks applied 2 times" in card.text
    assert hub.repos["me/tiny-rec"]["files"][PLOT_FILE].startswith(PNG_MAGIC)

    relaxed = relax(convert(original, num_loops=2, init="average", tie_norms=False), original, ranks=4, progress=False)
    save_relaxed(relaxed, tmp_path / "relaxed", base_model_name_or_path="me/tiny-rec-base")
    assert "Ranks per module type" in (tmp_path / "relaxed" / "relaxed_lora" / "README.md").read_text()
    hf_compress.push_to_hub(tmp_path / "relaxed", "me/tiny-rec-base", token=GOOD_TOKEN)
    with pytest.raises(ValueError, match="not a Hub repo id"):  # a pushed adapter must name a base it can load
        relaxed.push_to_hub("me/tiny-relaxed", token=GOOD_TOKEN)
    relaxed.push_to_hub("me/tiny-relaxed", token=GOOD_TOKEN, base_model="me/tiny-rec-base")
    uploaded = json.loads(hub.repos["me/tiny-relaxed"]["files"]["adapter_config.json"])
    assert uploaded["base_model_name_or_path"] == "me/tiny-rec-base"
    card = _card(hub, "me/tiny-relaxed")
    assert card.data.library_name == "peft" and "relaxed-recursive-lora" in card.data.tags
    assert "AutoPeftModelForCausalLM" in card.text

    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(snapshot_download("me/tiny-rec-base", token=GOOD_TOKEN, cache_dir=tmp_path / "c"))
    adapter = snapshot_download("me/tiny-relaxed", token=GOOD_TOKEN, cache_dir=tmp_path / "c")
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        assert (loaded(IDS).logits - relaxed.eval()(IDS).logits).abs().max() < 1e-5


def test_ln_free_exports_push_with_their_caveats(hub, tmp_path):
    from hf_compress.methods.ln_free import estimate_std, export_compatible, export_structural, fake_status, make_removable
    from hf_compress.methods.ln_free.swap import remove

    from conftest import tiny_gpt2

    model = make_removable(tiny_gpt2())
    estimate_std(model, [IDS])
    for name in fake_status(model):
        remove(model, name)
    for form, kind_text in (("structural", "structurally LN-free"), ("compatible", "fp16")):
        path = (export_structural if form == "structural" else export_compatible)(model, tmp_path / form)
        hf_compress.push_to_hub(path, f"me/ln-free-{form}", token=GOOD_TOKEN)
        card = _card(hub, f"me/ln-free-{form}")
        assert "layernorm-free" in card.data.tags and kind_text in card.text
        assert hub.repos[f"me/ln-free-{form}"]["files"][PLOT_FILE].startswith(PNG_MAGIC)


@pytest.mark.slow
def test_quantized_smollm2_through_the_hub_with_plan_and_perplexity(hub, smollm2_dir, tmp_path):
    """Acceptance: a quantized SmolLM2 (GPTQ on 3 blocks, short calibration) with a measured perplexity, pushed and
    downloaded back; identical logits in a fresh process; the card shows the plan and the perplexity."""
    require_wikitext()
    from huggingface_hub import ModelCard, snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.calibration.data import CalibrationSpec
    from hf_compress.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    skip = [r"layers\.([3-9]|[12]\d)\."]
    hf_compress.quantize(model, hf_compress.GPTQConfig(bits=4, group_size=64, modules_to_not_convert=skip),
                         calibration=CalibrationSpec(str(WIKITEXT / "valid.txt"), num_samples=4, seq_len=128, seed=0),
                         tokenizer=tok, progress=False)
    ppl = perplexity(model, tok, str(WIKITEXT / "test.txt"), seq_len=256, max_windows=4, progress=False)
    folder = hf_compress.save_pretrained(model, tmp_path / "smol-q", tokenizer=tok, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                         results=[perplexity_result(ppl, protocol="256-token windows, 4 windows")])
    assert cli.main(["push", str(folder), "me/smollm2-gptq4", "--token", GOOD_TOKEN]) == 0

    local = snapshot_download("me/smollm2-gptq4", token=GOOD_TOKEN, cache_dir=tmp_path / "cache")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expect = model(ids).logits
    assert torch.equal(fresh_process_logits(local, ids, tmp_path), expect)

    card = ModelCard.load(local + "/README.md")
    card.validate()
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.eval_results[0].metric_value == pytest.approx(ppl)
    assert card.text.count("| model.layers.") == 21 and "| 0 | " in card.text  # per-module and per-layer plan
    from PIL import Image

    image = Image.open(io.BytesIO(open(f"{local}/{PLOT_FILE}", "rb").read()))
    assert image.size[0] > 400
    assert json.loads(open(f"{local}/config.json").read())["quantization_config"]["quant_method"] == "hfc_gptq"


def test_cli_eval_record_feeds_the_card(quantized, tmp_path, text_corpus):
    from conftest import save_char_tokenizer

    from hf_compress.integrations.model_card import render_card

    folder = hf_compress.save_pretrained(quantized, tmp_path / "ckpt")
    save_char_tokenizer(folder)
    (tmp_path / "eval.txt").write_text(text_corpus)
    args = ["eval", str(folder), "--eval-dataset", str(tmp_path / "eval.txt"), "--eval-seq-len", "32", "--max-windows", "2"]
    assert cli.main(args + ["--record"]) == 0
    recorded = json.loads((folder / "hf_compress_card.json").read_text())["results"]
    assert len(recorded) == 1 and recorded[0]["metric"] == "perplexity" and recorded[0]["value"] > 1
    card = render_card(folder).card
    assert card.data.eval_results[0].metric_value == recorded[0]["value"]
    assert "32-token windows, 2 windows" in card.text
    assert cli.main(["eval", "--record"]) == 2  # the default model is no folder to record into

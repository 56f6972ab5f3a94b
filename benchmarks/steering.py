"""LinEAS vs a per-layer mean-shift baseline on SmolLM2-135M-Instruct: steer WikiText-2 sentences towards
TinyShakespeare lines (issue 25).

Data (all local, disjoint): 32 source prompts = the first WikiText-2 *valid* sentences (detokenised, 60-220 chars,
no ``<unk>``); 32 target prompts = the first 60+-char speech chunks of TinyShakespeare (consecutive verse lines of one
speech, speaker names dropped) from its first 80 %; both truncated to ``MAX_LEN`` tokens. The style classifier is
trained on the *next* 400 sentences / chunks of each and tested on a held-out fifth of them. Held-out evaluation:
Shakespeare perplexity on the last 20 % of TinyShakespeare (``PPL_WINDOWS`` × ``PPL_LEN`` tokens) — the shift — and
WikiText-2 *test* perplexity on as many tokens — the cost; the style of sampled continuations of 16 neutral prompts
(2 samples each, ``GEN_TOKENS`` new tokens, temperature 1, top-p 0.95, fixed seed) scored by the classifier; and
the LinEAS loss (summed per-coordinate W2 over the steered modules) between 32 *other* WikiText sentences through the
steered model and 32 other Shakespeare chunks through the base, which says whether the activation distributions
moved towards the target beyond the training prompts.

Steered modules: every ``post_attention_layernorm`` (30 × 576 coordinates, 34,560 parameters). Rows: the base
model; the mean-shift baseline (ω = 1, b = mean target − mean source per module, closed form, fitted layer by layer on
the activations the earlier shifts produced — ``fit_mean_shift(sequential=True)`` — or all on the base model); LinEAS
(``STEPS`` Adam steps, lr ``LR`` cosine, batch = all 32 + 32 prompts, no sparsity penalty), each at a few strengths;
and sparse LinEAS (same run with ``l1_penalty`` = the ``L1_QUANTILE`` quantile of the initial gradients).

    python benchmarks/steering.py               # every missing row (one process each, cached), then RESULTS + PNG
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from _rows import RowCache, main, measured_on  # noqa: E402

CACHE = RowCache("bench_steering", __file__)
TITLE = "## LinEAS activation steering on SmolLM2-135M: WikiText-2 → TinyShakespeare (issue 25)"
N_PROMPTS, MAX_LEN = 32, 24
STEPS = int(os.environ.get("HF_COMPRESS_STEERING_STEPS", "40"))
LR = 2e-2
PPL_WINDOWS, PPL_LEN = 8, 128
GEN_TOKENS, GEN_SAMPLES, SEED = 24, 2, 0
NEUTRAL = ["The", "In the morning,", "She said that", "It was", "When I", "There is", "We are", "My friend",
           "He looked at the", "They had", "After the", "This is", "I have", "Once", "If you", "What"]
# most informative first: a row the machine's time runs out on is reported as not measured
ROWS = ["train_lineas", "base", "lineas@1", "mean_shift@1", "lineas@0.5", "mean_shift_independent@1", "mean_shift@0.5",
        "lineas@1.5", "train_lineas_sparse", "lineas_sparse@1", "lineas_sparse@0.5", "speed"]
SPEED_REPEATS, SPEED_PROMPT, SPEED_NEW = 7, 256, 32
TABLE_ORDER = ["base", "mean_shift@0.5", "mean_shift@1", "mean_shift_independent@1", "lineas@0.5", "lineas@1",
               "lineas@1.5", "lineas_sparse@0.5", "lineas_sparse@1"]
ADAPTERS = {"lineas": CACHE.dir / "lineas_adapter", "lineas_sparse": CACHE.dir / "lineas_sparse_adapter"}
L1_QUANTILE = 0.9  # the sparse run: l1_penalty = this quantile of |dC/d(ω, b)| at the identity


# -- data ----------------------------------------------------------------------------------------------------------------
def _data_dir() -> Path:
    from hf_compress.calibration.data import local_data_dir

    found = local_data_dir("tinyshakespeare")
    if found is None or not (found / "wikitext-2").is_dir():
        sys.exit("needs shared/data/wikitext-2 and shared/data/tinyshakespeare (set HF_COMPRESS_DATA)")
    return found


def _detok(text: str) -> str:
    """WikiText's tokenised spacing back to ordinary prose."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                 (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")"), (" n't", "n't"), (' " ', ' "')):
        text = text.replace(a, b)
    text = text.strip()
    return text[:-2] + "." if text.endswith(" .") else text


def wiki_sentences(split: str) -> list[str]:
    text = (_data_dir() / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<= \.) ", line):
            sentence = _detok(sentence)
            if 60 <= len(sentence) <= 220 and "<unk>" not in sentence:
                out.append(sentence)
    return out


def shakespeare_chunks(part: str) -> list[str]:
    """Speech chunks (speaker names dropped, consecutive lines joined to >= 60 chars) of the first 80 % or the rest."""
    text = (_data_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.8)
    text = text[:cut] if part == "train" else text[cut:]
    chunks, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.endswith(":"):
            current = []
            continue
        current.append(line)
        if sum(map(len, current)) >= 60:
            chunks.append(" ".join(current))
            current = []
    return chunks


def splits() -> dict:
    wiki, shake = wiki_sentences("valid"), shakespeare_chunks("train")
    n, c = N_PROMPTS, 400
    return {"source": wiki[:n], "target": shake[:n], "held_source": wiki[n:2 * n], "held_target": shake[n:2 * n],
            "clf_wiki": wiki[2 * n:2 * n + c], "clf_shake": shake[2 * n:2 * n + c]}


# -- the style classifier: logistic regression on hashed character 1-4-grams ----------------------------------------
DIM = 1 << 14


def features(texts: list[str]):
    import zlib

    import torch

    x = torch.zeros(len(texts), DIM)
    for i, t in enumerate(texts):
        t = f" {t.lower()} "
        for n in (1, 2, 3, 4):
            for j in range(len(t) - n + 1):
                x[i, zlib.crc32(t[j:j + n].encode()) % DIM] += 1
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-6)


def train_classifier(data: dict):
    """(weights, bias, held-out accuracy): Shakespeare = 1, WikiText = 0; the last fifth of each side is held out."""
    import torch

    torch.manual_seed(0)
    wiki, shake = data["clf_wiki"], data["clf_shake"]
    k = min(len(wiki), len(shake)) * 4 // 5
    wiki, shake = wiki[:k * 5 // 4], shake[:k * 5 // 4]
    x = features(wiki[:k] + shake[:k])
    y = torch.cat([torch.zeros(k), torch.ones(k)])
    w = torch.zeros(DIM, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt = features(wiki[k:] + shake[k:])
    yt = torch.cat([torch.zeros(len(wiki) - k), torch.ones(len(shake) - k)])
    acc = (((xt @ w + b) > 0).float() == yt).float().mean().item()
    return w.detach(), b.detach(), acc


# -- evaluation --------------------------------------------------------------------------------------------------------
def ppl(model, tok, text: str) -> float:
    import math

    import torch

    ids = tok(text, return_tensors="pt").input_ids[0][: PPL_WINDOWS * PPL_LEN].view(PPL_WINDOWS, PPL_LEN)
    with torch.no_grad():
        loss = sum(model(input_ids=ids[i:i + 8], labels=ids[i:i + 8]).loss.item() for i in range(0, PPL_WINDOWS, 8))
    return round(math.exp(loss / (PPL_WINDOWS // 8)), 3)


def continuations(model, tok) -> list[str]:
    import torch

    torch.manual_seed(SEED)
    out = []
    for prompt in NEUTRAL:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_p=0.95, max_new_tokens=GEN_TOKENS, num_return_sequences=GEN_SAMPLES,
                                 pad_token_id=tok.eos_token_id)
        out += [tok.decode(g[ids.shape[1]:], skip_special_tokens=True) for g in gen]
    return out


def evaluate(model, tok, data: dict, clf) -> dict:
    import torch

    from hf_compress.methods.lineas.loss import lineas_loss
    from hf_compress.methods.lineas.train import encode_prompts, pooled_activations

    w, b, _ = clf
    shake_held = "\n".join(shakespeare_chunks("held"))
    wiki_test = "\n".join(wiki_sentences("test"))
    t0 = time.perf_counter()
    texts = continuations(model, tok)
    p = torch.sigmoid(features(texts) @ w + b)
    result = {"ppl_shakespeare": ppl(model, tok, shake_held), "ppl_wikitext": ppl(model, tok, wiki_test),
              "style_p_shakespeare": round(p.mean().item(), 4), "style_frac_shakespeare": round((p > 0.5).float().mean().item(), 4),
              "examples": texts[:4]}
    if hasattr(model, "set_strength"):  # the held-out W2: steered source vs base target
        s_ids, s_mask = encode_prompts(tok, data["held_source"], MAX_LEN)
        t_ids, t_mask = encode_prompts(tok, data["held_target"], MAX_LEN)
        source = pooled_activations(model, s_ids, s_mask)
        strength = model.get_strength()
        model.set_strength(0.0)
        target = pooled_activations(model, t_ids, t_mask)
        base_source = pooled_activations(model, s_ids, s_mask)
        model.set_strength(strength)
        result["heldout_w2"] = round(lineas_loss(source, target).item(), 3)
        result["heldout_w2_base"] = round(lineas_loss(base_source, target).item(), 3)
    result["eval_s"] = round(time.perf_counter() - t0, 1)
    return result


def run_row(row: str) -> dict:
    import torch
    from peft import PeftModel, get_peft_model

    from hf_compress.methods.lineas import LineasConfig, fit_mean_shift, train_lineas
    from hf_compress.models import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = splits()
    model, tok = load_model(None)
    model.eval()
    name, _, strength = row.partition("@")
    if name.startswith("train_"):
        return {"row": row, **train_row(model, tok, data, name.removeprefix("train_"))}
    if name == "speed":
        return {"row": row, **speed_row(model, tok, data)}
    clf = train_classifier(data)
    if name == "base":
        return {"row": row, **evaluate(model, tok, data, clf), "classifier_acc": round(clf[2], 4)}
    if name in ADAPTERS:
        if not (ADAPTERS[name] / "adapter_model.safetensors").is_file():
            sys.exit(f"run the train_{name} row first")
        peft = PeftModel.from_pretrained(model, ADAPTERS[name])
        fit_s = None
    else:
        peft = get_peft_model(model, LineasConfig())
        t0 = time.perf_counter()
        fit_mean_shift(peft, tok, data["source"], data["target"], max_length=MAX_LEN, micro_batch=N_PROMPTS,
                       sequential=name == "mean_shift")
        fit_s = round(time.perf_counter() - t0, 1)
    peft.eval()
    peft.set_strength(float(strength))
    return {"row": row, "fit_s": fit_s, **evaluate(peft, tok, data, clf)}


def train_row(model, tok, data: dict, name: str) -> dict:
    """Train LinEAS (``name == "lineas_sparse"``: with l1_penalty at the L1_QUANTILE of the initial gradients)."""
    import torch
    from peft import get_peft_model

    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.lineas import LineasConfig, lineas_layers, train_lineas
    from hf_compress.methods.lineas.train import loss_gradients

    peft = get_peft_model(model, LineasConfig())
    l1 = 0.0
    if name == "lineas_sparse":
        grads = loss_gradients(peft, tok, data["source"], data["target"], max_length=MAX_LEN, micro_batch=N_PROMPTS)
        l1 = torch.quantile(grads, L1_QUANTILE).item()
        peft = get_peft_model(peft.unload(), LineasConfig(l1_penalty=l1))
    t0 = time.perf_counter()
    history = train_lineas(peft, tok, data["source"], data["target"], steps=STEPS, lr=LR, max_length=MAX_LEN,
                           micro_batch=N_PROMPTS)
    seconds = time.perf_counter() - t0
    save_pretrained(peft, ADAPTERS[name], overwrite=True)
    layers = lineas_layers(peft)
    moved = sum(int(((l.lineas_omega["default"] != 1) | (l.lineas_bias["default"] != 0)).sum()) for l in layers)
    width = sum(l.dim for l in layers)
    return {"train_s": round(seconds, 1), "s_per_step": round(seconds / STEPS, 2), "steps": STEPS, "lr": LR,
            "l1_penalty": l1, "coordinates_moved": moved, "coordinates": width,
            "loss": [round(v, 3) for v in history["loss"]], "final_loss": round(history["final_loss"], 3),
            "params": sum(p.numel() for p in peft.parameters() if p.requires_grad)}


def speed_row(model, tok, data: dict) -> dict:
    """The steered forward's cost against the unsteered model, interleaved in one process (median of repeats).

    The same module steers at strength 1 and, inside ``disable_adapter()``, runs the base path, so both rows share
    weights, threads and cache state; only the per-layer affine maps differ.
    """
    import statistics

    import torch
    from peft import PeftModel

    if not (ADAPTERS["lineas"] / "adapter_model.safetensors").is_file():
        sys.exit("run the train_lineas row first")
    peft = PeftModel.from_pretrained(model, ADAPTERS["lineas"]).eval()
    peft.set_strength(1.0)
    text = " ".join(data["target"] + data["source"])
    ids = tok(text, return_tensors="pt").input_ids[:, :SPEED_PROMPT]

    def forward():
        peft(input_ids=ids)

    def generate():
        peft.generate(input_ids=ids[:, :16], max_new_tokens=SPEED_NEW, min_new_tokens=SPEED_NEW, do_sample=False)

    times = {(kind, steered): [] for kind in ("forward", "generate") for steered in (False, True)}
    with torch.no_grad():
        for _ in range(SPEED_REPEATS):
            for kind, fn in (("forward", forward), ("generate", generate)):
                for steered in (False, True):
                    t0 = time.perf_counter()
                    if steered:
                        fn()
                    else:
                        with peft.disable_adapter():
                            fn()
                    times[(kind, steered)].append(time.perf_counter() - t0)
    median = {f"{kind}_{'steered' if s else 'base'}_s": round(statistics.median(v), 4) for (kind, s), v in times.items()}
    return {**median, "repeats": SPEED_REPEATS, "prompt_tokens": int(ids.shape[1]), "new_tokens": SPEED_NEW}


LABELS = {"base": "unsteered", "mean_shift": "mean shift, sequential (local)",
          "mean_shift_independent": "mean shift, independent (local)", "lineas": "LinEAS (end to end)",
          "lineas_sparse": "LinEAS + ℓ1 (sparse)"}


def write_results(results: dict) -> None:
    train = results.get("train_lineas")
    sparse = results.get("train_lineas_sparse")
    base = results.get("base")
    lines = [TITLE, "",
             f"Command: `python benchmarks/steering.py` · {platform.machine()}, {os.cpu_count()} CPU cores (1 thread, "
             f"shared with other jobs) · torch {_version('torch')}, transformers {_version('transformers')}, peft "
             f"{_version('peft')} · {measured_on(results) if results else 'not run'}", "",
             f"Model: SmolLM2-135M-Instruct (fp32; the only SmolLM2 copy on this machine — the issue names the base "
             f"SmolLM2-135M). Steered: the output of every `post_attention_layernorm` (30 modules, 34,560 "
             f"parameters). Training: {N_PROMPTS} WikiText-2 valid sentences → {N_PROMPTS} TinyShakespeare speech "
             f"chunks, unpaired, ≤ {MAX_LEN} tokens each; LinEAS {STEPS} Adam steps, lr {LR} cosine, batch = all "
             "prompts, no sparsity penalty. Evaluation on held-out text only (see the script's docstring): "
             f"perplexity over {PPL_WINDOWS} × {PPL_LEN} tokens of the last 20 % of TinyShakespeare (measure b) and of "
             f"WikiText-2 test (the cost on neutral text); a char 1-4-gram logistic-regression "
             f"style classifier (held-out accuracy {base['classifier_acc'] if base else 'n/a'}) on "
             f"{len(NEUTRAL) * GEN_SAMPLES} sampled {GEN_TOKENS}-token continuations of {len(NEUTRAL)} neutral prompts "
             "(same seed for every row); held-out W2 = the LinEAS loss between 32 other WikiText sentences through the "
             "steered model and 32 other Shakespeare chunks through the base (unsteered value in brackets).", ""]
    if train:
        lines += [f"LinEAS training: {train['steps']} steps in {train['train_s']} s wall-clock ({train['s_per_step']} s/step, "
                  f"1 thread on the shared machine); loss {train['loss'][0]} → {train['final_loss']} (curve: `benchmarks/steering.png`).", ""]
    if sparse:
        lines += [f"Sparse LinEAS: l1_penalty = {sparse['l1_penalty']:.3g} (the {L1_QUANTILE} quantile of |∂C/∂(ω, b)| "
                  f"at the identity, `loss_gradients`), same steps and lr: loss {sparse['loss'][0]} → "
                  f"{sparse['final_loss']}, {sparse['coordinates_moved']:,} of the {sparse['coordinates']:,} coordinates "
                  f"have ω ≠ 1 or b ≠ 0 (dense run: {_moved(ADAPTERS['lineas'])}), {sparse['train_s']} s.", ""]
    lines += ["| steering | strength | held-out Shakespeare PPL | WikiText-2 PPL (cost) | P(Shakespeare) of continuations | "
              "continuations classed Shakespeare | held-out W2 (base) |", "|---|---|---|---|---|---|---|"]
    for row in TABLE_ORDER:
        name, _, strength = row.partition("@")
        r = results.get(row)
        if r is None:
            lines.append(f"| {LABELS[name]} | {strength or '—'} | not measured (row not run) | | | | |")
            continue
        w2 = f"{r['heldout_w2']} ({r['heldout_w2_base']})" if "heldout_w2" in r else "—"
        lines.append(f"| {LABELS[name]} | {strength or '—'} | {r['ppl_shakespeare']:.1f} | {r['ppl_wikitext']:.1f} | "
                     f"{r['style_p_shakespeare']} | {r['style_frac_shakespeare']:.0%} | {w2} |")
    lines += _reading(results)
    speed = results.get("speed")
    if speed:
        lines += ["", f"Speed (row `speed`: steered at strength 1 vs the same model inside `disable_adapter()`, interleaved, "
                      f"median of {speed['repeats']}, 1 thread): forward over {speed['prompt_tokens']} tokens "
                      f"{speed['forward_base_s']} s → {speed['forward_steered_s']} s "
                      f"({speed['forward_steered_s'] / speed['forward_base_s']:.3f}×); greedy generation of "
                      f"{speed['new_tokens']} tokens {speed['generate_base_s']} s → {speed['generate_steered_s']} s "
                      f"({speed['generate_steered_s'] / speed['generate_base_s']:.3f}×)."]
    examples = [(row, results[row]["examples"][0]) for row in ("base", "mean_shift@1", "lineas@1") if row in results]
    if examples:
        lines += ["", "First sampled continuation of \"The\" per row: " + "; ".join(
            f"{LABELS[row.split('@')[0]]}: “{' '.join(text.split())[:120]}”" for row, text in examples)]
    write_section(TITLE, "\n".join(lines) + "\n")
    if train:
        plot(train, sparse)


def _moved(folder: Path) -> str:
    """Coordinates with ω ≠ 1 or b ≠ 0 in a saved adapter, read from its file."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return "adapter not on disk"
    from safetensors.torch import load_file

    t = load_file(path)
    keys = [k for k in t if k.endswith("lineas_omega")]
    moved = sum(int(((t[k] != 1) | (t[k.replace("omega", "bias")] != 0)).sum()) for k in keys)
    return f"{moved:,} of {sum(t[k].numel() for k in keys):,}"


def _reading(results: dict) -> list[str]:
    """How to read the table, with the numbers it rests on (only for rows that were measured)."""
    base, lin, shift = results.get("base"), results.get("lineas@1"), results.get("mean_shift@1")
    out = [""]
    if base and lin:
        out.append(f"- Held-out Shakespeare PPL rises in every steered row measured ({base['ppl_shakespeare']:.1f} → "
                   f"{lin['ppl_shakespeare']:.1f} for LinEAS at strength 1), so measure (b) does not show the shift "
                   "here. A likely reason (not tested further): the maps are unconditional, fitted to move WikiText "
                   "activations, and applied to text that is already Shakespeare they push it past the target. The "
                   "shift shows in the style of continuations of neutral prompts and in the held-out W2.")
        out.append(f"- The classifier already calls {base['style_frac_shakespeare']:.0%} of the unsteered model's "
                   "continuations Shakespeare (it was trained on full sentences and speech chunks; the continuations "
                   "are 24 tokens of chat-model prose), and it checks style, not fluency: read it together with the "
                   "WikiText PPL.")
    if shift and lin:
        out.append(f"- The mean shift at strength 1 matches every module's pooled mean on the training prompts exactly, "
                   f"yet breaks the model (WikiText PPL {shift['ppl_wikitext']:.0f}, degenerate repetitions — the "
                   f"classifier's {shift['style_frac_shakespeare']:.0%} is scored on garbage); LinEAS's end-to-end "
                   f"fit ends at held-out W2 {lin['heldout_w2']} (mean shift: {shift['heldout_w2']}) with WikiText "
                   f"PPL {lin['ppl_wikitext']:.1f} (unsteered: {base['ppl_wikitext'] if base else 'n/a'}): a closer match of pooled "
                   "means is not a better model.")
    half, indep = results.get("lineas@0.5"), results.get("mean_shift_independent@1")
    if half and shift and indep:
        out.append(f"- At strength 0.5 LinEAS moves the continuations as far as the sequential mean shift at strength 1 "
                   f"({half['style_frac_shakespeare']:.0%} vs {shift['style_frac_shakespeare']:.0%} classed Shakespeare) "
                   f"at WikiText PPL {half['ppl_wikitext']:.1f} instead of {shift['ppl_wikitext']:.0f}, and further "
                   f"than the independent mean shift ({indep['style_frac_shakespeare']:.0%} at PPL "
                   f"{indep['ppl_wikitext']:.1f}). LinEAS's strength knob trades style for cost monotonically (0.5 → 1 → 1.5).")
    sparse = results.get("lineas_sparse@1")
    train = results.get("train_lineas_sparse")
    if sparse and half and train:
        out.append(f"- Sparse LinEAS moves {train['coordinates_moved'] / train['coordinates']:.1%} of the coordinates; "
                   f"at strength 1 it reaches {sparse['style_frac_shakespeare']:.0%} at WikiText PPL "
                   f"{sparse['ppl_wikitext']:.1f}, against dense LinEAS at 0.5: {half['style_frac_shakespeare']:.0%} at "
                   f"{half['ppl_wikitext']:.1f} — in this one 40-step run sparsity did not buy a better trade-off.")
    return out


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def plot(train: dict, sparse: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(train["loss"])), train["loss"], label="LinEAS")
    if sparse:
        ax.plot(range(len(sparse["loss"])), sparse["loss"], label=f"LinEAS + ℓ1 ({sparse['l1_penalty']:.2g})")
    ax.legend()
    ax.set_xlabel("step"), ax.set_ylabel("Σ per-coordinate W2² over 30 modules")
    ax.set_yscale("log")
    ax.set_title("LinEAS, SmolLM2-135M: WikiText → Shakespeare")
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "steering.png", dpi=110)


if __name__ == "__main__":
    main(ROWS, CACHE, run_row, write_results)

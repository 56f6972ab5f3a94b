"""Training methods under DDP (issue 20, item 5): LISA and relaxed-LoRA uptraining through ``transformers.Trainer``
in two CPU processes (gloo; ``torchrun`` and ``accelerate launch``) with per-device batch B/2 give the one-process
run with batch B — same data, same seed — and every rank trains the same LISA layers.

Tolerance. Both runs see the same 4 sequences per step (accelerate shards each global batch: rank 0 gets its first
half, rank 1 the second); the DDP gradient is the mean of the two half-batch gradients, equal to the one-batch
gradient up to float32 summation order (~1e-7 relative). AdamW turns a gradient into a step of at most about ``lr``
per weight whatever its scale, so a real divergence (another batch, another layer trained on one rank, a lost
step) moves weights by about the update itself, O(lr) = 1e-3 here (per-rank LISA seeds: 2.6e-3 between the
replicas); summation order changes a step only where a gradient component nearly cancels (measured after 6 steps:
at most 5e-6 for LISA, 1e-5 = 0.01 lr for relaxed LoRA, in an embedding row). We allow 0.05 lr and check that the
weights moved by more than 0.5 lr, so the comparison can fail. Logged losses (forward only) agree to 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env

LR = 1e-3
STEPS, BATCH = 6, 4
TOL = 0.05 * LR
MIN_UPDATE = 0.5 * LR

SCRIPT = r'''
import json, os, sys
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

repo, out, method = sys.argv[1:4]
per_device, lisa_seeds = int(sys.argv[4]), json.loads(sys.argv[5])
sys.path.insert(0, os.path.join(repo, "tests"))
from conftest import tiny_llama
from hf_compress.methods.lisa import LisaCallback
from hf_compress.methods.lisa.callback import optimizer_state_numel

torch.set_num_threads(1)
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(1))
data = [{"input_ids": x, "labels": x} for x in ids]


class Record(TrainerCallback):
    def __init__(self):
        self.state_numel = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.state_numel.append(optimizer_state_numel(optimizer))


record, extra = Record(), {}
common = dict(use_cpu=True, report_to=[], max_steps=__STEPS__, per_device_train_batch_size=per_device,
              learning_rate=__LR__, logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
if method in ("lisa", "lisa-peft"):
    torch.manual_seed(0)  # tiny_llama's shape, four layers so that the sampling has a choice
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=256))
    seed = None if lisa_seeds is None else lisa_seeds[rank]
    if method == "lisa-peft":  # the PEFT method, driven by the argument-free callback
        from peft import get_peft_model
        from hf_compress.methods.lisa import LisaConfig

        model = get_peft_model(model, LisaConfig(num_active_layers=2, interval_steps=2, seed=seed))
        lisa = LisaCallback()
    else:
        lisa = LisaCallback(num_active_layers=2, interval_steps=2, seed=seed)
    callbacks, trainer_cls = [record, lisa], Trainer
    # default ddp_find_unused_parameters (None: True without checkpointing), as a user would leave it
    args = TrainingArguments(out + ".trainer", save_strategy="steps", save_steps=__STEPS__, save_only_model=True,
                             **common)
else:
    from hf_compress.methods.recursive import RecursiveUptrainer, convert, relax, save_relaxed

    original = tiny_llama()  # 2 layers -> 1 shared block x 2 loops: the block's weights are used twice per forward
    model = relax(convert(original, num_loops=2, init="average", tie_norms=False), original, ranks=4, progress=False)
    callbacks, trainer_cls, extra = [record], RecursiveUptrainer, {"teacher": original, "distill_weight": 1.0}
    # every parameter is used in every step: DDP can skip the search for unused ones
    args = TrainingArguments(out + ".trainer", save_strategy="no", ddp_find_unused_parameters=False, **common)
named = model.get_base_model().named_parameters if method == "lisa-peft" else model.named_parameters
if rank == 0:
    save_file({n: p.detach().clone().contiguous() for n, p in named()}, out + ".before.safetensors")
trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=callbacks, **extra)
trainer.train()
if method == "relaxed":
    save_relaxed(model, out + ".saved")  # on every rank, as a training script does: only the main process writes
state = {n: p.detach().clone().contiguous() for n, p in named()}
save_file(state, f"{out}.rank{rank}.safetensors")
report = {"world": world, "args_world": trainer.args.world_size, "state_numel": record.state_numel,
          "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
          "history": lisa.history if method != "relaxed" else None}
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(report, f)
'''.replace("__STEPS__", str(STEPS)).replace("__LR__", repr(LR))


def train(tmp_path, name, method, processes, launcher="torchrun", lisa_seeds=None):
    """Run the script in ``processes`` processes with per-device batch BATCH / processes; per-rank results."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    if processes == 1:
        command = [sys.executable]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    else:  # `--cpu --num_processes 2` would need MPI; `--multi_gpu` is torchrun underneath, gloo with use_cpu=True
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / name
    done = subprocess.run([*command, str(script), str(REPO), str(out), method, str(BATCH // processes),
                           json.dumps(lisa_seeds)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(PYTHONPATH=str(REPO)))  # the checkout's hf_compress, not an install
    assert done.returncode == 0, done.stderr[-4000:]
    runs = []
    for rank in range(processes):
        report = json.loads((tmp_path / f"{name}.rank{rank}.json").read_text())
        assert report["world"] == report["args_world"] == processes, report
        report["weights"] = load_file(tmp_path / f"{name}.rank{rank}.safetensors")
        runs.append(report)
    runs[0]["before"] = load_file(tmp_path / f"{name}.before.safetensors")  # the initial weights
    return runs, done.stderr


@pytest.fixture(scope="module")
def lisa_one_process(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lisa1")
    (single,), _ = train(tmp_path, "single", "lisa", 1)
    return single




def assert_same_training(single, ranks):
    """Same start; replicas identical; weights and losses those of the one-process run (module docstring)."""
    before, first = single["before"], ranks[0]["weights"]
    assert before.keys() == ranks[0]["before"].keys()
    assert all(torch.equal(before[k], ranks[0]["before"][k]) for k in before)
    for other in ranks[1:]:  # DDP keeps the replicas in lockstep: same averaged gradient, same optimizer
        assert other["weights"].keys() == first.keys()
        for key, value in first.items():
            assert torch.equal(other["weights"][key], value), f"replicas differ at {key}"
    assert first.keys() == single["weights"].keys()
    moved = max(float((single["weights"][k] - before[k]).abs().max()) for k in before)
    assert moved > MIN_UPDATE, f"training barely moved the weights ({moved:.2e}); the comparison would be vacuous"
    worst, where = max((float((first[k] - single["weights"][k]).abs().max()), k) for k in first)
    assert worst <= TOL, f"DDP and one-process weights differ by {worst:.2e} at {where} (tolerance {TOL:.0e})"
    assert len(single["losses"]) == STEPS
    for r in ranks:
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=0)
        assert r["state_numel"] == single["state_numel"], "optimizer state differs from the one-process run"


def test_lisa_two_processes_match_one_process(tmp_path, lisa_one_process):
    ranks, _ = train(tmp_path, "ddp", "lisa", 2)
    before = ranks[0]["before"]
    # the sampling: identical on both ranks, and the one-process schedule
    assert ranks[0]["history"] == ranks[1]["history"] == lisa_one_process["history"]
    assert [step for step, _ in ranks[0]["history"]] == [0, 2, 4]
    assert_same_training(lisa_one_process, ranks)
    # frozen layers stayed put on every rank: only the layers sampled at some point moved
    layers_moved = {int(k.split(".")[2]) for k in before if k.startswith("model.layers.")
                    and not torch.equal(ranks[0]["weights"][k], before[k])}
    assert layers_moved == {i for _, layers in ranks[0]["history"] for i in layers}
    # the checkpoint (written by rank 0 only) records the layers every rank trained last
    saved = json.loads((tmp_path / "ddp.trainer" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["LisaCallback"]["attributes"]["active_layers"] == ranks[1]["history"][-1][1]


def test_lisa_peft_two_processes_match_the_bare_one_process_run(tmp_path, lisa_one_process):
    """The PEFT path (get_peft_model + LisaCallback()) under torchrun: the bare callback's one-process run, on both
    ranks; its checkpoint is the adapter, written once."""
    ranks, _ = train(tmp_path, "peft", "lisa-peft", 2)
    assert ranks[0]["history"] == ranks[1]["history"] == lisa_one_process["history"]
    assert_same_training(lisa_one_process, ranks)
    assert (tmp_path / "peft.trainer" / f"checkpoint-{STEPS}" / "adapter_model.safetensors").is_file()


def test_lisa_per_rank_seeds_follow_rank_0(tmp_path, lisa_one_process):
    """A per-rank seed must not make the ranks train different layers: without the agreement DDP neither hangs
    nor raises, the replicas silently drift apart (and frozen layers get optimizer state)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_compress.methods.lisa import LisaSchedule

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=128))
    own = [[LisaSchedule(model, num_active_layers=2, interval_steps=2, seed=s).layers_for_step(step)
            for step in range(0, STEPS, 2)] for s in (0, 2)]
    assert all(a != b for a, b in zip(*own)), "rank 1's own seed would sample some of rank 0's layer sets; pick another"
    ranks, stderr = train(tmp_path, "seeds", "lisa", 2, lisa_seeds=[0, 2])
    assert ranks[0]["history"] == ranks[1]["history"] == lisa_one_process["history"]
    assert_same_training(lisa_one_process, ranks)
    assert "different sampling seeds ([0, 2])" in stderr  # and the user is told


def test_relaxed_lora_uptraining_under_accelerate_launch_matches_one_process(tmp_path):
    """RecursiveUptrainer (distilling the original) on a relaxed recursive model whose shared block is used twice
    per forward; both ranks call ``save_relaxed`` on the same folder, as a training script would."""
    (single,), _ = train(tmp_path, "single", "relaxed", 1)
    ranks, _ = train(tmp_path, "ddp", "relaxed", 2, launcher="accelerate")
    trained = single["weights"].keys()
    assert any(".lora_A." in k for k in trained) and any(".base_layer." in k for k in trained)
    assert_same_training(single, ranks)
    for part in ("model.safetensors", "relaxed_lora/adapter_model.safetensors"):
        one, two = (load_file(tmp_path / f"{run}.saved" / part) for run in ("single", "ddp"))
        assert one.keys() == two.keys() and one
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert worst <= TOL, f"{part}: saved DDP and one-process weights differ by {worst:.2e}"
    assert not list(tmp_path.glob(".ddp.saved*")), "a staging folder was left behind"


@pytest.mark.parametrize("command", ["lisa", "recursive"])
def test_method_commands_under_torchrun_save_once(tmp_path, command):
    """``hf-compress lisa | recursive`` under torchrun: every rank trains, rank 0 alone writes OUT (two ranks
    staging the same folder failed: "moving the new files in failed (Directory not empty)", "…tmp has neither
    config.json nor adapter_config.json")."""
    from conftest import save_char_tokenizer, tiny_llama

    tiny_llama().save_pretrained(tmp_path / "model")
    save_char_tokenizer(tmp_path / "model")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
    ids = torch.randint(0, len(words), (600,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "train.txt").write_text(" ".join(words[i] for i in ids))
    out = tmp_path / "out"
    extra = (["--num-active-layers", "1", "--interval-steps", "1", "--steps", "2"] if command == "lisa"
             else ["--relax-rank", "4", "--uptrain-steps", "2"])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hf_compress.cli.commands", command, str(tmp_path / "model"), "--out", str(out),
                           "--dataset", str(tmp_path / "train.txt"), "--batch-size", "2", "--seq-len", "32",
                           "--lr", "1e-3", *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(PYTHONPATH=str(REPO)))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "train.txt"], "staging left behind"
    if command == "lisa":
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(out)
        assert not torch.equal(trained.get_input_embeddings().weight, tiny_llama().get_input_embeddings().weight)
    else:
        from peft import AutoPeftModelForCausalLM

        trained = AutoPeftModelForCausalLM.from_pretrained(out / "relaxed_lora")
    with torch.no_grad():
        assert torch.isfinite(trained(torch.tensor([ids[:16]])).logits).all()


def test_lisa_seed_outside_int64_is_refused():
    """The ranks agree on the seed through an int64 collective: a larger one is a clear error up front."""
    from hf_compress.methods.lisa import LisaConfig
    from hf_compress.methods.lisa.callback import seed_agreed_across_ranks

    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        LisaConfig(seed=2**63)
    assert LisaConfig(seed=2**63 - 1).seed == 2**63 - 1
    assert seed_agreed_across_ranks(12345) == 12345  # no process group: the seed itself

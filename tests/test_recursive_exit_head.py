"""Learned early exit for recursive models: the DeeDiff-style loss trains, the real-exit decoder matches a full
forward when nothing exits, and an exit really skips the later loops."""

from __future__ import annotations

import torch
from test_recursive import IDS, tiny_llama4

from hf_compress.methods.recursive import convert
from hf_compress.methods.recursive.exit_head import (LoopExitHead, exit_generate, head_rule, layerwise_exit_loss,
                                                     max_prob_rule, teacher_forced_exits)


def _recursive():
    return convert(tiny_llama4(), num_loops=2, init="average").eval()


def test_decoder_without_exits_equals_full_forward():
    model = _recursive()
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=IDS).logits[0, :-1].float(), -1)
    expected = float(-full.gather(-1, IDS[0, 1:, None]).mean())
    ce, exits = teacher_forced_exits(model, IDS[0], head_rule(None, 0.5))
    assert exits == [2] * (IDS.shape[1] - 1)
    assert abs(ce - expected) < 1e-4


def test_exits_skip_later_loops_and_still_fill_the_cache():
    model = _recursive()
    ce, exits = teacher_forced_exits(model, IDS[0], max_prob_rule(1e-6))  # every token exits after loop 1
    assert exits == [1] * (IDS.shape[1] - 1) and ce == ce
    ids, gen_exits = exit_generate(model, IDS[:, :4], 5, max_prob_rule(1e-6))
    assert ids.shape == (1, 9) and gen_exits == [1] * 5
    calls = []
    handle = model.model.layers[3].mlp.register_forward_hook(lambda *a: calls.append(1))
    teacher_forced_exits(model, IDS[0, :3], max_prob_rule(1e-6))
    handle.remove()
    assert not calls  # loop 2's MLPs never ran


def test_layerwise_exit_loss_trains_head_and_model():
    model = _recursive().train()
    head = LoopExitHead.for_model(model)
    assert len(head.probes) == 1
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = IDS.repeat(2, 1)
    first = None
    for _ in range(8):
        loss, parts = layerwise_exit_loss(model, head, ids)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        assert head.probes[0].weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
        opt.step()
        opt.zero_grad()
    assert float(loss) < first and {"ce_last", "ce_loop1", "bce_loop1"} <= parts.keys()

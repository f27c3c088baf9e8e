"""Joint training (trainer.joint): the score loss, on item states pooled from phase 1's own forward pass,
reaches the LoRA weights; a few real LoRA steps on a tiny generated log."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stream.core.trends import TrendConfig
from tests.odd_log import write_odd_log
from trainer.fit import FitConfig, fit_normalisation, load_parts, sample_batch, train_step
from trainer.inference import item_texts_of, prompts_of
from trainer.joint import ScoreProbe, item_line_lengths, pooled_item_states
from trainer.model import TrailConfig, build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache_dir):
    torch.manual_seed(0)
    path = write_odd_log(tmp_path_factory.mktemp("log") / "shop.csv", days=56, items=12)
    trend = TrendConfig()
    parts = load_parts([str(path)], None, trend, cache_dir=cache_dir)
    model = build(TrailConfig(lora_layers=2), fit_normalisation(parts, list(trend.signal_names)), cache_dir=cache_dir)
    return model, parts


def _lora(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.lm.named_parameters() if "lora_" in n and p.requires_grad}


def _batch(model, parts, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(50):  # a batch whose items have unequal gains: the ranking part has pairs
        part, rows = sample_batch(parts, rng, 4)
        if rows["label_gain"].nunique() > 1:
            return part, rows, rng
    raise AssertionError("the tiny log gave no batch with a ranking pair")


def test_the_pooled_item_line_is_the_item_state(tiny):
    # the same forward pass as the explanation gives the item state of the item line alone (causal attention)
    model, parts = tiny
    model.eval()
    rows = parts[0].train.drop_duplicates("item_id").head(3)
    prompts = prompts_of(rows, list(model.norm.signal_names), parts[0].horizon_days)
    ids, mask, _, _ = model.encode_pairs(prompts, ["Up 2 events."] * len(prompts))
    with torch.no_grad():
        pooled = pooled_item_states(model.hidden(ids, mask), item_line_lengths(model, prompts, ids))
        alone = model.item_state(*model.encode_items(item_texts_of(rows)[1]))  # no description: the line is the block
    assert torch.allclose(pooled, alone, atol=1e-4)


def test_the_score_term_alone_moves_the_adapter(tiny):
    model, parts = tiny
    model.train()
    lora = _lora(model)
    probe = ScoreProbe(model)
    only_score = replace(FitConfig(), w_lm=0.0, w_contrast=0.0, w_score=1.0, negatives=0)
    part, rows, rng = _batch(model, parts, 0)

    # control: without the score term (and no LM/contrast weight) nothing reaches the adapter
    model.zero_grad()
    train_step(model, part, rows, replace(only_score, w_score=0.0), np.random.default_rng(0))
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in lora.values())

    model.zero_grad()
    losses = train_step(model, part, rows, only_score, rng, probe)
    assert losses["score"] > 0 and losses["score_rank"] > 0 and losses["lm"] > 0  # lm computed, weighted 0
    grads = {n: float(p.grad.abs().sum()) for n, p in lora.items() if p.grad is not None}
    assert any(g > 0 for g in grads.values()), "the score loss did not reach the LoRA"
    # a fresh LoRA's B is zero, so its gradient is where the score term first lands
    assert any(g > 0 for n, g in grads.items() if "lora_B" in n)

    before = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.AdamW(list(lora.values()) + list(probe.parameters()), lr=1e-3)
    opt.step()  # a real step on the score term alone
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in lora.items())
    assert moved > 0, "the adapter did not change"
    model.zero_grad()
    model.eval()

"""Joint training (issue 19.3): the popularity loss reaches the LoRA in phase 1.

Phase 1 already runs the LLM over prompt + explanation for a batch of one cut-off's items. The
prompt's first line is the item line ("Item: <title> (<category>)", `stream.core.prompts`), and
under causal attention its hidden states depend on that line alone: pooled as the item state is
(mean of the last hidden layer, BOS excluded), they are the state of the item's title and category,
taken from the same forward pass as the explanation. A small score probe reads that state and
the trend signals; its loss backpropagates through the pooled states into the adapter, so the
states phase 2 encodes are shaped by what predicts popularity, not only by what writes
explanations. The probe is phase 1's alone: phase 3 trains the score head from zero on the
re-encoded states, under the same early stopping on validation as before.

The score term (docs/model.md, "Joint training"):
  L_score = LambdaRank(x·prior + rank_probe(z, x); gains)      pairs: the batch's items of one cut-off
          + L1(count_probe(z, x), log1p(next-period count))
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model import ItemTerm, Trail, lambda_rank_loss


class ScoreProbe(nn.Module):
    """Phase 1's score on a batch: rank = x[decay] + rank_term(z, x); log_count = count_term(z, x).

    Unlike the head's zero-started residuals, the probe's last layers start random: a zero last
    layer would pass no gradient back to z, and the adapter would learn nothing from the score
    until the probe had moved. The ranking starts from the decayed count (the first `ema*` input),
    so the term learns what orders items beyond it."""

    def __init__(self, model: Trail) -> None:
        super().__init__()
        hidden, names = model.lm.config.hidden_size, list(model.norm.names)
        self.rank_term = ItemTerm(hidden, len(names), model.cfg, uses_x=True)
        self.count_term = ItemTerm(hidden, len(names), model.cfg, uses_x=True)
        for term in (self.rank_term, self.count_term):
            term.mlp[-1].reset_parameters()
        prior = torch.zeros(len(names))
        decays = [i for i, n in enumerate(names) if n == "ema" or n.startswith("ema_")]
        if decays:
            prior[decays[0]] = 1.0
        self.register_buffer("prior", prior)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ self.prior + self.rank_term(z, x), self.count_term(z, x)


def item_line_lengths(model: Trail, prompts: list[str], ids: torch.Tensor) -> torch.Tensor:
    """(B,) tokens of each prompt's item line (BOS included) at the start of its row of `ids`.

    The line is tokenised alone and matched against the row (the longest common prefix), so a
    merge across the line break could only shorten the span, never pool a signal token."""
    out = []
    for row, prompt in zip(ids[: len(prompts)].tolist(), prompts):
        line = model.tokenizer(prompt.split("\n", 1)[0]).input_ids[: model.cfg.max_prompt_tokens]
        n = 0
        while n < len(line) and line[n] == row[n]:
            n += 1
        out.append(n)
    return torch.tensor(out)


def pooled_item_states(hs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, H) mean of hs (B, T, H) over positions 1 .. lengths-1: the item line without the BOS,
    as `Trail.item_state` pools the item block."""
    pos = torch.arange(hs.shape[1]).unsqueeze(0)  # (1, T)
    pool = ((pos >= 1) & (pos < lengths.unsqueeze(1))).to(hs.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hs * pool).sum(dim=1) / pool.sum(dim=1).clamp(min=1.0)


def score_loss(model: Trail, probe: ScoreProbe, hs: torch.Tensor, ids: torch.Tensor, prompts: list[str],
               rows: pd.DataFrame, horizon_days: float, gain: str, rank_k: int) -> tuple[torch.Tensor, dict]:
    """L_score of one batch (its first len(prompts) rows of hs are the faithful prompt + explanation passes).

    Pairs: every two items of the batch (one cut-off) whose next-period gains differ, the larger
    gain the positive, weighted by |delta NDCG@rank_k| of swapping them (LambdaRank). A batch with no
    such pair (a sparse cut-off) contributes the count part only."""
    from trainer.inference import features_of

    B = len(prompts)
    z = pooled_item_states(hs[:B], item_line_lengths(model, prompts, ids))
    x = torch.from_numpy(features_of(model, rows, horizon_days))
    rank, log_count = probe(z, x)
    gains = torch.from_numpy(rows[gain].to_numpy(np.float32))
    loss_rank = lambda_rank_loss(rank, gains, k=rank_k)
    loss_count = F.l1_loss(log_count, torch.from_numpy(rows["label_log"].to_numpy(np.float32)))
    return loss_rank + loss_count, {"score_rank": loss_rank.item(), "score_count": loss_count.item()}

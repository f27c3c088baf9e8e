"""Scoring and explaining example frames with a trained TRAIL model (PyTorch path).

The LLM is the expensive part, so, as in the stream, it reads only the top
`top_n` candidates of each cut-off by the numeric branch (a cheap prior); the
others keep the numeric-branch score. Ranking metrics only look at the head of
the list, and the score of a low-ranked item barely moves with its text.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stream.core.prompts import render_prompt
from trainer.model import Trail


def season_of(cutoff_ms: int) -> str:
    return datetime.fromtimestamp(cutoff_ms / 1000, UTC).strftime("%b")


def prompts_of(frame: pd.DataFrame, signal_names: list[str], horizon_days: float) -> list[str]:
    values = frame[signal_names].to_numpy(np.float64)
    return [
        render_prompt(title, category, dict(zip(signal_names, row)), int(round(horizon_days)), item_id=item_id,
                      month=season_of(cutoff))
        for title, category, row, item_id, cutoff in zip(
            frame["title"], frame["category"], values.tolist(), frame["item_id"], frame["cutoff_ms"]
        )
    ]


def features_of(model: Trail, frame: pd.DataFrame, horizon_days: float) -> np.ndarray:
    """(N, S) normalised model input: the signals, then the horizon."""
    raw = frame[model.norm.names[:-1]].to_numpy(np.float64)
    raw = np.concatenate([raw, np.full((len(raw), 1), float(horizon_days))], axis=1)
    return model.norm.apply(raw)


@torch.no_grad()
def numeric_scores(model: Trail, frame: pd.DataFrame, horizon_days: float) -> np.ndarray:
    x = torch.from_numpy(features_of(model, frame, horizon_days))
    return model.head.numeric(x).squeeze(-1).numpy()


@torch.no_grad()
def score_frame(model: Trail, frame: pd.DataFrame, horizon_days: float, top_n: int = 100, batch: int = 32,
                progress: bool = True) -> np.ndarray:
    """Predicted log1p(next-period count) for every row: the LLM path for each cut-off's top_n."""
    model.eval()
    scores = numeric_scores(model, frame, horizon_days)
    chosen = (
        pd.Series(scores, index=frame.index).groupby(frame["cutoff_ms"].to_numpy()).nlargest(top_n).index.get_level_values(1)
    )
    rows = frame.loc[chosen]
    prompts = prompts_of(rows, model.norm.names[:-1], horizon_days)
    x_all = features_of(model, rows, horizon_days)
    out = np.empty(len(rows))
    for start in tqdm(range(0, len(rows), batch), desc="TRAIL scoring", unit="batch", disable=not progress):
        ids, mask = model.encode_prompts(prompts[start : start + batch])
        x = torch.from_numpy(x_all[start : start + batch])
        out[start : start + batch] = model.score(ids, mask, x).numpy()
    scores[frame.index.get_indexer(chosen)] = out
    return scores

"""Scoring and explaining example frames with a trained TRAIL model (PyTorch path).

v2 score (docs/model.md): the LLM encodes each item's text block once (`item_states_of`,
cached on disk per item), and the score head combines that state with the trend
signals for every row: every candidate gets the full score, as in the stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from stream.core.faithfulness.grammar import prompt_forecast
from stream.core.features import season_of
from stream.core.forecast import PredictedCount
from stream.core.prompts import item_text, render_prompt
from trainer.model import Trail

VARIANTS = ("full", "numeric", "shuffled")


def prompts_of(frame: pd.DataFrame, signal_names: Sequence[str], horizon_days: float,
               forecasts: Sequence[PredictedCount | None] | None = None) -> list[str]:
    """The prompt of each row; with `forecasts` (the model's prediction per row, or None) each shows its forecast."""
    signal_names = list(signal_names)
    values = frame[signal_names].to_numpy(np.float64)
    if forecasts is not None and len(forecasts) != len(frame):
        raise ValueError(f"{len(forecasts)} forecasts for {len(frame)} rows")
    out = []
    for i, (title, category, row, item_id, cutoff) in enumerate(zip(
            frame["title"], frame["category"], values.tolist(), frame["item_id"], frame["cutoff_ms"])):
        signals = dict(zip(signal_names, row))
        size = None if forecasts is None else forecasts[i]
        out.append(render_prompt(title, category, signals, int(round(horizon_days)), item_id=item_id,
                                 month=season_of(cutoff),
                                 forecast=None if size is None else prompt_forecast(size, signals, horizon_days)))
    return out


def features_of(model: Trail, frame: pd.DataFrame, horizon_days: float) -> np.ndarray:
    """(N, S) normalised model input: the signals, then the horizon (as the stream's of_signals)."""
    return model.norm.of_frame(frame, horizon_days)


def item_texts_of(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(row -> unique-item index (N,), the unique items' `item_text` blocks)."""
    cols = [c for c in ("item_id", "title", "category", "description") if c in frame.columns]
    items = frame[cols].drop_duplicates("item_id")
    index = pd.Index(items["item_id"]).get_indexer(frame["item_id"])
    descriptions = items["description"] if "description" in items else [None] * len(items)
    texts = [item_text(t, c, description=d if isinstance(d, str) else None, item_id=str(i))
             for i, t, c, d in zip(items["item_id"], items["title"], items["category"], descriptions)]
    return index, texts


def item_states_of(model: Trail, frame: pd.DataFrame, *, shuffle_seed: int | None = None, progress: bool = True,
                   batch: int = 64) -> np.ndarray:
    """(N, H) item state of each row (computed once per unique item, cached on disk by the model).

    With `shuffle_seed`, the states are permuted across the frame's unique items (the
    `trail_text_shuffled` ablation): every item gets another item's state, consistently."""
    index, texts = item_texts_of(frame)
    states = model.item_states(texts, batch=batch, progress=progress)
    if shuffle_seed is not None and len(states) > 1:
        perm = np.random.default_rng(shuffle_seed).permutation(len(states))
        states = states[perm]
    return states[index]


@torch.no_grad()
def numeric_scores(model: Trail, frame: pd.DataFrame, horizon_days: float) -> np.ndarray:
    """(N,) ranking score of the numeric part alone (no LLM): a cheap prior, e.g. to pick rows to explain."""
    x = torch.from_numpy(features_of(model, frame, horizon_days))
    return model.head.numeric_only(x)[0].numpy()


@torch.no_grad()
def score_frame(model: Trail, frame: pd.DataFrame, horizon_days: float, *, variant: str = "full", seed: int = 0,
                progress: bool = True, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(score (N,), log_count (N,)) float64 for every row of an examples frame.

    score ranks (higher = more popular next period); log_count is log1p(predicted count)
    (`stream.core.features.predicted_count(log_count)` is the count). variant:
    "full" = the model; "numeric" = the same head without the item terms (trail_numeric);
    "shuffled" = item states permuted across the frame's items with `seed` (trail_text_shuffled).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model.eval()
    x = torch.from_numpy(features_of(model, frame, horizon_days))
    if variant == "numeric":
        score, log_count = model.head.numeric_only(x)
        return score.double().numpy(), log_count.double().numpy()
    z = torch.from_numpy(item_states_of(model, frame, shuffle_seed=seed if variant == "shuffled" else None,
                                        progress=progress))
    score, log_count = np.empty(len(frame)), np.empty(len(frame))
    for start in range(0, len(frame), batch):
        s, c = model.head(x[start : start + batch], z[start : start + batch])
        score[start : start + batch], log_count[start : start + batch] = s.numpy(), c.numpy()
    return score, log_count

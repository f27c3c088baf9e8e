"""The `trail_bow` control (issue 19.4): the same model with a bag-of-words vector of the same item text in
place of the LLM's item state, so a gain of `trail` over it is what the LLM knows beyond keywords.

    v      = TF-IDF of item_text(title, category, description)   words of 2+ letters/digits, lower-cased,
             in at least 2 items; idf = ln((1 + n) / (1 + df)) + 1; each row L2-normalised (scikit-learn's
             TfidfVectorizer defaults with min_df=2)
    z_bow  = the first k principal axes of v (truncated SVD, LSA: U_k S_k), k = min(H, rank), zero-padded to H
             (the item state's width), so it goes through the same ItemTerm (LayerNorm -> Linear(H, item_dim))

The vectors are fitted on the texts of every item of the examples (text only, no label). The head's numeric
parts (prior, rank, count) are the trained model's; its item terms are trained again from scratch on
z_bow by trainer.fit.train_head (item_terms_only): the same epochs, learning rates, early stopping on
the validation cut-offs and keep-only-if-it-helps rule as the artefact's phase 3 (its manifest's fit_config).
The model has no neighbourhood input (issue 19.2's probe did not keep it), so neither has the control.
"""

from __future__ import annotations

import copy
from dataclasses import fields

import numpy as np
import pandas as pd
import structlog
import torch

from trainer.lsa import MIN_DF, bow_vectors

log = structlog.get_logger(__name__)


def bow_method(model, manifest, examples, split, seed: int = 0):
    """(predict: frame -> (score, log_count) float64, report): the trained `model` with item terms retrained on
    z_bow; predict has trainer.inference.score_frame's outputs."""
    from trainer.fit import FitConfig, Part, head_data, train_head
    from trainer.inference import features_of, item_texts_of
    from trainer.model import ItemTerm, Trail

    hidden = int(model.lm.config.hidden_size)
    _, texts = item_texts_of(examples.frame)
    states = dict(zip(texts, bow_vectors(texts, hidden)))
    known = {f.name for f in fields(FitConfig)}
    saved = (manifest.training.get("phase3_head") or {}).get("fit_config") or {}
    cfg = FitConfig(**{k: v for k, v in saved.items() if k in known}) if saved else FitConfig()
    torch.manual_seed(seed)
    head = copy.deepcopy(model.head)
    n_features = len(model.norm.names)
    head.rank_item = ItemTerm(hidden, n_features, model.cfg)
    head.count_item = ItemTerm(hidden, n_features, model.cfg, uses_x=model.cfg.item_uses_x)
    bow = Trail(model.lm, head, model.tokenizer, model.cfg, model.norm)
    horizon = examples.horizon_ms / 86_400_000
    # no folds: the prior they choose is the trained head's, kept as it is
    part = Part(examples, horizon, examples.rows(split.train), examples.rows(split.valid), np.zeros(0, np.int64))
    train = [head_data(bow, part, part.train, states, cfg.rank_gain)]
    valid = [head_data(bow, part, part.valid, states, cfg.rank_gain)]
    report = train_head(bow, train, valid, cfg, item_terms_only=True)
    report = {"vectors": {"kind": "tf-idf, then truncated SVD (LSA)", "min_df": MIN_DF, "width": hidden,
                          "items": len(texts)},
              "rank_item": report["rank_item"], "count_item": report["count_item"]}
    log.info("evaluate.trail_bow", rank_item_kept=report["rank_item"]["kept"],
             count_item_kept=report["count_item"]["kept"])

    @torch.no_grad()
    def predict(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        index, names = item_texts_of(frame)
        z = torch.from_numpy(np.stack([states[t] for t in names])[index]) if len(frame) else torch.zeros(0, hidden)
        head.eval()
        score, log_count = head(torch.from_numpy(features_of(model, frame, horizon)), z)
        return score.double().numpy(), log_count.double().numpy()

    return predict, report

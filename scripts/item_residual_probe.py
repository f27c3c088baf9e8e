"""How much could any per-item term add to a model's numeric count? Prints JSON.

    python scripts/item_residual_probe.py --model models/trail-smollm2

For each dataset of the artefact: the numeric count head `count(x)` on the training
cut-offs; each item's median residual log1p(count) - count(x) over its training rows,
shrunk towards 0 by n / (n + shrink); that residual added (x scale) to the validation
rows' prediction. The per-item residual learned from the item's own history is an
upper bound for what an item state (a function of the item's text) can add per item on
items seen in training: when it does not lower validation MAE, no item term can on
those items. Validation cut-offs only (the test ones stay unseen).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from stream.core.features import Normalisation
from stream.core.trends import TrendConfig
from stream.settings import load_settings
from trainer.fit import load_parts
from trainer.model import HEAD_FILE, Manifest, ScoreHead, TrailConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="TRAIL artefact directory")
    args = ap.parse_args(argv)
    manifest = Manifest.load(Path(args.model))
    norm = Normalisation.from_dict(manifest.normalisation)
    cfg = TrailConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest.trail_config.items()})
    head = ScoreHead(int(manifest.item_state["hidden_size"]), len(norm.names), cfg)
    head.load_state_dict(load_file(Path(args.model) / HEAD_FILE))
    head.eval()
    out = {}
    for part in load_parts(manifest.datasets, None, TrendConfig.from_spec(manifest.feature_spec),
                           cache_dir=load_settings().cache_dir):
        def count(frame: pd.DataFrame) -> np.ndarray:
            with torch.no_grad():
                return head.count(torch.from_numpy(norm.of_frame(frame, part.horizon_days))).squeeze(-1).numpy()

        train, valid = part.train, part.valid
        residual = train["label_log"].to_numpy() - count(train)  # (N_train,)
        per_item = pd.Series(residual, index=train["item_id"].to_numpy()).groupby(level=0).agg(["median", "size"])
        base = count(valid)
        y = valid["label_log"].to_numpy()
        rows = {"valid_mae_numeric": round(float(np.abs(np.maximum(base, 0) - y).mean()), 5),
                "valid_items_seen_in_train": round(float(valid["item_id"].isin(per_item.index).mean()), 4)}
        for shrink in (0, 5, 20, 50):
            adj = per_item["median"] * per_item["size"] / (per_item["size"] + shrink)
            add = adj.reindex(valid["item_id"].to_numpy()).fillna(0.0).to_numpy()
            for scale in (0.5, 1.0):
                mae = np.abs(np.maximum(base + scale * add, 0) - y).mean()
                rows[f"valid_mae_with_item_residual_shrink{shrink}_x{scale}"] = round(float(mae), 5)
        out[part.examples.dataset] = rows
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

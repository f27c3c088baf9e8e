"""The model's own prediction for the LLM's training targets: the forecast's size, range and drivers.

A published text ends with the forecast's size and range and gives a mover's top driver as its reason (the claim
grammar, stream.core.faithfulness.grammar). So that the LLM learns those texts, phase 1 of trainer.fit writes its
targets with them: `target_explanation(size=, drivers=)`. The LLM being trained has no range head yet (the range
head reads the finished LLM's item states: trainer.quantiles), so the prediction comes from a previous artefact
with a range head (`--targets-from DIR`, by default the --init-adapter artefact when it has one): its 10/50/90%
counts and the drivers of its median's gap from the item's pace (trainer.quantiles.drivers) for each sampled row, on
that artefact's own item states, as its stream would publish them. The forecast a target states is then that
prediction's direction, as the grammar forces it at inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import structlog
import torch

from stream.core.forecast import PredictedCount

log = structlog.get_logger(__name__)


class PredictionSource:
    """A previous artefact's range head and item states, predicting rows of an examples frame."""

    def __init__(self, directory: str | Path, *, cache_dir: Path) -> None:
        from trainer.model import load
        from trainer.quantiles import load_range

        self.directory = Path(directory).resolve()
        head = load_range(self.directory)
        if head is None:
            raise ValueError(f"{self.directory} has no range head (range_head.safetensors): it cannot give the "
                             f"targets' size, range and drivers; train one with python -m trainer.quantiles")
        self.model, manifest = load(self.directory, cache_dir=cache_dir)
        if tuple(head.cfg.feature_names) != tuple(self.model.norm.names):
            raise ValueError(f"{self.directory}: the range head reads {list(head.cfg.feature_names)}, the artefact's "
                             f"normalisation {list(self.model.norm.names)}")
        self.head = head
        self.model_version = manifest.model_version
        self._states: dict[str, np.ndarray] = {}  # item text -> item state (the artefact's LLM, once per item)

    @classmethod
    def open(cls, directory: str | Path | None, *, cache_dir: Path) -> "PredictionSource | None":
        """The source at `directory`, or None for None / an artefact without a range head (today's targets)."""
        if directory is None or not (Path(directory) / "range_head.safetensors").is_file():
            return None
        return cls(directory, cache_dir=cache_dir)

    def predictions(self, rows: pd.DataFrame, horizon_days: float) -> list[PredictedCount]:
        """Each row's predicted count (the median), 80% range and drivers."""
        from trainer.inference import item_texts_of
        from trainer.quantiles import calibrated_range, counts_of, drivers, range_data

        rows = rows.reset_index(drop=True)
        index, texts = item_texts_of(rows)
        missing = [t for t in texts if t not in self._states]
        if missing:
            self._states.update(zip(missing, self.model.item_states(missing, progress=False)))
        z = np.stack([self._states[t] for t in texts]).astype(np.float32)[index]
        d = range_data(self.model.norm, rows, horizon_days, np.arange(len(rows)))
        with torch.no_grad():
            q = self.head(torch.from_numpy(d.x), torch.from_numpy(d.cal), torch.from_numpy(z)).numpy()
            phi = drivers(self.head, d.x, d.cal, z, self.model.norm)
        low, mid, high = counts_of(calibrated_range(self.head, q.astype(np.float64), horizon_days))
        return [PredictedCount(float(mid[i]), horizon_days, float(low[i]), float(max(high[i], low[i])),
                               drivers={g: float(v[i]) for g, v in phi.items()}) for i in range(len(rows))]

"""Controls of the range head, whose median is the published count (issue 19.4): what the LLM's item state adds.

    python -m trainer.controls --model models/trail-smollm2 [--controls numeric,random,bow] [--dataset D1,D2]

Each control is the range head fitted again exactly as phase 4 fits the real one (trainer.quantiles.fit_range:
the same folds, widths, epoch cap and seed), with the item state replaced by a vector of the same width:

    numeric  zeros: the trend signals and the calendar only, no item input
    random   a Gaussian vector per item text (seeded by the text's blake2b), each dimension with the mean and
             spread the LLM's states have over the head's training items: an identity without meaning
    bow      the TF-IDF + LSA vector of the item text (trainer.lsa, as trainer.bow's control), fitted on the texts
             of every item of the head's datasets (text only, no label)

They are saved under DIR/controls/ (range_head_<kind>.safetensors and .json; `trainer.fit --range-controls` fits
them in its phase 4) and read by `trainer.evaluate --model DIR`, which scores each as `trail_<kind>_range`: the
count of that control's median, ranked by `trail`'s own score, and in `ci_ablations` trail minus it (the score
head's ablations, `trail_numeric` and the rest, count with the score head). The stream never reads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONTROLS = ("numeric", "random", "bow")
CONTROL_DIR = "controls"


def random_vectors(texts: list[str], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(N, H) float32: per text, mean + std * a standard normal draw seeded by the text (the same vector for an item
    wherever it is met)."""
    out = np.empty((len(texts), len(mean)), np.float32)
    for i, t in enumerate(texts):
        seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        out[i] = mean + std * np.random.default_rng(seed).standard_normal(len(mean))
    return out


class ControlVectors:
    """The vector a control puts in place of each item text's state (`kind`: one of CONTROLS)."""

    def __init__(self, kind: str, hidden: int, *, scale: dict | None = None, bow_texts: list[str] | None = None):
        if kind not in CONTROLS:
            raise ValueError(f"unknown control {kind!r}: one of {', '.join(CONTROLS)}")
        self.kind, self.hidden, self.scale = kind, hidden, scale
        self._bow: dict[str, np.ndarray] = {}
        if kind == "random" and not scale:
            raise ValueError("the random control needs the LLM states' mean and std (`scale`)")
        if kind == "bow":
            from trainer.lsa import bow_vectors

            texts = sorted(set(bow_texts or ()))
            self._bow = dict(zip(texts, bow_vectors(texts, hidden)))

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.kind == "numeric":
            return np.zeros((len(texts), self.hidden), np.float32)
        if self.kind == "random":
            return random_vectors(texts, np.asarray(self.scale["mean"], np.float32),
                                  np.asarray(self.scale["std"], np.float32))
        missing = [t for t in texts if t not in self._bow]
        if missing:
            raise ValueError(f"{len(missing)} item text(s) outside the bow control's vocabulary fit, e.g. "
                             f"{missing[0][:60]!r}: its texts are every item of the datasets the head was fitted on")
        return np.stack([self._bow[t] for t in texts]) if texts else np.zeros((0, self.hidden), np.float32)


def scale_of(states: np.ndarray) -> dict:
    s = np.asarray(states, np.float64)
    return {"mean": s.mean(axis=0).round(6).tolist(), "std": s.std(axis=0).round(6).tolist()}


def load_controls(model_dir: str | Path) -> dict[str, tuple]:
    """{kind: (RangeHead, its `control` record)} of the controls saved in the artefact (none: {})."""
    from trainer.quantiles import read_range

    out = {}
    for kind in CONTROLS:
        got = read_range(Path(model_dir) / CONTROL_DIR, f"range_head_{kind}")
        if got is not None:
            out[kind] = (got[0], got[1]["control"])
    return out


def fit_controls(model, model_dir: str | Path, rows, kinds: list[str], max_epochs: int, seed: int, shapes, *,
                 datasets: list[str], items: str | None = None, batch: int = 1024) -> dict:
    """Each control head fitted on `rows` (trainer.quantiles.RangeRows of `datasets`, its `texts` aligned with its
    states; the bow control's vectors fitted on its `every_text`) and saved into model_dir/controls; {kind: fit
    report}."""
    from trainer.quantiles import RangeConfig, fit_range, save_range

    hidden = int(rows.states.shape[1])
    cfg = RangeConfig(n_features=len(model.norm.names), hidden_size=hidden, feature_names=tuple(model.norm.names))
    out = Path(model_dir) / CONTROL_DIR
    out.mkdir(exist_ok=True)
    reports = {}
    for kind in kinds:
        record = {"kind": kind, "datasets": list(datasets), "items": items} | (
            {"scale": scale_of(rows.states)} if kind == "random" else {})
        vectors = ControlVectors(kind, hidden, scale=record.get("scale"), bow_texts=rows.every_text)
        head, report = fit_range(cfg, rows.folds, rows.full, vectors(rows.texts), max_epochs, seed=seed,
                                 batch=batch, shapes=shapes)
        head.cfg.trained = report | {"seed": seed, "control": kind}
        save_range(head, out, f"range_head_{kind}", {"control": record})
        reports[kind] = report
    return reports


def control_count(head, vectors: ControlVectors, model, frame, horizon_days: float) -> np.ndarray:
    """The control head's median count for each row of `frame`."""
    from stream.core.features import predicted_count
    from trainer.quantiles import predict_frame

    return predicted_count(predict_frame(head, model.norm, frame, horizon_days, vectors)[:, 1].astype(np.float64))


def train_controls(model_dir: str, names: list[str], items: str | None, kinds: Sequence[str],
                   max_epochs: int, seed: int = 0, limits=None, shapes=None, *, cache_dir: Path) -> dict:
    """The `kinds` controls of the artefact's range head, fitted on the rows its phase 4 reads (trainer.quantiles:
    the same datasets, `limits`, folds and widths) and saved into model_dir/controls; {kind: fit report}."""
    from trainer.examples import RowLimits
    from trainer.quantiles import RANGE_SHAPES, _load_model, _range_rows

    model = _load_model(model_dir, cache_dir)
    rows = _range_rows(model, names, items, cache_dir, limits or RowLimits())
    return fit_controls(model, model_dir, rows, list(kinds), max_epochs, seed, shapes or RANGE_SHAPES,
                        datasets=names, items=items)


def parse_controls(text: str) -> tuple[str, ...]:
    """'numeric,bow' -> ('numeric', 'bow'): the --controls of trainer.controls and trainer.fit."""
    import argparse

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in CONTROLS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: controls are {', '.join(CONTROLS)}, comma-separated")
    return kinds


def main(argv: list[str] | None = None) -> int:
    import argparse

    from stream.settings import load_settings
    from trainer.quantiles import add_fit_arguments

    ap = argparse.ArgumentParser(prog="python -m trainer.controls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a TRAIL artefact directory with a range head")
    ap.add_argument("--controls", type=parse_controls, default=CONTROLS,
                    help="which, comma-separated (default: " + ",".join(CONTROLS) + ")")
    ap.add_argument("--dataset", default=None,
                    help="comma-separated datasets or one event log (default: those the range head was fitted on)")
    add_fit_arguments(ap)
    args = ap.parse_args(argv)
    fitted = json.loads((Path(args.model) / "range_head.json").read_text()).get("trained", {}) if (
        Path(args.model) / "range_head.json").is_file() else {}
    names = args.dataset.split(",") if args.dataset else fitted.get("datasets")
    if not names:
        ap.error(f"{args.model} has no range head recording its datasets: pass --dataset")
    report = train_controls(args.model, [n.strip() for n in names], args.items, args.controls, args.max_epochs,
                            args.seed, shapes=args.shapes, cache_dir=load_settings().cache_dir)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ship the item states of a public dataset's catalogue with a model artefact (stream.model.item_states).

    python -m export.item_states --model models/trail-smollm2 --dataset retail --exported DIR

DIR is an export of the same trained files (`python -m export.onnx`; the demo's is in
TRAIL_CACHE/exports/): its item encoder computes every item's state from the text the stream renders
for it (the item table published to `trail.items` as stream.tools.replay does, read back as the
worker's catalogue does, stream.serving.scorer.text_for), and the states are written as float16 to
MODEL/item_states/<dataset>.npz under the model's `shipped_key`. `--check N` re-encodes N of them from
the file written, as the worker does before it uses them. The scorer then starts warm on that data;
any other adapter, base model or item text gets another key, and its states are encoded as before.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import orjson

from stream.core.records import ItemInfo
from stream.model.artefact import Artefact
from stream.model.item_states import SHIPPED_DIR, ShippedStates, shipped_key, state_difference


def catalogue_texts(items) -> tuple[list[str], list[str]]:
    """(item ids, texts) of an item table, through the path a worker's items take: replay's record, the
    catalogue's reading of it, the scorer's text."""
    from stream.ingest.catalogue import ItemCatalogue
    from stream.serving.scorer import text_for
    from stream.tools.replay import _item_values

    cat = ItemCatalogue("unused:0", "unused")
    for key, value in _item_values(items):
        cat.apply(key, value)
    ids = list(cat.items)
    return ids, [text_for(i, cat.items[i]) for i in ids]


def ship(model: Path, exported: Path, dataset: str, trend, cache_dir: Path, command: str = "") -> ShippedStates:
    from stream.core.datasets import load_dataset
    from stream.serving.scorer import TickScorer

    theirs = Artefact.load(exported, trend)
    key = shipped_key(trained(model))
    if key != shipped_key(theirs):
        raise SystemExit(f"error: {exported} is not an export of {model}'s trained files (another adapter, base "
                         f"model, item-token limit or item text)")
    ds = load_dataset(dataset, cache_dir=cache_dir)
    ids, texts = catalogue_texts(ds.items)
    t0 = time.perf_counter()
    states = TickScorer(theirs, horizon_days=ds.horizon_days).encode(texts)  # the horizon: only to construct it
    about = {"dataset": ds.name, "horizon_days": ds.horizon_days, "items": len(ids), "encoder_sha256": theirs.onnx["files"]["item_encoder"]["sha256"],
             "encoded_with": theirs.onnx.get("versions", {}), "seconds": round(time.perf_counter() - t0, 1),
             "command": command}
    return ShippedStates(model / SHIPPED_DIR / f"{dataset}.npz", key, ids, texts, states.astype(np.float16), about)


def trained(model: Path) -> Artefact:
    """The trained artefact at `model`, exported or not: what `shipped_key` reads (no ONNX file)."""
    import json

    return Artefact(model, json.loads((model / "manifest.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    from stream.settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m export.item_states", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="the artefact to ship them with (models/trail-smollm2)")
    ap.add_argument("--exported", required=True, type=Path, help="an ONNX export of the same trained files")
    ap.add_argument("--dataset", default="retail", help="a dataset stream.core.datasets loads (retail)")
    ap.add_argument("--check", type=int, default=64, help="states re-encoded from the written file (64)")
    args = ap.parse_args(argv)
    settings = load_settings()
    shipped = ship(args.model.resolve(), args.exported.resolve(), args.dataset, settings.worker.trend,
                   Path(settings.cache_dir), command=f"python -m export.item_states --model {args.model} "
                                                                     f"--dataset {args.dataset} --exported DIR")
    path = shipped.write()
    back = ShippedStates.read(path, shipped.key, shipped.states.shape[1])
    from stream.serving.scorer import TickScorer

    exported = Artefact.load(args.exported.resolve(), settings.worker.trend)
    pick = np.linspace(0, len(back.ids) - 1, min(args.check, len(back.ids))).astype(int)
    diff = state_difference(TickScorer(exported, horizon_days=back.about["horizon_days"]).encode([back.texts[i] for i in pick]),
                            back.states[pick].astype(np.float32))
    print(orjson.dumps({"path": str(path), "bytes": path.stat().st_size, "key": back.key, "items": len(back.ids),
                        "checked": len(pick), "difference": diff, **shipped.about}).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

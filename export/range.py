"""Export the count's range head (trainer.quantiles) to ONNX: `python -m export.range --model DIR`.

Writes DIR/onnx/range_head.onnx (beside the other ONNX files, git-ignored: the committed artefact
keeps only the weights, range_head.safetensors / range_head.json): inputs x (B, S) float32 (the score head's normalised input), cal (B, 2)
float32 (stream.core.features.week_of_year), item_state (B, H) float32; output q (B, 3) float32, the
10/50/90% quantiles of log1p(next-period count). The batch axis is dynamic; parity with the PyTorch
head is checked at several batch sizes (not only the traced one) and recorded in
DIR/onnx/range_head.onnx.json. `python -m export.onnx` runs it when the artefact has a range head. The stream (stream.model.count_range) reads both files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from stream.model.artefact import ONNX_DIR, RANGE_ONNX, RANGE_PARITY, RANGE_WEIGHTS, sha256_of
from trainer.quantiles import RangeHead, load_range

ONNX_FILE = RANGE_ONNX
PARITY_FILE = RANGE_PARITY
PARITY_BATCHES = (1, 3, 257)
TOLERANCE = 1e-4
OPSET = 17


def export_range(directory: str | Path, seed: int = 0) -> dict:
    directory = Path(directory)
    head = load_range(directory)
    if head is None:
        raise FileNotFoundError(f"{directory}: no range head (train one: python -m trainer.quantiles --model DIR)")
    cfg = head.cfg
    out = directory / ONNX_DIR
    out.mkdir(exist_ok=True)
    path = out / ONNX_FILE
    with torch.no_grad():
        torch.onnx.export(head.eval(), (torch.zeros(2, cfg.n_features), torch.zeros(2, 2), torch.zeros(2, cfg.hidden_size)),
                          str(path), input_names=["x", "cal", "item_state"], output_names=["q"], opset_version=OPSET,
                          dynamo=False, dynamic_axes={"x": {0: "batch"}, "cal": {0: "batch"},
                                                      "item_state": {0: "batch"}, "q": {0: "batch"}})
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for b in PARITY_BATCHES:
        x = rng.normal(size=(b, cfg.n_features)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi, b)
        cal = np.stack([np.sin(angle), np.cos(angle)], 1).astype(np.float32)
        z = rng.normal(size=(b, cfg.hidden_size)).astype(np.float32)
        with torch.no_grad():
            ref = head(torch.from_numpy(x), torch.from_numpy(cal), torch.from_numpy(z)).numpy()
        got = sess.run(["q"], {"x": x, "cal": cal, "item_state": z})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > TOLERANCE:
        path.unlink()
        raise RuntimeError(f"range head ONNX parity {worst:.2e} > {TOLERANCE:g}: not exported")
    record = {"file": ONNX_FILE, "batches": list(PARITY_BATCHES), "max_abs_diff": worst, "opset": OPSET,
              "feature_names": list(cfg.feature_names), "quantiles": list(cfg.quantiles),
              "source": {RANGE_WEIGHTS: sha256_of(directory / RANGE_WEIGHTS)}}  # Artefact.check_range_source
    (out / PARITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.range", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="artefact directory with range_head.safetensors")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(export_range(args.model), indent=2))
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fit and evaluate TRAIL on three event logs of other shapes, derived from the public data (issue 19's `--events` check).

    python -m trainer.any_log --model models/trail-smollm2 --work DIR --json OUT.json

For each log: `python -m trainer.fit --events F [--items I] --out DIR/<log>/model --init-adapter MODEL
--budget-minutes 0` (no LLM steps: the given adapter as it is; phases 2-4 fit the item states, the score head
and the range head on this log), then `python -m trainer.evaluate --events F [--items I] --model DIR/<log>/model
--explain-sample 0 --json DIR/<log>/evaluate.json` with the tuned baselines. Both run as subprocesses, as a user
would run them; the summary (printed, and written with --json) compares TRAIL with every baseline per log.

The three logs, written under DIR/logs, each derived deterministically from the parsed built-in datasets
(`stream.core.datasets.load_dataset("retail" | "ml100k")`, i.e. after that loader's cleaning rules: cancellations,
returns, free lines and non-product codes dropped; ts in epoch ms UTC). A slice [start, end) keeps the events
with start <= ts < end; nothing else is filtered, sampled or reordered (rows keep the loader's ts order).

`retail_csv` (CSV, ISO timestamps, an extra column, a partial item table):
  UCI Online Retail II, purchases from 2011-03-01 to 2011-06-01 (92 days).
  Columns: `StockCode` (item_id), `Customer ID` (user_id; empty for guest checkouts), `InvoiceDate` (ts as
  ISO-8601 UTC text, "2011-03-01T08:30:00Z"), `action` (event_type, "purchase"), and the extra column
  `Quantity` (the line's quantity: the loader does not take a quantity as weight, so it is ignored and every
  line weighs 1). No weight column.
  Item table `retail_csv_items.csv`: `StockCode`, `product_name` (title), `Price` (median unit price over the
  whole data set), only for the items of the slice that were also sold in February 2011, the month before it (a
  catalogue exported at the slice's start): the others (new items, and items idle that month) have no row, so
  the loader titles them with their id.

`retail_parquet` (Parquet, datetime64 ts, no event_type or weight):
  UCI Online Retail II, purchases from 2010-09-01 to 2010-12-01 (91 days, the autumn ramp to Christmas).
  Columns: `product_id` (item_id), `customer_id` (user_id; null for guest checkouts), `timestamp`
  (datetime64[ns], naive = UTC). No event_type, no weight.
  Item table `retail_parquet_items.parquet`: `product_id`, `name` (title), `price`, for every item of the slice.

`ml100k_jsonl` (JSONL, epoch-second ts, no user_id, no item table, 45 days):
  MovieLens-100K, ratings from 1997-11-01 to 1997-12-16 (45 days). Keys: `movie_id` (item_id), `timestamp`
  (ts, integer epoch seconds), `event` (event_type, "rating"), `rating` (1..5; like a quantity, not taken as
  weight). No user key at all and no item table: titles are the movie ids. Without users there are no
  (user, item) truth pairs, so NDCG@10 is undefined (None) for every method on this log: only MAE log is
  compared there (`ndcg@10.comparable: false`).

`--scale F` (tests) keeps the first F of each slice's days (at least one day); the item tables follow.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from stream.core.datasets import load_dataset

log = structlog.get_logger(__name__)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LogSpec:
    name: str
    source: str  # a built-in dataset of stream.core.datasets
    start: str   # UTC day, inclusive
    end: str     # UTC day, exclusive
    about: str


SPECS = (
    LogSpec("retail_csv", "retail", "2011-03-01", "2011-06-01",
            "CSV; ISO-8601 ts; extra column Quantity; item table only for items sold in the month before"),
    LogSpec("retail_parquet", "retail", "2010-09-01", "2010-12-01",
            "Parquet; datetime64 ts; no event_type or weight; full item table"),
    LogSpec("ml100k_jsonl", "ml100k", "1997-11-01", "1997-12-16",
            "JSONL; epoch-second ts; no user_id; no item table; 45 days"),
)


@dataclass(frozen=True)
class DerivedLog:
    name: str
    source: str
    start: str
    end: str
    events: str          # path
    items: str | None    # path of the item table, None when the log has none
    rows: int
    items_in_log: int
    items_in_table: int  # 0 without a table
    users: int           # distinct users in the log (0: no user column)
    about: str


def _slice(events: pd.DataFrame, start: str, end: str) -> pd.DataFrame:
    lo = pd.Timestamp(start, tz="UTC").value // 1_000_000
    hi = pd.Timestamp(end, tz="UTC").value // 1_000_000
    ts = events["ts"].to_numpy(np.int64)
    return events.iloc[np.searchsorted(ts, lo, "left"):np.searchsorted(ts, hi, "left")].reset_index(drop=True)


def _scaled_end(spec: LogSpec, scale: float) -> str:
    start, end = pd.Timestamp(spec.start), pd.Timestamp(spec.end)
    days = max(1, int((end - start).days * scale))
    return (start + pd.Timedelta(days=days)).date().isoformat() if scale < 1 else spec.end


def _write_retail_csv(events: pd.DataFrame, items: pd.DataFrame, spec: LogSpec, out: Path,
                      before: pd.DataFrame) -> tuple[Path, Path]:
    iso = pd.to_datetime(events["ts"], unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    frame = pd.DataFrame({"StockCode": events["item_id"], "Customer ID": events["user_id"], "InvoiceDate": iso,
                          "action": events["event_type"], "Quantity": events["weight"].astype(np.int64)})
    path = out / f"{spec.name}.csv"
    frame.to_csv(path, index=False)
    known = set(before["item_id"])  # the catalogue at the slice's start: items sold the month before
    table = items[items["item_id"].isin(known) & items["item_id"].isin(set(events["item_id"]))]
    items_path = out / f"{spec.name}_items.csv"
    pd.DataFrame({"StockCode": table["item_id"], "product_name": table["title"], "Price": table["price"]}
                 ).to_csv(items_path, index=False)
    return path, items_path


def _write_retail_parquet(events: pd.DataFrame, items: pd.DataFrame, spec: LogSpec, out: Path) -> tuple[Path, Path]:
    frame = pd.DataFrame({"product_id": events["item_id"], "customer_id": events["user_id"],
                          "timestamp": pd.to_datetime(events["ts"], unit="ms").astype("datetime64[ns]")})
    path = out / f"{spec.name}.parquet"
    frame.to_parquet(path, index=False)
    table = items[items["item_id"].isin(set(events["item_id"]))]
    items_path = out / f"{spec.name}_items.parquet"
    pd.DataFrame({"product_id": table["item_id"], "name": table["title"], "price": table["price"]}
                 ).to_parquet(items_path, index=False)
    return path, items_path


def _write_ml100k_jsonl(events: pd.DataFrame, spec: LogSpec, out: Path) -> Path:
    frame = pd.DataFrame({"movie_id": events["item_id"], "timestamp": events["ts"].to_numpy(np.int64) // 1000,
                          "event": events["event_type"], "rating": events["weight"].astype(np.int64)})
    path = out / f"{spec.name}.jsonl"
    frame.to_json(path, orient="records", lines=True)
    return path


def derive_logs(out: Path, *, cache_dir: Path, scale: float = 1.0,
                names: tuple[str, ...] | None = None) -> list[DerivedLog]:
    """Write the logs of SPECS (those named in `names`) under `out`; see the module docstring for how."""
    out.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    derived = []
    for spec in SPECS:
        if names and spec.name not in names:
            continue
        if spec.source not in loaded:
            ds = load_dataset(spec.source, cache_dir=cache_dir)
            loaded[spec.source] = (ds.events, ds.items)
        all_events, items = loaded[spec.source]
        end = _scaled_end(spec, scale)
        events = _slice(all_events, spec.start, end)
        if events.empty:
            raise ValueError(f"{spec.name}: no {spec.source} events in [{spec.start}, {end})")
        if spec.name == "retail_csv":
            month_before = (pd.Timestamp(spec.start) - pd.DateOffset(months=1)).date().isoformat()
            ev_path, it_path = _write_retail_csv(events, items, spec, out, _slice(all_events, month_before, spec.start))
        elif spec.name == "retail_parquet":
            ev_path, it_path = _write_retail_parquet(events, items, spec, out)
        else:
            ev_path, it_path = _write_ml100k_jsonl(events, spec, out), None
        table_rows = 0 if it_path is None else len(pd.read_csv(it_path) if it_path.suffix == ".csv"
                                                    else pd.read_parquet(it_path))
        users = 0 if spec.name == "ml100k_jsonl" else int(events["user_id"].nunique())
        derived.append(DerivedLog(spec.name, spec.source, spec.start, end, str(ev_path),
                                  None if it_path is None else str(it_path), len(events),
                                  int(events["item_id"].nunique()), table_rows, users, spec.about))
        log.info("any_log.derived", **asdict(derived[-1]))
    return derived


# ---- running fit and evaluate ----------------------------------------------------------------------

def commands(d: DerivedLog, model: str, work: Path, n_boot: int) -> tuple[list[str], list[str]]:
    items = ["--items", d.items] if d.items else []
    out = work / d.name / "model"
    fit = [sys.executable, "-m", "trainer.fit", "--events", d.events, *items, "--out", str(out),
           "--init-adapter", model, "--budget-minutes", "0"]
    evaluate = [sys.executable, "-m", "trainer.evaluate", "--events", d.events, *items, "--model", str(out),
                "--explain-sample", "0", "--n-boot", str(n_boot), "--json", str(work / d.name / "evaluate.json")]
    return fit, evaluate


def _run(cmd: list[str], log_path: Path, say: Callable[[str], None]) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}).returncode
    seconds = time.perf_counter() - t0
    if rc:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        say(f"  exit {rc} after {seconds:.0f} s; last lines of {log_path}:\n    " + "\n    ".join(tail))
    return rc, seconds


def _r(v: float | None, nd: int = 5) -> float | None:
    return None if v is None else round(float(v), nd)


def compare(report: dict) -> dict:
    """TRAIL against every baseline per metric of evaluate's `ci`, from its JSON report."""
    from trainer.evaluate import BASELINES, CI_METRICS

    methods = report["methods"]
    out = {}
    for metric, better in CI_METRICS.items():
        trail = methods.get("trail", {}).get(metric)
        base = {name: _r(methods[name].get(metric)) for name in BASELINES if name in methods}
        scored = {k: v for k, v in base.items() if v is not None}
        ci = report.get("ci", {}).get(metric, {})
        entry = {"trail": _r(trail), "baselines": base, "best_baseline": ci.get("best_baseline"),
                 "best_value": scored.get(ci.get("best_baseline")), "comparable": trail is not None and bool(scored)}
        if entry["comparable"]:
            sign = 1.0 if better == "max" else -1.0
            entry["beats_every_baseline"] = all(sign * (trail - v) > 0 for v in scored.values())
            lo, hi = ci.get("low"), ci.get("high")
            entry["trail_minus_best"] = {"diff": _r(ci.get("diff")), "low": _r(lo), "high": _r(hi),
                                         "level": ci.get("level"), "n_boot": ci.get("n_boot")}
            # the interval excludes 0 on the better side
            entry["significant"] = lo is not None and (lo > 0 if better == "max" else hi < 0)
        else:
            entry["beats_every_baseline"] = None
            entry["why_not_comparable"] = ("no method has this metric on this log (no user_id: no truth pairs)"
                                           if trail is None and not scored else "trail or every baseline lacks it")
        out[metric] = entry
    return out


def run_one(d: DerivedLog, model: str, work: Path, n_boot: int, say: Callable[[str], None]) -> dict:
    (work / d.name).mkdir(parents=True, exist_ok=True)
    fit, evaluate = commands(d, model, work, n_boot)
    entry: dict = {"log": asdict(d), "commands": {"fit": shlex.join(fit[1:]), "evaluate": shlex.join(evaluate[1:])},
                   "seconds": {}}
    for step, cmd in (("fit", fit), ("evaluate", evaluate)):
        say(f"[{d.name}] {step}: python {shlex.join(cmd[1:])}")
        rc, seconds = _run(cmd, work / d.name / f"{step}.log", say)
        entry["seconds"][step] = round(seconds, 1)
        say(f"[{d.name}] {step}: exit {rc} in {seconds:.0f} s")
        if rc:
            entry["error"] = {"step": step, "exit": rc, "log": str(work / d.name / f"{step}.log")}
            return entry
    report = json.loads((work / d.name / "evaluate.json").read_text())
    manifest = json.loads((work / d.name / "model" / "manifest.json").read_text())
    proto = report["protocol"]
    entry |= {
        "cutoffs": proto["split"], "horizon_days": proto["horizon_days"], "test_first": proto["test_first"],
        "test_last": proto["test_last"], "test_rows": proto["test_rows"],
        "folds": len(proto.get("folds", [])),
        "prompt_version": {"artefact": manifest.get("prompt_version"),
                           "adapter": (manifest["training"]["phase1_llm"].get("init_adapter") or {}).get(
                               "model_version")},
        "metrics": compare(report),
        "interval_coverage": _r(report["methods"].get("trail", {}).get("interval_coverage")),
        "ablations": {name: {m: _r(report["methods"].get(name, {}).get(m)) for m in ("ndcg@10", "mae_log")}
                      for name in ("trail_numeric", "trail_text_shuffled", "trail_bow")},
    }
    return entry


def table(summary: dict) -> str:
    """One line per log and metric: TRAIL, the best baseline, the difference with its interval."""
    lines = [f"{'log':<15} {'metric':<8} {'trail':>8} {'best baseline':>24} {'trail-best [95% CI]':>32} {'beats all':>9}"]
    for name, e in summary["logs"].items():
        if "metrics" not in e:
            lines.append(f"{name:<15} {e.get('error', {}).get('step', '-')} failed")
            continue
        for metric, m in e["metrics"].items():
            if not m["comparable"]:
                lines.append(f"{name:<15} {metric:<8} {'-':>8} {'-':>24} {'not comparable (no users)':>32} {'-':>9}")
                continue
            d = m["trail_minus_best"]
            ci = f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d["low"] is not None else f"{d['diff']:+.4f}"
            best = f"{m['best_baseline']} {m['best_value']:.4f}"
            lines.append(f"{name:<15} {metric:<8} {m['trail']:>8.4f} {best:>24} {ci:>32} {str(m['beats_every_baseline']):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.any_log", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the artefact whose adapter starts each fit (--init-adapter)")
    ap.add_argument("--work", required=True, type=Path, help="where the logs, models and reports go")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--logs", help=f"comma-separated subset of {', '.join(s.name for s in SPECS)}")
    ap.add_argument("--scale", type=float, default=1.0, help="keep this share of each slice's days (tests)")
    ap.add_argument("--n-boot", type=int, default=2000, help="evaluate's bootstrap draws (2000)")
    ap.add_argument("--derive-only", action="store_true", help="write the logs and stop")
    args = ap.parse_args(argv)
    from stream.settings import load_settings

    if not (Path(args.model) / "adapter").is_dir():
        print(f"error: --model {args.model}: no adapter/ folder there", file=sys.stderr)
        return 2
    model = str(Path(args.model).absolute())
    work = args.work.absolute()
    say = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    names = tuple(n.strip() for n in args.logs.split(",")) if args.logs else None
    logs = derive_logs(work / "logs", cache_dir=load_settings().cache_dir, scale=args.scale, names=names)
    for d in logs:
        say(f"derived {d.name}: {d.rows:,} events, {d.items_in_log:,} items ({d.items_in_table:,} in its table), "
            f"{d.users:,} users, [{d.start}, {d.end}) -> {d.events}")
    shipped = json.loads((Path(model) / "manifest.json").read_text()) if (Path(model) / "manifest.json").is_file() else {}
    summary: dict = {"model": model, "model_version": shipped.get("model_version"),
                     "model_prompt_version": shipped.get("prompt_version"), "logs": {}}
    if not args.derive_only:
        for d in logs:
            summary["logs"][d.name] = run_one(d, model, work, args.n_boot, say)
    summary["logs"] = summary["logs"] or {d.name: {"log": asdict(d)} for d in logs}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if not args.derive_only:
        print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 1 if any("error" in e for e in summary["logs"].values()) else 0


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: progress and summary
    raise SystemExit(main())

"""Ingest speed while an explainer decodes without pause beside it, at the explainer's threads and nice values.

    PYTHONPATH=. python scripts/ingest_beside_explainer.py --model models/trail-smollm2 \
        --setups 0:0,1:0,2:0,2:10,2:19 --json docs/results/ingest-beside-explainer-nice.json

Each setup THREADS:NICE starts a second process that decodes the bench's explanation rows (export.rows, a tick's
movers as one batch of 5, each row held to its claim grammar) on the generator the stream serves, as the stream's
explainer runs it: its own thread and its shards' threads at NICE (stream.model.onnx_models.lower_thread_priority).
Once that process has warmed up, `python -m stream.tools.bench --events N --faust-events 0 --repeat R --json` (the
local broker, on the same cores) measures ingest; then the explainer is stopped and reports its explanations a
second over the same span. With --in-process the explainer's threads run in the ingest bench's own process instead,
as they do in the worker (one GIL for both). 0:0 is ingest alone, the baseline of the same run. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class Decoder:
    """The bench's explanation rows (export.rows, 10 real prompts) decoded a batch of 5 at a time, each row held to
    its claim grammar, on the generator the stream serves, as its explainer runs it: a thread of its own and the
    shards' threads at `nice`."""

    def __init__(self, model: Path, threads: int, nice: int) -> None:
        from export.bench import _spec_trend, constrained_rows
        from export.rows import explain_rows
        from stream.model.artefact import Artefact
        from stream.model.onnx_models import choose_providers, explain_generator, lower_thread_priority
        from stream.model.teacher_forced import generator_role
        from stream.settings import load_settings

        art = Artefact.load(model, _spec_trend(model))
        rows = explain_rows(json.loads((model / "manifest.json").read_text()), 10, cache_dir=load_settings().cache_dir)
        providers = choose_providers("cpu")
        self.gen = explain_generator(art.path(generator_role(art, providers)), providers, art.tokenizer().end_id,
                                     threads, nice)
        self.rows = constrained_rows(art, rows)
        self.pool = ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(nice,))  # the Explainer's
        self.pool.submit(self.gen.generate, self.rows.prompts[0], 2).result()
        self.n = 0

    def batch(self) -> int:
        """Decode the next 5 rows; the explanations decoded so far."""
        r = self.rows
        b = slice(self.n % len(r.prompts), self.n % len(r.prompts) + 5)
        self.pool.submit(self.gen.generate_batch, r.prompts[b], r.limit, r.constraint.guide(r.grammars[b])).result()
        self.n += 5
        return self.n

    def close(self) -> None:
        self.pool.shutdown()
        self.gen.close()


def explain_forever(model: Path, threads: int, nice: int) -> None:
    """The child: decode batches of 5 until SIGTERM, a JSON line {"n", "s"} on stdout after each batch."""
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: the JSON lines only
    decoder = Decoder(model, threads, nice)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print(json.dumps({"ready": True}), flush=True)
    t0 = time.perf_counter()
    while not stop:
        n = decoder.batch()
        print(json.dumps({"n": n, "s": time.perf_counter() - t0}), flush=True)


def ingest(events: int, repeat: int) -> dict:
    cmd = [sys.executable, "-m", "stream.tools.bench", "--events", str(events), "--faust-events", "0",
           "--repeat", str(repeat), "--json", "--quiet"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def ingest_in_process(events: int, repeat: int) -> dict:
    import contextlib
    import io

    from stream.tools.bench import main as ingest_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ingest_main(["--events", str(events), "--faust-events", "0", "--repeat", str(repeat), "--json", "--quiet"])
    return json.loads(out.getvalue())


def setup_in_process(model: Path, threads: int, nice: int, events: int, repeat: int) -> dict:
    """The explainer as threads of the ingest bench's own process, as in the worker (one GIL for both)."""
    import threading

    if threads == 0:
        return {"threads": 0, "nice": None, "in_process": True, "ingest": ingest_in_process(events, repeat)}
    decoder = Decoder(model, threads, nice)
    decoder.batch()  # past its first batch: decoding at its steady pace
    stop, span = threading.Event(), {}

    def loop() -> None:
        t0, n0 = time.perf_counter(), decoder.n
        while not stop.is_set():
            decoder.batch()
        span.update(n=decoder.n - n0, s=time.perf_counter() - t0)

    t = threading.Thread(target=loop, name="explainer-loop")
    t.start()
    try:
        got = ingest_in_process(events, repeat)
    finally:
        stop.set()
        t.join()
        decoder.close()
    return {"threads": threads, "nice": nice, "in_process": True, "ingest": got,
            "explainer": {"explanations_per_s": round(span["n"] / span["s"], 2), "explanations": span["n"]}}


def setup(model: Path, threads: int, nice: int, events: int, repeat: int) -> dict:
    if threads == 0:
        return {"threads": 0, "nice": None, "ingest": ingest(events, repeat)}
    child = subprocess.Popen([sys.executable, __file__, "--child", "--model", str(model), "--threads", str(threads),
                              "--nice", str(nice)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if json.loads(child.stdout.readline()).get("ready") is not True:
        raise RuntimeError("the explainer process did not start")
    first = json.loads(child.stdout.readline())  # its first batch done: decoding at its steady pace
    got = ingest(events, repeat)
    child.send_signal(signal.SIGTERM)
    last = first
    for line in child.stdout:
        last = json.loads(line)
    child.wait(60)
    rate = (last["n"] - first["n"]) / (last["s"] - first["s"]) if last["s"] > first["s"] else None
    return {"threads": threads, "nice": nice, "ingest": got,
            "explainer": {"explanations_per_s": round(rate, 2) if rate else None,
                          "explanations": last["n"] - first["n"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/trail-smollm2"))
    ap.add_argument("--setups", default="0:0,1:0,2:0,2:10", help="THREADS:NICE,... (0 threads: ingest alone)")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--in-process", action="store_true",
                    help="the explainer as threads of the ingest bench's process (as in the worker), not a second one")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        explain_forever(args.model.resolve(), args.threads, args.nice)
        return 0
    runs = []
    for s in args.setups.split(","):
        threads, nice = (int(x) for x in s.split(":"))
        r = (setup_in_process if args.in_process else setup)(args.model.resolve(), threads, nice, args.events,
                                                              args.repeat)
        print(json.dumps({"threads": threads, "nice": nice,
                          "pipeline_events_per_s": r["ingest"]["pipeline_events_per_s"],
                          "explanations_per_s": r.get("explainer", {}).get("explanations_per_s")}),
              file=sys.stderr, flush=True)
        runs.append(r)
    result = {"command": " ".join(["python", "scripts/ingest_beside_explainer.py", *(argv or sys.argv[1:])]),
              "cpu_count": os.cpu_count(), "runs": runs}
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

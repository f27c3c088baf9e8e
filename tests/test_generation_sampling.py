"""Seeded sampling of explanations: the ONNX loop's sampler (on a fake decoder and a fake grammar), the
explainer's seed rule and record, the settings, and the trainer's evaluation (torch processor, report).

No exported model is needed: `FakeDecoder` runs `Generator.generate_batch` itself with a `_step` whose
next-token logits depend on each row's own real tokens only (as a real decoder's do), and `FakeGuide`
stands for llguidance with per-row allowed sets and forced tokens."""

from __future__ import annotations

import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stream.core import decoding
from stream.core.records import Explanation, Prediction, RecordError
from stream.model.onnx_models import Generator, Sampler, ShardedGenerator, _Cache, sample_token

V = 512
END = V - 1
TICK = 1_291_161_600_000  # 2010-12-01


def row_logits(hist: list[int], vocab: int = V) -> np.ndarray:
    """A fake decoder's next-token logits: a function of the row's tokens so far, nothing else."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(hist, np.int64).tobytes()))
    x = (rng.normal(size=vocab) * 2.5).astype(np.float32)
    x[END % vocab] += 0.3 * len(hist) - 6  # the end grows likelier as the text grows
    return x


class FakeDecoder(Generator):
    """`Generator`'s batched loop over a fake decoder (no ONNX session)."""

    def __init__(self, vocab: int = V, end: int = END) -> None:  # noqa: D107 - no super(): no session
        self.cuda = False
        self.end_id = end
        self.inputs = {"input_ids", "attention_mask", "position_ids"}
        self.cache = _Cache([], 1, 1, np.float32)
        self.vocab = vocab

    def _step(self, feed, past):
        ids, mask = feed["input_ids"], feed["attention_mask"]
        k = ids.shape[1]
        new = mask[:, -k:]
        hist = past["hist"] if "hist" in past else [[] for _ in range(len(ids))]
        hist = [h + [int(t) for t, m in zip(ids[i], new[i]) if m] for i, h in enumerate(hist)]
        logits = np.zeros((len(ids), k, self.vocab), np.float32)
        for i, h in enumerate(hist):
            logits[i, -1] = row_logits(h, self.vocab)
        cache = np.empty(len(hist), object)  # one entry per row, as a real KV cache: compaction drops rows of it
        for i, h in enumerate(hist):
            cache[i] = h
        return logits, {"hist": cache}


class FakeMatcher:
    """A grammar of one row: which tokens it allows depends on its parameter and what it consumed; after a
    token divisible by 4 it forces the next id; after 12 tokens it is complete (only the end token)."""

    def __init__(self, param: int) -> None:
        self.param, self.consumed = param, []

    def allowed(self) -> np.ndarray:
        if self.stopped():
            a = np.zeros(V, bool)
        else:
            a = (np.arange(V) * 31 + len(self.consumed) * 7 + self.param) % 5 == 0
            a[END] = len(self.consumed) >= 4
        a[END] |= self.stopped()
        return a

    def forced(self, limit: int) -> list[int]:
        last = self.consumed[-1] if self.consumed else END
        if self.stopped() or limit == 0 or last == END or last % 4:
            return []
        ff = [(last + 1) % END][:limit]
        self.consumed += ff
        return ff

    def stopped(self) -> bool:
        return len(self.consumed) >= 12


class FakeGuide:
    """stream.model.constraint.Guide's interface over FakeMatchers; refuses any token its mask did not allow."""

    def __init__(self, params: list[int]) -> None:
        self.matchers = [FakeMatcher(p) for p in params]
        self.masks: dict[int, np.ndarray] = {}
        self.seconds, self.forced, self.drawn = 0.0, 0, 0

    def mask(self, logits, rows=None):
        for i in range(len(self.matchers)) if rows is None else rows:
            self.masks[i] = a = self.matchers[i].allowed()
            logits[i, ~a] = -np.inf

    def advance(self, rows, tokens):
        for i, t in zip(rows, tokens):
            if not self.masks[i][t]:
                raise AssertionError(f"row {i}: token {t} is not allowed")
            self.matchers[i].consumed.append(int(t))
            self.drawn += 1

    def fast_forward(self, row, limit=None):
        ff = self.matchers[row].forced(limit if limit is not None else 10**9)
        self.forced += len(ff)
        return ff

    def stopped(self, row):
        return self.matchers[row].stopped()

    def part(self, rows):
        g = FakeGuide([])
        g.matchers = [self.matchers[i] for i in rows]
        return g

    def absorb(self, parts):
        for g in parts:
            self.seconds += g.seconds
            self.forced += g.forced
            self.drawn += g.drawn


def reference_greedy(prompt: list[int], param: int | None, limit: int) -> list[int]:
    """The greedy loop of one row, written out plainly (what generate_batch did before sampling)."""
    m = FakeMatcher(param) if param is not None else None
    hist, out = list(prompt), []
    while True:
        x = row_logits(hist)
        if m is not None:
            x[~m.allowed()] = -np.inf
        t = int(x.argmax())
        out.append(t)
        hist.append(t)
        if m is not None:
            m.consumed.append(t)
        if t == END or len(out) >= limit:
            return out
        if m is not None:
            ff = m.forced(limit - len(out))
            out += ff
            hist += ff
            if m.stopped() and len(out) < limit:
                return out + [END]
        if len(out) >= limit:
            return out


PROMPTS = [[3, 17, 200], [5, 9], [44, 45, 46, 47, 48], [101], [7, 7, 7, 2], [300, 1]]
PARAMS = [0, 1, 2, 3, 4, 1]
SEEDS = [11, 22, 33, 44, 55, 66]


def _run(gen, idx, **kw):
    guide = FakeGuide([PARAMS[i] for i in idx])
    out = gen.generate_batch([PROMPTS[i] for i in idx], 20, guide, seeds=[SEEDS[i] for i in idx], **kw)
    return out, guide


def test_temperature_zero_is_the_greedy_loop():
    gen = FakeDecoder()
    idx = list(range(len(PROMPTS)))
    want = [reference_greedy(PROMPTS[i], PARAMS[i], 20) for i in idx]
    assert gen.generate_batch(PROMPTS, 20, FakeGuide(PARAMS)) == want
    assert _run(gen, idx, temperature=0.0, top_p=0.3)[0] == want  # top_p and seeds unused when greedy
    assert gen.generate_batch(PROMPTS, 9) == [reference_greedy(p, None, 9) for p in PROMPTS]
    assert gen.generate(PROMPTS[2], 20, FakeGuide([PARAMS[2]])) == want[2]


def test_sampling_is_seeded_and_independent_of_the_batch():
    gen = FakeDecoder()
    kw = {"temperature": 0.8, "top_p": 0.95}
    idx = list(range(len(PROMPTS)))
    full, guide = _run(gen, idx, **kw)
    assert guide.forced > 0, "the fake grammar must force tokens (fast-forward) in this test"
    assert _run(gen, idx, **kw)[0] == full  # reproducible
    for sub in ([5, 0, 3], [2], [4, 3, 2, 1, 0, 5], [1, 1, 0]):  # other batch-mates, order, even duplicates
        assert _run(gen, sub, **kw)[0] == [full[i] for i in sub]
    greedy = _run(gen, idx)[0]
    assert full != greedy, "sampling at t=0.8 should leave greedy somewhere"
    other = gen.generate_batch(PROMPTS, 20, FakeGuide(PARAMS), temperature=0.8, top_p=0.95,
                               seeds=[s + 1 for s in SEEDS])
    assert other != full, "another seed, another text (somewhere)"
    single = gen.generate(PROMPTS[3], 20, FakeGuide([PARAMS[3]]), seed=SEEDS[3], **kw)
    assert single == full[3]


def test_sampled_tokens_are_allowed_and_forced_ones_kept():
    gen = FakeDecoder()
    idx = list(range(len(PROMPTS)))
    for seed_shift in range(5):
        guide = FakeGuide([PARAMS[i] for i in idx])  # advance() refuses any token outside the mask
        out = gen.generate_batch(PROMPTS, 20, guide, temperature=1.5, top_p=1.0,
                                 seeds=[s + seed_shift for s in SEEDS])
        for row, m in zip(out, guide.matchers):
            n = len(m.consumed)
            assert row[:n] == m.consumed  # every token went through the grammar, sampled or forced
            assert row[n:] in ([], [END])  # then, at most, the end token of a complete grammar
            for a, b in zip(m.consumed, m.consumed[1:]):
                if a % 4 == 0 and a != END and len(row) < 20:
                    assert b == (a + 1) % END  # forced tokens stay as the grammar forces them


def sharded(*parts) -> ShardedGenerator:
    """A ShardedGenerator over fake decoders (its own logic under test: the split, the seeds, the wait)."""
    gen = ShardedGenerator.__new__(ShardedGenerator)
    gen.parts, gen.end_id, gen.cuda = list(parts), END, False
    gen._pool = ThreadPoolExecutor(len(parts) - 1)
    return gen


def test_shards_give_each_row_the_one_batch_text_seed_and_matcher():
    idx = list(range(len(PROMPTS)))
    for kw in ({}, {"temperature": 0.8, "top_p": 0.95}):
        whole, guide = _run(FakeDecoder(), idx, **kw)
        for n in (2, 3, 4):
            gen = sharded(*[FakeDecoder() for _ in range(n)])
            out, split = _run(gen, idx, **kw)  # shard k decodes its rows on its own thread
            assert out == whole and (split.forced, split.drawn) == (guide.forced, guide.drawn)
            gen.close()
    gen = sharded(FakeDecoder(), FakeDecoder())
    assert gen.generate_batch([], 20) == []
    assert gen.generate_batch(PROMPTS[:1], 9) == [reference_greedy(PROMPTS[0], None, 9)]  # one row: one shard
    gen.close()


def test_a_failing_shard_waits_for_the_others_before_raising():
    done = []

    class Slow(FakeDecoder):
        def _step(self, feed, past):
            time.sleep(0.05)
            return super()._step(feed, past)

    class Failing(FakeDecoder):
        def _step(self, feed, past):
            raise RuntimeError("a shard failed")

    slow = Slow()
    original = slow.generate_batch
    slow.generate_batch = lambda *a, **k: done.append(original(*a, **k)) or done[-1]
    gen = sharded(Failing(), slow)
    with pytest.raises(RuntimeError, match="a shard failed"):
        gen.generate_batch(PROMPTS, 20)
    assert len(done) == 1  # the other shard had finished: none runs on into the next batch
    gen.close()


def test_tiny_top_p_is_greedy():
    gen = FakeDecoder()
    idx = list(range(len(PROMPTS)))
    greedy = _run(gen, idx)[0]
    for t in (0.3, 1.0, 50.0):
        assert _run(gen, idx, temperature=t, top_p=1e-9)[0] == greedy
    assert gen.generate_batch(PROMPTS, 9, temperature=2.0, top_p=1e-9, seeds=SEEDS) == gen.generate_batch(PROMPTS, 9)


def test_sample_token_nucleus_and_candidates():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    x = np.full(V, -np.inf, np.float32)
    x[[10, 20, 30, 40]] = np.log(probs)
    rng = np.random.Generator(np.random.PCG64(0))
    draws = [sample_token(x, 1.0, 0.75, rng) for _ in range(4000)]
    assert set(draws) == {10, 20}
    assert abs(draws.count(10) / 4000 - 0.5 / 0.8) < 0.03
    draws = [sample_token(x, 1.0, 1.0, rng) for _ in range(4000)]
    assert set(draws) == {10, 20, 30, 40} and abs(draws.count(40) / 4000 - 0.05) < 0.015
    # one allowed token: returned without a draw
    state = rng.bit_generator.state
    one = np.full(V, -np.inf, np.float32)
    one[7] = 0.0
    assert sample_token(one, 0.7, 0.9, rng) == 7 and rng.bit_generator.state == state
    # the top-candidates shortcut draws exactly what a full sort draws
    big = np.random.default_rng(1).normal(size=49_152).astype(np.float32) * 4
    for seed in range(30):
        a = sample_token(big, 0.7, 0.9, np.random.Generator(np.random.PCG64(seed)))
        b = sample_token(big, 0.7, 0.9, np.random.Generator(np.random.PCG64(seed)), candidates=10**6)
        assert a == b
    with pytest.raises(ValueError):
        Sampler(0.7, 0.0, [1])
    with pytest.raises(ValueError):
        FakeDecoder().generate_batch(PROMPTS, 4, temperature=0.7, seeds=[1])  # one seed per row


# ---- the explainer: seeds, records -------------------------------------------------------------------

class WordTokenizer:
    """PromptTokenizer's interface: a prompt is its words' lengths; id t decodes to "w<t>"."""

    end_id = END

    def ids(self, prompts):
        return [[len(w) % 50 for w in p.split()] or [1] for p in prompts]

    def decode(self, ids):
        return " ".join(f"w{t}" for t in ids if t != END)


def _signals(count_7d: float = 41, prev_7d: float = 12) -> dict[str, float]:
    s = {}
    for w, c, p in (("1d", 2, 1), ("7d", count_7d, prev_7d), ("28d", 4 * count_7d, 3 * prev_7d)):
        s |= {f"count_{w}": c, f"prev_count_{w}": p, f"users_{w}": c, f"velocity_{w}": c - p, f"accel_{w}": 0.0}
    return s | {"ema": count_7d, "total_count": 500.0, "age_h": 2000.0, "idle_h": 1.0}


def _movers(n: int = 4, tick: int = TICK):
    from stream.serving.explainer import Mover

    return [Mover(Prediction(f"item{i}", tick, 1.0, 30.0 + i, i + 1, _signals(41 + i), "v-test"),
                  f"prompt {'x' * i} of item {i} " * (i + 1), f"Item {i}") for i in range(n)]


async def _nothing(records):  # publish
    return None


def test_explainer_seeds_per_mover_and_says_how_it_decoded():
    from stream.core.records import tick_ms
    from stream.serving.explainer import Explainer

    calls = []

    def generate_batch(ids, limit, guide=None, **kw):
        calls.append(kw)
        return [[1, 2, END]] * len(ids)

    ex = Explainer(None, WordTokenizer(), "v-test", 16, _nothing, generate_batch=generate_batch,
                   temperature=0.7, top_p=0.9)
    movers = _movers()
    records = [r for r, _ in ex.explain_batch(movers)]
    want = [decoding.explanation_seed("v-test", m.prediction.item_id, TICK) for m in movers]
    assert tick_ms(movers[0].prediction.tick) == TICK
    assert calls[-1] == {"temperature": 0.7, "top_p": 0.9, "seeds": want}
    assert [r.decoding for r in records] == [f"sampled t=0.7 p=0.9 seed={s}, unconstrained" for s in want]
    assert Explanation.from_json(records[0].to_json()) == records[0]
    # greedy: the old call, no sampling arguments (callables without them still work)
    ex0 = Explainer(None, WordTokenizer(), "v-test", 16, _nothing, generate_batch=generate_batch, temperature=0)
    assert [r.decoding for r, _ in ex0.explain_batch(movers)] == ["greedy, unconstrained"] * 4 and calls[-1] == {}
    # the seed rule: model version, item, tick only
    assert len(set(want)) == 4
    assert decoding.explanation_seed("v-test", "item0", TICK + 1) != want[0]
    assert decoding.explanation_seed("v-other", "item0", TICK) != want[0]
    assert 0 <= want[0] < 2**64
    with pytest.raises(ValueError):
        Explainer(None, WordTokenizer(), "v", 16, _nothing, temperature=-1)
    ex.executor.shutdown()
    ex0.executor.shutdown()


def test_a_replayed_tick_gives_the_same_texts_whatever_the_batch():
    from stream.serving.explainer import Explainer

    gen = FakeDecoder()
    ex = Explainer(None, WordTokenizer(), "v-test", 16, _nothing, generate_batch=gen.generate_batch)
    assert (ex.temperature, ex.top_p) == (decoding.EXPLAIN_TEMPERATURE, decoding.EXPLAIN_TOP_P)
    movers = _movers(5)
    first = {r.item_id: r.raw_explanation for r, _ in ex.explain_batch(movers)}
    again = {r.item_id: r.raw_explanation for r, _ in ex.explain_batch(movers[::-1][:3])}
    assert again == {k: first[k] for k in again}
    greedy = Explainer(None, WordTokenizer(), "v-test", 16, _nothing, generate_batch=gen.generate_batch, temperature=0)
    assert {r.item_id: r.raw_explanation for r, _ in greedy.explain_batch(movers)} != first
    later = {r.item_id: r.raw_explanation for r, _ in ex.explain_batch(_movers(5, TICK + 3_600_000))}
    assert later != first, "another tick, other seeds"
    for e in (ex, greedy):
        e.executor.shutdown()


def test_explanation_record_decoding_field():
    from stream.store.clickhouse import TABLE_COLUMNS, to_columns

    e = Explanation("A", TICK, 1, "Up: 41 in 7 days.", True, 1, "m", decoding="sampled t=0.7 p=0.9 seed=5")
    d = e.to_dict()
    assert d["decoding"] == "sampled t=0.7 p=0.9 seed=5" and Explanation.from_dict(d) == e
    old = {k: v for k, v in d.items() if k != "decoding"}
    assert Explanation.from_dict(old).decoding is None  # records written before the field
    assert Explanation.from_dict(old).reason is None
    why = Explanation("A", TICK, 1, "Likely to fall: 41 in 7 days.", True, 1, "m", forecast="fall", reason="trend")
    assert Explanation.from_json(why.to_json()).reason == "trend"
    with pytest.raises(RecordError, match="reason must be one of"):
        Explanation("A", TICK, 1, "x", True, 1, "m", reason="vibes")
    assert "decoding" not in [c for c, _ in TABLE_COLUMNS[Explanation.table]]  # Kafka only: no DDL change
    assert len(to_columns(Explanation.table, [e], [e.tick])) == len(TABLE_COLUMNS[Explanation.table])
    with pytest.raises(ValueError):
        Explanation("A", TICK, 1, "x", True, 1, "m", decoding="")
    # which export wrote the text: said on the record, refused when it names none
    g = Explanation("A", TICK, 1, "x", True, 1, "m", generator="nbits8")
    assert Explanation.from_json(g.to_json()).generator == "nbits8" and Explanation.from_dict(old).generator is None
    assert "generator" not in [c for c, _ in TABLE_COLUMNS[Explanation.table]]
    with pytest.raises(RecordError, match="generator must be one of"):
        Explanation("A", TICK, 1, "x", True, 1, "m", generator="fp16")


def test_settings_flow_into_the_serving_config():
    from stream.settings import SettingsError, load_settings

    s = load_settings({"TRAIL_MODEL_DIR": "models/trail-smollm2"})
    assert (s.serving.explain_temperature, s.serving.explain_top_p) == (1.0, 0.95)
    s = load_settings({"TRAIL_MODEL_DIR": "m", "TRAIL_EXPLAIN_TEMPERATURE": "0", "TRAIL_EXPLAIN_TOP_P": "0.5"})
    assert (s.serving.explain_temperature, s.serving.explain_top_p) == (0.0, 0.5)
    for bad in ({"TRAIL_EXPLAIN_TEMPERATURE": "-0.1"}, {"TRAIL_EXPLAIN_TOP_P": "0"}, {"TRAIL_EXPLAIN_TOP_P": "1.5"}):
        with pytest.raises(SettingsError):
            load_settings(bad)


# ---- the trainer's evaluation ------------------------------------------------------------------------

def test_torch_sample_processor_draws_with_the_stream_sampler():
    torch = pytest.importorskip("torch")
    from trainer.explain_eval import SampleProcessor

    rng = np.random.default_rng(3)
    scores = torch.from_numpy((rng.normal(size=(3, V)) * 2).astype(np.float32))
    scores[1, 100:] = -float("inf")  # as a guide would mask
    proc = SampleProcessor(Sampler(0.7, 0.9, [5, 6, 7]), prompt_len=4, end_id=END)
    ids = torch.tensor([[1, 2, 3, 4, 9], [1, 2, 3, 4, END], [1, 2, 3, 4, 8]])
    out = proc(ids, scores.clone())
    ref = Sampler(0.7, 0.9, [5, 6, 7])
    for i in (0, 2):
        t = ref.row(scores[i].numpy(), i)
        assert torch.isfinite(out[i]).sum() == 1 and int(out[i].argmax()) == t
    assert torch.equal(out[1], scores[1]) and proc.done == {1}  # a finished row is left alone


@pytest.fixture(scope="module")
def tiny_lm():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   eos_token_id=63, pad_token_id=63, bos_token_id=0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    return SimpleNamespace(lm=lm, end_id=63)


def test_torch_generate_ids_sampled_is_seeded_and_greedy_unchanged(tiny_lm):
    from trainer.explain_eval import generate_ids

    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    seeds = [101, 202, 303, 404]
    greedy = generate_ids(tiny_lm, rows, 8)
    assert generate_ids(tiny_lm, rows, 8, temperature=0.0, top_p=0.5, seeds=seeds) == greedy
    assert generate_ids(tiny_lm, rows, 8, temperature=0.9, top_p=1e-9, seeds=seeds) == greedy
    sampled = generate_ids(tiny_lm, rows, 8, temperature=1.0, top_p=0.95, seeds=seeds)
    assert sampled != greedy
    assert generate_ids(tiny_lm, rows, 8, temperature=1.0, top_p=0.95, seeds=seeds) == sampled
    one = [generate_ids(tiny_lm, [r], 8, temperature=1.0, top_p=0.95, seeds=[s])[0] for r, s in zip(rows, seeds)]
    assert one == sampled  # each row's draws are its own, whatever shares its batch
    assert generate_ids(tiny_lm, rows, 8, batch=2, temperature=1.0, top_p=0.95, seeds=seeds) == sampled


def test_evaluation_samples_the_constrained_texts_only(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    import pandas as pd

    import trainer.explain_eval as ee

    s = _signals()
    names = list(s)
    rows = pd.DataFrame([{**s, "item_id": f"i{k}", "cutoff_ms": TICK + k, "title": f"T{k}", "category": "c",
                          "label_count": 40.0, "predicted_count": 60.0} for k in range(3)])
    calls = []

    def fake_explain_texts(model, prompts, **kw):
        calls.append(kw)
        return ["Bought 41 times in the last 7 days, up from 12 the week before."] * len(prompts)

    monkeypatch.setattr(ee, "explain_texts", fake_explain_texts)
    monkeypatch.setattr(ee, "zero_shot", lambda model, prompts, batch=16: ["41 sales."] * len(prompts))
    (tmp_path / "manifest.json").write_text(json.dumps({"model_version": "m-eval"}))
    model = SimpleNamespace(norm=SimpleNamespace(signal_names=names))
    out = ee.evaluate_explanations(model, rows, 7, model_dir=str(tmp_path))
    constrained, free = calls
    assert constrained["temperature"] == decoding.EXPLAIN_TEMPERATURE and constrained["top_p"] == decoding.EXPLAIN_TOP_P
    assert constrained["seeds"] == [decoding.explanation_seed("m-eval", f"i{k}", TICK + k) for k in range(3)]
    assert "temperature" not in free and "seeds" not in free  # unconstrained: greedy
    m = out["metrics"]
    assert m["trail_raw"]["decoding"]["mode"] == "sampled" and m["trail_raw"]["decoding"]["temperature"] == 1.0
    assert m["trail"]["decoding"] == m["trail_raw"]["decoding"] and m["trail"]["decoding"]["model_version"] == "m-eval"
    assert m["trail_unconstrained"]["decoding"] == {"mode": "greedy"} == m["base_zero_shot"]["decoding"]
    calls.clear()
    out = ee.evaluate_explanations(model, rows, 7, zero_shot_too=False, temperature=0)
    assert calls[0]["seeds"] is None and out["metrics"]["trail_raw"]["decoding"] == {"mode": "greedy"}


def test_evaluate_cli_flags():
    from trainer.evaluate import build_parser

    a = build_parser().parse_args(["--dataset", "retail"])
    assert (a.explain_temperature, a.explain_top_p) == (decoding.EXPLAIN_TEMPERATURE, decoding.EXPLAIN_TOP_P)
    a = build_parser().parse_args(["--dataset", "retail", "--explain-temperature", "0", "--explain-top-p", "0.5"])
    assert (a.explain_temperature, a.explain_top_p) == (0.0, 0.5)
    for bad in (["--explain-temperature", "-1"], ["--explain-top-p", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--dataset", "retail", *bad])

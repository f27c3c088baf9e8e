"""Faithful decoding: the claim grammar, its llguidance constraint, batched generation (ONNX and torch)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pandas as pd
import pytest

from stream.core.faithfulness import check
from stream.core.faithfulness.grammar import OUTLOOKS, claim_grammar
from stream.core.forecast import outlook, pace
from stream.core.prompts import render_prompt
from test_explanations import cases, trend_table_rows


def test_every_sentence_of_the_grammar_is_true_and_forecasts_as_told():
    """Random sentences of the language (all shapes, phrasings, facts) pass the checker with >= 1 claim
    and state exactly the forced forecast, on rows with zeros, ties, single users, huge counts,
    four window sets and horizons 1/7/28."""
    rng = random.Random(0)
    rows = [(r, h) for r, h, _, _ in cases(600, 11)] + [(r, 7) for r in trend_table_rows()[:200]]
    for row, h in rows:
        for fc in OUTLOOKS:
            g = claim_grammar(row, h, fc)
            for _ in range(2):
                text = g.sample(rng)
                r = check(text, row)
                assert r.faithful and r.checked >= 1, (text, row, [(c.text, c.reason) for c in r.claims if not c.ok])
                assert r.outlook == fc, (text, fc)


def test_grammar_is_valid_lark_for_llguidance(smollm2_tokenizer):
    from stream.model.constraint import ClaimConstraint

    cc = ClaimConstraint(smollm2_tokenizer.backend_tokenizer.to_str(), smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    rng = random.Random(1)
    for row, h, _, _ in cases(40, 3):
        g = claim_grammar(row, h, rng.choice(OUTLOOKS))
        guide = cc.guide([g.lark()])
        text = g.sample(rng)
        ids = smollm2_tokenizer(" " + text, add_special_tokens=False).input_ids + [cc.end_id]
        for t in ids:  # the tokenisation of any sentence of the language is allowed step by step
            guide.mask(logits := np.zeros((1, cc.vocab_size), np.float32), [0])
            assert np.isfinite(logits[0, t]), (text, t)
            guide.advance([0], [t])
        assert guide.matchers[0].is_stopped()


# ---- real prompts, the exported artefact -------------------------------------------------------------

@pytest.fixture(scope="module")
def real_rows(retail_between):
    """Real Online Retail II rows: the last cut-off of two months, its busiest items and a random rest."""
    from trainer.examples import build_examples

    ex = build_examples(retail_between("2010-01-01", "2010-03-15"))
    rows = ex.rows(ex.cutoffs[-1:])
    rows = rows.sort_values("count_7d", ascending=False)
    pick = pd.concat([rows.head(6), rows.iloc[6:].sample(6, random_state=0)])
    return pick.reset_index(drop=True), ex


@pytest.fixture(scope="module")
def onnx_parts():
    """The exported generator and tokenizer (tests/serving_artefact.py; TRAIL_GENERATOR_ARTEFACT=DIR points
    at another exported artefact: only its generator and tokenizer files are used)."""
    import os
    from pathlib import Path

    from stream.model.artefact import PromptTokenizer, read_export
    from stream.model.constraint import ClaimConstraint
    from stream.model.onnx_models import CPU, Generator

    if os.environ.get("TRAIL_GENERATOR_ARTEFACT"):
        d = Path(os.environ["TRAIL_GENERATOR_ARTEFACT"])
    else:
        from serving_artefact import exported_artefact

        d = exported_artefact()
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["onnx"] = read_export(d)
    files = manifest["onnx"]["files"]
    cfg = manifest["trail_config"]
    tok = PromptTokenizer(d / files["tokenizer"]["path"], cfg["max_prompt_tokens"],
                          manifest["onnx"].get("tokenizer", {}).get("clean_up_tokenization_spaces", False))
    gen = Generator(d / files["generator"]["path"], [CPU], tok.end_id, threads=2)
    return None, tok, gen, ClaimConstraint(d / files["tokenizer"]["path"], tok.end_id)


def _prompts_and_signals(real_rows):
    from trainer.inference import prompts_of
    from stream.core.prompts import signal_windows

    rows, ex = real_rows
    names = [c for c in rows.columns if c.split("_")[0] in ("count", "prev", "users", "velocity", "accel")
             or c in ("ema", "total_count", "age_h", "idle_h")]
    signals = [dict(zip(names, r)) for r in rows[names].to_numpy(np.float64).tolist()]
    assert signal_windows(signals[0])
    return prompts_of(rows, names, 7), signals, rows["title"].astype(str).tolist()


def test_batched_greedy_equals_one_at_a_time(onnx_parts, real_rows):
    art, tok, gen, _ = onnx_parts
    prompts, _, _ = _prompts_and_signals(real_rows)
    ids = tok.ids(prompts[:5])
    assert len({len(i) for i in ids}) > 1, "the batch must mix prompt lengths (left padding)"
    single = [gen.generate(i, 20) for i in ids]
    assert gen.generate_batch(ids, 20) == single


def test_constrained_outputs_pass_the_checker_with_the_forced_forecast(onnx_parts, real_rows):
    art, tok, gen, cc = onnx_parts
    prompts, signals, titles = _prompts_and_signals(real_rows)
    forecasts = [OUTLOOKS[i % 3] for i in range(len(prompts))]  # every direction, whatever the trend
    guide = cc.guide([claim_grammar(s, 7, f).lark() for s, f in zip(signals, forecasts)])
    new = gen.generate_batch(tok.ids(prompts), 64, guide)
    for n, s, f, t in zip(new, signals, forecasts, titles):
        assert n[-1] == tok.end_id, "the grammar ends the text before the limit"
        text = tok.decode(n)
        r = check(text, s, title=t)
        assert r.faithful and r.checked >= 1 and r.outlook == f, (text, f)


def test_explainer_batches_and_constrains(onnx_parts, real_rows):
    import asyncio

    from stream.core.records import Prediction
    from stream.serving.explainer import ExplainRequest, Explainer, Mover

    art, tok, gen, cc = onnx_parts
    prompts, signals, titles = _prompts_and_signals(real_rows)
    tick = 1_268_611_200_000
    preds = [Prediction(f"i{i}", tick, 1.0, pace(s, 7) * (0.2, 1.0, 3.0)[i % 3] + 3 * (i % 3 - 1), i + 1, s, "v")
             for i, s in enumerate(signals[:5])]
    published = []

    async def publish(records):
        published.extend(records)

    async def main():
        ex = Explainer(gen.generate, tok, "v", 48, publish, horizon_days=7, generate_batch=gen.generate_batch,
                       constraint=cc, batch_size=5)
        ex.start()
        ex.offer(ExplainRequest(tick, [Mover(p, pr, t) for p, pr, t in zip(preds, prompts, titles)]))
        await asyncio.sleep(0.01)
        await ex.wait_idle(300)
        await ex.stop()
        return ex

    ex = asyncio.run(main())
    assert ex.stats.batches == 1 and ex.stats.explained == 5 and ex.stats.constrained == 5
    for r, p in zip(published, preds):
        assert r.faithful and not r.repaired and r.raw_explanation == r.explanation
        assert r.forecast == outlook(p.predicted_count, pace(p.signals, 7)) and r.forecast_agrees
        assert r.decoding.endswith(", claim grammar"), r.decoding  # the record says the system fixed the claims


def test_explainer_states_size_range_and_the_top_driver_with_the_real_model(onnx_parts, real_rows):
    """The real generator under the grammar, on real retail rows: a prediction with a range and drivers (as the
    score helper's quantile heads will give) and one without (today's v6) are both published faithful, unrepaired,
    stating their own size (and range), the reason their drivers name and where it came from."""
    import asyncio

    from stream.core.forecast import stated_range, stated_size
    from stream.core.records import Prediction
    from stream.serving.explainer import ExplainRequest, Explainer, Mover

    art, tok, gen, cc = onnx_parts
    prompts, signals, titles = _prompts_and_signals(real_rows)
    tick = 1_268_611_200_000
    preds = []
    for i, s in enumerate(signals[:4]):
        count = pace(s, 7) * (0.3, 2.5)[i % 2] + 2
        ranged = i < 2
        preds.append(Prediction(f"i{i}", tick, 1.0, count, i + 1, s, "v",
                                predicted_low=0.6 * count if ranged else None,
                                predicted_high=1.6 * count if ranged else None,
                                drivers={"trend": 0.5, "level": -0.5, "text": 0.1} if ranged else None))
    published = []

    async def publish(records):
        published.extend(records)

    async def main():
        ex = Explainer(gen.generate, tok, "v", 48, publish, horizon_days=7, generate_batch=gen.generate_batch,
                       constraint=cc, batch_size=4, temperature=0.0)
        ex.start()
        ex.offer(ExplainRequest(tick, [Mover(p, pr, t) for p, pr, t in zip(preds, prompts, titles)]))
        await asyncio.sleep(0.01)
        await ex.wait_idle(300)
        await ex.stop()

    asyncio.run(main())
    assert len(published) == 4
    for r, p in zip(published, preds):
        assert r.faithful and not r.repaired and r.forecast_agrees, r
        assert f"{stated_size(p.predicted_count)} " in r.explanation, r.explanation
        if p.predicted_low is not None:
            lo, hi = stated_range(p.predicted_low, p.predicted_high)
            assert f"{lo}–{hi}" in r.explanation, r.explanation
            assert r.driver == ("trend" if r.forecast == "rise" else "level")
            if r.reason is not None:
                assert r.reason_source in ("drivers", "rule")
                assert (r.reason_source == "drivers") == (r.reason == r.driver), r
        else:
            assert "–" not in r.explanation and r.driver is None and r.reason_source in (None, "rule")


# ---- torch side (the shipped adapter) ------------------------------------------------------------

def test_torch_batched_constrained_generation(real_rows):
    torch = pytest.importorskip("torch")
    from pathlib import Path
    from types import SimpleNamespace

    from trainer.explain_eval import explain_texts
    from trainer.model import END_TOKEN, load_base

    adapter = Path(__file__).resolve().parent.parent / "models" / "trail-smollm2" / "adapter"
    if not adapter.is_dir():
        pytest.skip("no shipped adapter")
    from peft import PeftModel

    from shared_cache import CACHE_DIR

    lm, tok = load_base("smollm2-135m-instruct", cache_dir=CACHE_DIR)
    lm = PeftModel.from_pretrained(lm, adapter).eval()
    m = SimpleNamespace(lm=lm, tokenizer=tok, end_id=tok.convert_tokens_to_ids(END_TOKEN),
                        cfg=SimpleNamespace(max_explanation_tokens=24, max_prompt_tokens=80))
    prompts, signals, titles = _prompts_and_signals(real_rows)
    prompts, signals, titles = prompts[:4], signals[:4], titles[:4]
    forecasts = ["rise", "fall", "steady", "fall"]
    texts = explain_texts(m, prompts, signals=signals, forecasts=forecasts, horizon_days=7, batch=4)
    for text, s, f, t in zip(texts, signals, forecasts, titles):
        r = check(text, s, title=t)
        assert r.faithful and r.checked >= 1 and r.outlook == f, (text, f)
    # unconstrained, batched with left padding == one at a time
    free = explain_texts(m, prompts[:3], max_new_tokens=12, batch=3)
    assert free == [explain_texts(m, [p], max_new_tokens=12, batch=1)[0] for p in prompts[:3]]
    del torch


def test_forecast_metrics_and_seeded_samples(tmp_path):
    from trainer.explain_eval import forecast_metrics, samples_markdown, score_trail, write_samples

    s = {"count_1d": 2.0, "count_7d": 41.0, "prev_count_7d": 12.0, "users_7d": 29.0, "count_28d": 90.0,
         "prev_count_28d": 80.0, "users_28d": 51.0, "age_h": 2880.0}
    texts = ["Likely to rise next week. 41 events in the last 7 days, up from 12 the week before.",
             "41 events in the last 7 days, up from 12 the week before, but likely to cool off next week.",
             "41 events in the last 7 days."]
    m = forecast_metrics(texts, [s] * 3, ["A"] * 3, ["rise", "rise", "fall"], ["rise", "fall", "fall"])
    assert m["forecast_agreement"] == pytest.approx(1 / 3) and m["forecast_accuracy"] == pytest.approx(2 / 3)
    assert m["majority_accuracy"] == pytest.approx(2 / 3) and m["forecasts"] == {"rise": 1, "fall": 1, "none": 1}
    report, samples = score_trail(texts, [s] * 3, ["A"] * 3, ["a", "b", "c"], texts, ["rise"] * 3, ["fall"] * 3)
    assert set(report) == {"trail", "trail_raw", "trail_unconstrained"}
    assert report["trail_raw"]["forecast_agreement"] == pytest.approx(1 / 3)
    rep = {"dataset": "x", "explanation_samples": samples, "model": {"dir": "m"}}
    md = samples_markdown([rep], n=2, seed=0)
    assert md == samples_markdown([rep], n=2, seed=0) and md.count("\n| ") == 2 + 1  # header + 2 rows
    doc = tmp_path / "d.md"
    from trainer.explain_eval import SAMPLES_BEGIN, SAMPLES_END

    doc.write_text(f"a\n{SAMPLES_BEGIN}\nold\n{SAMPLES_END}\nb\n")
    write_samples(str(doc), md)
    assert "old" not in doc.read_text() and doc.read_text().startswith("a\n") and doc.read_text().endswith("b\n")


def test_the_grammar_admits_a_movers_reason(smollm2_tokenizer):
    """The targets' "..., but <longer window's trend>" for a mover is in the item's language, token by token."""
    from stream.model.constraint import ClaimConstraint
    from test_explanations import MOVER
    from trainer.explanations import target_explanation

    cc = ClaimConstraint(smollm2_tokenizer.backend_tokenizer.to_str(), smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    lark = claim_grammar(MOVER, 7, "rise").lark()
    texts = {target_explanation(MOVER, 7, random.Random(s), outlook="rise") for s in range(60)}
    texts = [t for t in texts if re.search(r"(28 days|four weeks), 109 \w+, up|from 97 to 109", t)]
    assert len(texts) >= 5
    for text in texts:
        guide = cc.guide([lark])
        for t in smollm2_tokenizer(" " + text, add_special_tokens=False).input_ids + [cc.end_id]:
            guide.mask(logits := np.zeros((1, cc.vocab_size), np.float32), [0])
            assert np.isfinite(logits[0, t]), text
            guide.advance([0], [t])
        assert guide.matchers[0].is_stopped()


def test_reason_metrics_count_movers_that_say_why():
    from test_explanations import MOVER
    from trainer.explain_eval import reason_metrics

    texts = ["Likely to rise: 29 events in the last 7 days, down from 34 the week before, but 109 events in the "
             "last 28 days, up from 97 the previous 28 days.",  # against the 7d trend, with its reason
             "Likely to rise: 29 events in the last 7 days, down from 34 the week before.",  # no reason
             "Likely to fall: 29 events in the last 7 days, down from 34 the week before.",  # follows the trend
             "Likely to stay steady: 29 events in the last 7 days, down from 34 the week before."]
    m = reason_metrics(texts, [MOVER] * 4, ["Lunch bag"] * 4, 7)
    assert m == {"against_trend": 2, "reason_share": 0.5, "reason_available": 2, "level_available": 0, "driver_agreement": None, "driver_rows": 0,
                 "driver_rows_against": 0, "driver_agreement_all_rows": None}
    # a forecast of a rise after a fall with the 28d trend down too has no reason to give
    m = reason_metrics(texts[1:2], [dict(MOVER, prev_count_28d=120.0)], ["Lunch bag"], 7)
    assert m == {"against_trend": 1, "reason_share": 0.0, "reason_available": 0, "level_available": 0, "driver_agreement": None, "driver_rows": 0,
                 "driver_rows_against": 0, "driver_agreement_all_rows": None}
    # a spike forecast to cool off, no window's trend backing it: its level does
    from test_explanations import SPIKE
    spiky = ["Likely to fall: 33 events in the last 7 days, up from 24 the week before, but already above its "
             "28-day pace.", "Likely to fall: 33 events in the last 7 days, up from 24 the week before."]
    m = reason_metrics(spiky, [SPIKE] * 2, ["Lunch bag"] * 2, 7)
    assert m == {"against_trend": 2, "reason_share": 0.5, "reason_available": 2, "level_available": 2, "driver_agreement": None, "driver_rows": 0,
                 "driver_rows_against": 0, "driver_agreement_all_rows": None}


def test_a_mover_with_a_reason_must_give_it():
    """Where why_window names a window, every sentence of the language cites its trend; elsewhere it is optional."""
    from test_explanations import MOVER, _cites_long_trend

    rng = random.Random(2)
    g = claim_grammar(MOVER, 7, "rise")
    assert all(_cites_long_trend(g.sample(rng), MOVER) for _ in range(200))
    steady = claim_grammar(MOVER, 7, "steady")
    assert not any(_cites_long_trend(steady.sample(rng), MOVER) for _ in range(200))


def test_a_spike_forecast_to_cool_off_must_say_it_is_above_its_pace():
    """No window's trend backs a fall after a rise, but the week is well above its 28-day pace: every
    sentence of the language says so; the same row forecast to rise, or a row near its pace, need not."""
    from test_explanations import SPIKE

    rng = random.Random(3)
    level = lambda t, row: [c for c in check(t, row).claims if c.kind == "level"]  # noqa: E731
    for _ in range(200):
        text = claim_grammar(SPIKE, 7, "fall").sample(rng)
        assert [(c.stated, c.ok) for c in level(text, SPIKE)] == [("above", True)], text
    near = dict(SPIKE, count_28d=120.0, prev_count_28d=100.0)  # 33 against a pace of 30: within the band
    for row, fc in ((SPIKE, "rise"), (SPIKE, "steady"), (near, "fall")):
        assert not any(level(claim_grammar(row, 7, fc).sample(rng), row) for _ in range(100)), (row, fc)


def test_a_count_without_users_is_not_told_from_0_users():
    """Events with no user id (retail's guest purchases, a log without users) count but have no user:
    neither the grammar nor the training targets may say "from 0 users" about them."""
    from trainer.explanations import target_explanation

    row = {"count_1d": 4.0, "prev_count_1d": 0.0, "users_1d": 0.0, "velocity_1d": 4.0, "accel_1d": 4.0,
           "count_7d": 9.0, "prev_count_7d": 3.0, "users_7d": 0.0, "velocity_7d": 6.0, "accel_7d": 2.0,
           "count_28d": 20.0, "prev_count_28d": 18.0, "users_28d": 0.0, "velocity_28d": 2.0, "accel_28d": 0.0,
           "ema": 3.0, "total_count": 80.0, "age_h": 900.0, "idle_h": 2.0}
    user_words = re.compile(r"\b(users?|people|person)\b")
    rng = random.Random(0)
    for fc in OUTLOOKS:
        g = claim_grammar(row, 7, fc)
        assert not user_words.search(g.lark()), fc
        for _ in range(50):
            assert not user_words.search(g.sample(rng))
    texts = [target_explanation(row, 7, random.Random(s)) for s in range(200)]
    assert not any(user_words.search(t) for t in texts)
    with_users = dict(row, users_7d=5.0)  # the same row with known users does cite them
    assert any(user_words.search(target_explanation(with_users, 7, random.Random(s))) for s in range(200))


def test_every_target_is_a_sentence_of_its_grammar(smollm2_tokenizer):
    """What the LLM is trained to write is what the constrained decoder lets it write, token by token: targets
    of every shape and second fact (the window before the number: "; in the last 28 days, 379 events"), with the
    forecast's size and range, on random rows of four window sets and three horizons."""
    from stream.core.faithfulness.grammar import reason_plan
    from stream.core.forecast import PredictedCount
    from stream.model.constraint import ClaimConstraint
    from trainer.explanations import target_explanation

    cc = ClaimConstraint(smollm2_tokenizer.backend_tokenizer.to_str(), smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    seconds, n = set(), 0
    for row, h, fc, rng in cases(120, 5):
        fc = fc or rng.choice(OUTLOOKS)
        size = PredictedCount(count={"rise": 60.0, "fall": 1.0, "steady": 40.0}[fc], horizon_days=h, low=1.0, high=90.0)
        text = target_explanation(row, h, rng, outlook=fc, size=size)
        if check(text, row, prediction=size).outlook != fc or reason_plan(row, h, fc, None) is not None:
            continue  # the size states another outlook; a mover's reason the grammar requires (its own test)
        seconds.update(re.findall(r"; (in|over|from|by|across|first|now|around)\b", text))
        n += 1
        guide = cc.guide([claim_grammar(row, h, fc, size=size).lark()])
        for t in smollm2_tokenizer(" " + text, add_special_tokens=False).input_ids + [cc.end_id]:
            guide.mask(logits := np.zeros((1, cc.vocab_size), np.float32), [0])
            assert np.isfinite(logits[0, t]), text
            guide.advance([0], [t])
        assert guide.matchers[0].is_stopped(), text
    assert n >= 60 and {"in", "over", "from"} <= seconds, (n, seconds)

"""The explainer's speed work keeps its texts (issue 20, item 5): a batch that drops its finished rows
(`Generator.generate_batch(compact=True)`) gives the full batch's tokens, constrained and not, and the bench
reports the comparisons beside its contract fields."""

from __future__ import annotations

import json
import pytest

from stream.core.faithfulness.grammar import CONSTRAINED_MAX_NEW_TOKENS, claim_grammar
from stream.core.forecast import PredictedCount
from stream.core.prompts import render_prompt
from stream.core.trends import TrendConfig
from stream.model.artefact import Artefact
from stream.model.constraint import ClaimConstraint
from stream.model.onnx_models import CPU, Generator
from serving_artefact import exported_artefact


def signals(count_7d: float, prev_7d: float, count_1d: float, age_h: float) -> dict[str, float]:
    s = {}
    for w, c, p in (("1d", count_1d, 1), ("7d", count_7d, prev_7d), ("28d", 4 * count_7d, 3 * prev_7d)):
        s |= {f"count_{w}": c, f"prev_count_{w}": p, f"users_{w}": c, f"velocity_{w}": c - p, f"accel_{w}": 0.0}
    return s | {"ema": count_7d, "total_count": 500.0, "age_h": age_h, "idle_h": 1.0}


# five items of one tick, different enough that their texts end at different steps
ITEMS = [("WHITE HANGING HEART T-LIGHT HOLDER", "home", signals(41, 12, 6, 2000), 60.0),
         ("PAPER CHAIN KIT 50'S CHRISTMAS", None, signals(93, 118, 21, 17000), 90.0),
         ("Toy Story (1995)", "Animation|Comedy", signals(0, 1, 0, 900), 0.0),
         ("RABBIT NIGHT LIGHT", "lighting", signals(116, 123, 25, 4872), 200.0),
         ("JUMBO BAG RED RETROSPOT", "bags", signals(7, 30, 1, 300), 3.0)]


@pytest.fixture(scope="module")
def artefact() -> Artefact:
    d = exported_artefact()
    return Artefact.load(d, TrendConfig.from_spec(json.loads((d / "manifest.json").read_text())["feature_spec"]))


@pytest.fixture(scope="module")
def gen(artefact) -> Generator:
    return Generator(artefact.path("generator"), [CPU], artefact.tokenizer().end_id, threads=1)


@pytest.fixture(scope="module")
def batch(artefact) -> tuple[list[list[int]], list[str], ClaimConstraint, int]:
    """ITEMS as one tick's movers: (prompt ids, claim grammars, the constraint, the constrained token limit)."""
    tok = artefact.tokenizer()
    prompts = tok.ids([render_prompt(t, c, s, 7, month="Dec") for t, c, s, _ in ITEMS])
    sizes = [PredictedCount(p, 7, 0.7 * p, 1.4 * p) for *_, p in ITEMS]
    grammars = [claim_grammar(s, 7, z.direction(s), size=z).lark() for (_, _, s, _), z in zip(ITEMS, sizes)]
    cc = ClaimConstraint(artefact.path("tokenizer"), tok.end_id)
    return prompts, grammars, cc, max(artefact.max_explanation_tokens, CONSTRAINED_MAX_NEW_TOKENS)


def test_a_compacted_batch_gives_the_full_batchs_texts(gen, batch):
    prompts, grammars, cc, limit = batch
    steps = []
    step = gen._step

    def counted(feed, past):  # the batch width of every pass
        steps.append(feed["input_ids"].shape[0])
        return step(feed, past)

    gen._step = counted
    try:
        full = gen.generate_batch(prompts, limit, cc.guide(grammars), compact=False)
        assert set(steps) == {len(ITEMS)}
        steps.clear()
        compact = gen.generate_batch(prompts, limit, cc.guide(grammars), compact=True)
        assert steps[0] == len(ITEMS) and min(steps) < len(ITEMS)  # rows left the batch as they finished
        free_full = gen.generate_batch(prompts, 24, compact=False)
        free_compact = gen.generate_batch(prompts, 24, compact=True)
    finally:
        del gen._step
    assert compact == full
    assert free_compact == free_full
    assert len({len(x) for x in full}) > 1  # texts of different lengths: the case compaction is for
    assert full == [gen.generate_batch([p], limit, cc.guide([g]))[0] for p, g in zip(prompts, grammars)]


def test_a_sharded_generator_gives_each_row_the_batchs_text(artefact, gen, batch):
    """TRAIL_EXPLAIN_THREADS=2: the rows split between two single-thread sessions decoding at once; each row keeps
    its own text, seed and matcher, and the guide counts the shards' forced tokens and steps together."""
    from stream.model.onnx_models import ShardedGenerator

    prompts, grammars, cc, limit = batch
    sharded = ShardedGenerator(artefact.path("generator"), [CPU], artefact.tokenizer().end_id, 2)
    try:
        whole, split = cc.guide(grammars), cc.guide(grammars)
        assert sharded.generate_batch(prompts, limit, split) == gen.generate_batch(prompts, limit, whole)
        assert split.forced == whole.forced > 0 and split.steps >= whole.steps  # each shard steps on its own
        seeds = [11, 12, 13, 14, 15]
        assert (sharded.generate_batch(prompts, limit, cc.guide(grammars), temperature=0.7, top_p=0.9, seeds=seeds)
                == gen.generate_batch(prompts, limit, cc.guide(grammars), temperature=0.7, top_p=0.9, seeds=seeds))
        assert sharded.generate_batch([], limit) == []
    finally:
        sharded.close()


def test_the_bench_reports_explanation_speed_with_its_comparisons(artefact):
    from export.bench import explanation_bench

    rows = [(render_prompt(t, c, s, 7, month="Dec"), s, 7.0) for t, c, s, _ in ITEMS]
    # the headline on two threads: the stream's default on a 2-core machine (two shards), its passes timed per shard
    got = explanation_bench(artefact, rows, [CPU], 2, batch=5, single=1)
    for field in ("explanations_per_s", "explanations_per_cpu_s", "explanations_per_s_single",  # the contract
                  "explanations_per_s_unconstrained", "explain_decode_pass_share", "explain_faithful_share",
                  "explanations_per_s_uncompacted", "explanations_per_cpu_s_uncompacted",
                  "explanations_per_s_batch10", "explanations_per_cpu_s_batch10",
                  "explanations_per_s_threads2", "explanations_per_cpu_s_threads2", "explanations_per_s_fp32",
                  "explanations_per_s_threads2_intra_op", "explanations_per_s_threads1"):
        assert got[field] > 0, field
    assert got["explain_rows"] == 5 and got["explain_faithful_share"] == 1.0
    assert got["explain_threads"] == 2 and got["explain_decode_passes"] > 0
    assert 0 < got["explain_prompt_pass_share"] + got["explain_decode_pass_share"] <= 1.05
    # the generator the stream's explainer would serve from this export (fp32 unless an 8-bit copy passed its check)
    from stream.model.teacher_forced import generator_role

    assert got["explain_generator"] == generator_role(artefact, [CPU])

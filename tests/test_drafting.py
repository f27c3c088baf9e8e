"""Speculative greedy decoding (stream.model.drafting + Generator's drafted loop): the same texts as one token
per step, on real prompts held to their claim grammars."""

from __future__ import annotations

import pytest

from stream.core.faithfulness.grammar import claim_grammar
from stream.core.forecast import OUTLOOKS, PredictedCount, pace
from stream.model.drafting import NgramDrafter
from test_constrained import _prompts_and_signals, onnx_parts, real_rows  # noqa: F401 - pytest fixtures


def test_drafter_proposes_what_followed_the_longest_known_context():
    d = NgramDrafter(order=3, min_order=2, min_seen=1)
    d.learn([1, 2, 3, 4, 9, 2, 3, 5])
    assert d.propose([7, 2, 3]) == 5  # (2, 3) -> 5 is the latest continuation
    assert d.propose([1, 2, 3]) == 4  # the 3-gram (1, 2, 3) -> 4 wins over the 2-gram
    assert d.propose([3]) is None and d.propose([8, 8]) is None  # one token is too short; unknown context


def test_drafter_waits_until_a_continuation_repeats():
    d = NgramDrafter(order=2, min_order=2, min_seen=2)
    d.learn([1, 2, 3])
    assert d.propose([1, 2]) is None
    d.learn([1, 2, 3])
    assert d.propose([1, 2]) == 3
    d.learn([1, 2, 4])  # a different continuation starts over
    assert d.propose([1, 2]) is None
    with pytest.raises(ValueError):
        NgramDrafter(order=2, min_order=3)


def test_drafted_greedy_equals_one_token_per_step(onnx_parts, real_rows):  # noqa: F811
    """Batches of real prompts with their grammars (forecast size and range stated): the drafted loop (several
    free tokens per pass, forced runs fed in the same pass) gives exactly the texts of one token per decoder
    step, batch after batch while its n-gram table fills, and its drafts were really used."""
    _, tok, gen, cc = onnx_parts
    prompts, signals, _ = _prompts_and_signals(real_rows)
    sizes = []
    for i, s in enumerate(signals):
        count = max(pace(s, 7), 1.0) * {"rise": 1.6, "steady": 1.0, "fall": 0.4}[OUTLOOKS[i % 3]]
        sizes.append(PredictedCount(count, 7, 0.7 * count, 1.4 * count))
    grammars = [claim_grammar(s, 7, z.direction(s), size=z).lark() for s, z in zip(signals, sizes)]
    ids = tok.ids(prompts)
    assert gen.draft_tokens > 0, "the export has no logits_to_keep input: export it again"
    drafted, accepted = gen.drafted, gen.accepted
    for _ in range(2):  # the second round starts with a warm n-gram table
        for i in range(0, len(ids), 6):
            batch = ids[i : i + 6]
            step = gen.generate_batch(batch, 96, cc.guide(grammars[i : i + 6]), fast_forward=False)  # one per step
            fast = gen.generate_batch(batch, 96, cc.guide(grammars[i : i + 6]))  # forced runs + drafts per pass
            assert [tok.decode(x) for x in fast] == [tok.decode(x) for x in step]
            assert fast == step
    # drafts were confirmed (several free tokens in one pass) and refused (rolled back, their slots masked)
    assert gen.drafted - drafted > gen.accepted - accepted > 0

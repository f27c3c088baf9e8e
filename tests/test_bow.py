"""trainer.bow: the bag-of-words vectors that stand in for the item state in the `trail_bow` control."""

from __future__ import annotations

import numpy as np

from stream.core.prompts import item_text
from trainer.bow import bow_vectors


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bow_vectors_have_the_state_width_and_follow_the_words():
    texts = [item_text(t, c) for t, c in [("Red Christmas bauble", "Decorations"), ("Gold Christmas bauble", "Decorations"),
                                          ("Red lunch bag", "Bags"), ("Blue lunch bag", "Bags"),
                                          ("Snowflake Christmas card", "Cards"), ("Blue mug", "Kitchen")]]
    z = bow_vectors(texts, dim=576)
    assert z.shape == (6, 576) and z.dtype == np.float32
    assert np.abs(z[:, 6:]).max() == 0  # no more axes than the TF-IDF matrix has rank (<= 6 texts): zero padding
    # a full-rank LSA is a rotation of the TF-IDF space: items that share words are near, others far
    assert _cos(z[0], z[1]) > 0.6 and _cos(z[2], z[3]) > 0.6
    assert _cos(z[0], z[1]) > _cos(z[0], z[3]) and _cos(z[2], z[3]) > _cos(z[2], z[1])
    assert _cos(z[1], z[4]) > _cos(z[1], z[3])  # "Christmas" binds the bauble to the card, not to the bag
    # fitted on texts only: the same texts give the same vectors; a word of one item only is dropped (min_df 2)
    assert np.allclose(bow_vectors(texts, dim=576), z)
    assert np.allclose(bow_vectors([t + " zyzzyva" if i == 0 else t for i, t in enumerate(texts)], dim=576), z,
                       atol=1e-6)


def test_bow_vectors_of_texts_with_no_shared_word_are_zero():
    assert not bow_vectors(["Item: alpha", "Item: beta"][:1], dim=8).any()
    assert bow_vectors([], dim=8).shape == (0, 8)


def _table(abs_err: list[float]) -> dict[str, np.ndarray]:
    n = len(abs_err)  # one row per cut-off: what ablation_intervals reads of cutoff_metrics
    return {"cutoff_ms": np.arange(n), "users": np.ones(n), "rows": np.ones(n), "abs_err": np.array(abs_err),
            "sq_err": np.square(abs_err), "spearman": np.full(n, np.nan), "ndcg@10": np.full(n, 0.5)}


def test_ablations_with_a_range_head_also_compare_count_with_count():
    from trainer.evaluate import ablation_intervals

    tables = {"trail": _table([0.1, 0.2, 0.1]), "trail_score_head_count": _table([0.3, 0.3, 0.4]),
              "trail_numeric": _table([0.3, 0.4, 0.4]), "trail_bow": _table([0.3, 0.3, 0.4])}
    got = ablation_intervals(tables, n_boot=200)
    assert set(got) == {"trail_numeric", "trail_bow"}  # in ABLATIONS order, those present
    assert got["trail_bow"]["mae_log"]["diff"] < 0  # the range head's median against the score head's count
    assert got["trail_bow"]["mae_log_score_head"]["diff"] == 0  # count against count: the same errors
    assert abs(got["trail_numeric"]["mae_log_score_head"]["diff"] + 0.1 / 3) < 1e-12
    del tables["trail_score_head_count"]  # no range head: trail's count is the score head's, nothing to add
    assert "mae_log_score_head" not in ablation_intervals(tables, n_boot=50)["trail_bow"]

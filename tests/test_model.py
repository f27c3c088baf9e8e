"""TRAIL end to end on a tiny budget: fit a few steps on real data, save, load, same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stream.core.datasets import load_dataset
from stream.core.faithfulness import check
from stream.core.prompts import item_text, render_prompt
from trainer import fit
from trainer.examples import build_examples
from trainer.inference import item_states_of, prompts_of, score_frame
from trainer.model import SCORE_DESIGN, Manifest, lambda_rank_loss, load

# 2 LLM steps, 1 train + 1 validation cut-off, the 40 busiest items: CI-sized
TINY = ["--dataset", "ml100k", "--steps", "2", "--batch", "4", "--max-train-cutoffs", "1", "--max-valid-cutoffs",
        "1", "--max-items", "40", "--rank-epochs", "2", "--count-epochs", "2", "--version", "tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("trail") / "model"
    model = fit.train(TINY + ["--out", str(out)])
    return model, out


@pytest.fixture(scope="module")
def rows(cache_dir):
    examples = build_examples(load_dataset("ml100k", cache_dir=cache_dir))
    return examples.rows(examples.cutoffs[-1:]).head(12)


def test_artefact_describes_itself(tiny):
    _, out = tiny
    manifest = Manifest.load(out)
    assert manifest.model_version == "tiny"
    assert manifest.score_design == SCORE_DESIGN == "item-state-v2"
    assert manifest.item_state["pooling"] == "mean" and manifest.item_state["hidden_size"] == 576
    assert manifest.prompt_version and manifest.feature_spec["signal_names"]
    assert len(manifest.normalisation["names"]) == len(manifest.feature_spec["signal_names"]) + 1
    assert manifest.command.startswith("python -m trainer.fit") and "--steps 2" in manifest.command
    assert manifest.training["phase1_llm"]["steps"] == 2 and manifest.training["device"].startswith("cpu")
    assert manifest.training["phase1_llm"]["w_digits"] == fit.FitConfig.w_digits
    assert manifest.training["phase2_item_states"]["items"] <= 40
    assert {"rank", "rank_item", "count", "count_item", "valid"} <= set(manifest.training["phase3_head"])
    assert manifest.about["score"] and "ml100k" in manifest.metrics["valid"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "score_head.safetensors").is_file()
    assert not list(out.glob("*.npz"))  # the item-state cache lives in the cache dir, not the artefact


def test_the_range_head_reads_the_slice_the_score_head_read(tiny):
    """--max-* cut every phase: phase 4 (the range head, trainer.quantiles) trained on the 40 items at the kept
    cut-offs, not on the whole dataset (it did: 70% of this fit's time)."""
    _, out = tiny
    trained = json.loads((out / "range_head.json").read_text())["trained"]
    assert trained["limits"] == {"train_cutoffs": 1, "valid_cutoffs": 1, "items": 40}
    assert 0 < trained["rows"] <= 2 * 40  # 40 items at 1 training + 1 validation cut-off


def test_ranking_prior_is_the_best_validation_candidate_and_the_head_holds_it(tiny):
    model, out = tiny
    prior = Manifest.load(out).training["phase3_head"]["rank_prior"]
    assert len(prior["tried"]) == 3 * len(fit.PRIOR_WEIGHTS)  # ema, ema_7d, ema_14d x the users weights
    best = max(t["valid_ndcg@10"] for t in prior["tried"])
    assert [t for t in prior["tried"] if t["prior"] == prior["chosen"]][0]["valid_ndcg@10"] == best
    names = list(model.norm.names)
    want = np.zeros(len(names), np.float32)
    for name, w in prior["chosen"].items():
        want[names.index(name)] = w
    assert np.array_equal(model.head.rank.prior.numpy(), want)


def test_worst_gain_needs_every_dataset_to_improve(monkeypatch):
    monkeypatch.setattr(fit, "valid_ndcg_parts", lambda data, fn: np.array([0.30, 0.11]))
    assert fit.worst_gain([], None, np.array([0.20, 0.12])) == pytest.approx(-0.01)  # one dataset lost: not kept
    assert fit.worst_gain([], None, np.array([0.29, 0.10])) == pytest.approx(0.01)


def test_loaded_copy_scores_and_explains_identically(tiny, rows, cache_dir):
    model, out = tiny
    loaded, _ = load(out, cache_dir=cache_dir)
    model.eval()
    for variant in ("full", "numeric", "shuffled"):
        a = score_frame(model, rows, 3, variant=variant, progress=False)
        b = score_frame(loaded, rows, 3, variant=variant, progress=False)
        assert a[0].shape == a[1].shape == (len(rows),)
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-5)
    prompts = prompts_of(rows.head(2), model.norm.names[:-1], 3)
    assert model.explain(prompts, max_new_tokens=8) == loaded.explain(prompts, max_new_tokens=8)


def test_numeric_variant_is_the_head_without_item_terms(tiny, rows):
    model, _ = tiny
    score, log_count = score_frame(model, rows, 3, variant="numeric", progress=False)
    x = torch.from_numpy(model.norm.of_frame(rows, 3))
    with torch.no_grad():
        s, c = model.head.numeric_only(x)
    np.testing.assert_allclose(score, s.numpy(), atol=1e-6)
    np.testing.assert_allclose(log_count, c.numpy(), atol=1e-6)


def test_item_states_are_cached_and_shuffled_across_items(tiny, rows, monkeypatch):
    model, _ = tiny
    states = item_states_of(model, rows, progress=False)
    assert states.shape == (len(rows), 576) and np.isfinite(states).all()

    def boom(*a, **k):
        raise AssertionError("a cached item state was recomputed")

    monkeypatch.setattr(model, "item_state", boom)
    np.testing.assert_array_equal(item_states_of(model, rows, progress=False), states)
    shuffled = item_states_of(model, rows, shuffle_seed=0, progress=False)
    uniq = {r.tobytes() for r in states}
    assert {r.tobytes() for r in shuffled} == uniq  # the same states, given to other items
    assert not np.array_equal(shuffled, states)


def test_item_state_ignores_padding(tiny):
    model, _ = tiny
    texts = ["Item: Toy Story (Animation)", "Item: A much longer title of a film that needs more tokens (Drama)"]
    with torch.no_grad():
        both = model.item_state(*model.encode_items(texts))
        alone = model.item_state(*model.encode_items(texts[:1]))
    torch.testing.assert_close(both[0], alone[0], atol=1e-4, rtol=1e-4)


def test_item_text_is_the_prompt_item_line():
    signals = {"count_1d": 1, "count_7d": 3, "prev_count_7d": 2, "users_7d": 3, "count_28d": 9,
               "prev_count_28d": 4, "users_28d": 7, "age_h": 300}
    for title, category in (("WHITE HANGING HEART T-LIGHT HOLDER", "home"), (None, None), ("Psycho", "Horror|Thriller")):
        first = render_prompt(title, category, signals, 7, item_id="85123A").split("\n")[0]
        assert item_text(title, category, item_id="85123A") == first
    assert item_text(None, None, item_id="85123A") == "Item: 85123A"
    assert item_text("Psycho", None, description="  A   motel.  ") == "Item: Psycho\nA motel."


def test_label_users_counts_the_truth_pairs(cache_dir):
    examples = build_examples(load_dataset("ml100k", cache_dir=cache_dir))
    cutoff = int(examples.cutoffs[-3])
    rows = examples.rows([cutoff])
    users, items = examples.truth.at(cutoff)
    per_item = np.bincount(items, minlength=len(examples.truth.items))
    codes = examples.truth.item_codes(rows["item_id"].to_numpy(dtype=object))
    np.testing.assert_array_equal(rows["label_users"].to_numpy(), per_item[codes])
    assert (rows["label_users"] <= rows["label_count"]).all()


def test_lambda_rank_loss_prefers_the_metric_order():
    gain = torch.tensor([5.0, 1.0, 0.0, 0.0])
    good = lambda_rank_loss(torch.tensor([3.0, 2.0, 1.0, 0.0]), gain, k=2)
    bad = lambda_rank_loss(torch.tensor([0.0, 1.0, 2.0, 3.0]), gain, k=2)
    assert good < bad
    s = torch.tensor([0.0, 1.0, 2.0, 3.0], requires_grad=True)
    lambda_rank_loss(s, gain, k=2).backward()
    assert s.grad[0] < 0 < s.grad[3]  # push the best item up, the worst down
    assert lambda_rank_loss(torch.zeros(3), torch.zeros(3)) == 0  # nothing to gain: no loss


def test_a_missing_artefact_is_a_clear_error(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="not a TRAIL model directory"):
        load(tmp_path, cache_dir=cache_dir)


def test_training_targets_are_faithful_to_the_prompt_signals(rows, cache_dir):
    examples = build_examples(load_dataset("ml100k", cache_dir=cache_dir))
    some = examples.rows(examples.cutoffs[-1:]).head(50)
    rng = np.random.default_rng(0)
    names = list(examples.config.signal_names)
    for r in some[names].to_numpy(np.float64).tolist():
        signals = dict(zip(names, r))
        text = fit.target_explanation(signals, 3, rng, outlook="rise")
        assert check(text, signals).faithful


def test_label_gain_is_the_metric_weight(cache_dir):
    """NDCG@10 of a cut-off = sum of label_gain x discount over the list / scored users."""
    from trainer.metrics import evaluate_predictions, top_k

    examples = build_examples(load_dataset("ml100k", cache_dir=cache_dir))
    cutoff = int(examples.cutoffs[-3])
    rows = examples.rows([cutoff])
    pred = rows["count_7d"].to_numpy(np.float64)
    got = evaluate_predictions(rows, pred, examples.truth, ks=(10,))["ndcg@10"]
    top = top_k(rows["item_id"].to_numpy(dtype=object), pred, 10)
    users = len(np.unique(examples.truth.at(cutoff)[0]))
    dcg = (rows["label_gain"].to_numpy()[top] / np.log2(np.arange(len(top)) + 2.0)).sum()
    assert got == pytest.approx(dcg / users, rel=1e-9)


def test_digit_tokens_are_the_vocabularys_numbers(tiny):
    model, _ = tiny
    digits = set(model.digit_ids.tolist())
    ids = model.tokenizer(" 36 events, up from 129", add_special_tokens=False).input_ids
    pieces = [model.tokenizer.decode([i]).strip() for i in ids]
    assert {p for i, p in zip(ids, pieces) if i in digits} == {"3", "6", "1", "2", "9"}
    assert all(p.isdigit() for p in (model.tokenizer.decode([i]).strip() for i in digits))
    assert not digits & {i for i, p in zip(ids, pieces) if not p.isdigit()}


def test_init_adapter_carries_the_source_adapters_training_record(tmp_path):
    import json

    (tmp_path / "adapter").mkdir()
    phase1 = {"steps": 1402, "minutes": 40.0, "total_steps": 2036, "final_losses": {"lm": 0.49}}
    (tmp_path / "manifest.json").write_text(json.dumps({
        "model_version": "src", "command": "python -m trainer.fit ...", "trail_config": {},
        "training": {"device": "cpu (x86_64, 2 torch threads)", "phase1_llm": phase1}}))
    folder, info = fit._adapter_source(str(tmp_path))
    assert folder == tmp_path / "adapter"
    assert info["llm_steps"] == 2036 and info["phase1_llm"] == phase1 and info["device"].startswith("cpu")

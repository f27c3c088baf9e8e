"""TRAIL end to end on a tiny budget: fit a few steps on real data, save, load, same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.core.faithfulness import check
from trainer import fit
from stream.core.datasets import load_dataset
from trainer.examples import build_examples
from trainer.inference import prompts_of, score_frame
from trainer.model import Manifest, info_nce, load, pairwise_rank_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("trail") / "model"
    model = fit.train(["--dataset", "ml100k", "--out", str(out), "--steps", "2", "--batch", "4",
                       "--max-train-cutoffs", "1", "--numeric-epochs", "2", "--version", "tiny"])
    return model, out


def test_artefact_describes_itself(tiny):
    _, out = tiny
    manifest = Manifest.load(out)
    assert manifest.model_version == "tiny"
    assert manifest.prompt_version and manifest.feature_spec["signal_names"]
    assert len(manifest.normalisation["names"]) == len(manifest.feature_spec["signal_names"]) + 1
    assert manifest.command.startswith("python -m trainer.fit") and "--steps 2" in manifest.command
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "score_head.safetensors").is_file()


def test_loaded_copy_scores_and_explains_identically(tiny):
    model, out = tiny
    loaded, _ = load(out)
    model.eval()
    examples = build_examples(load_dataset("ml100k"))
    rows = examples.rows(examples.cutoffs[-1:]).head(12)
    a = score_frame(model, rows, 3, top_n=6, progress=False)
    b = score_frame(loaded, rows, 3, top_n=6, progress=False)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    prompts = prompts_of(rows.head(2), model.norm.names[:-1], 3)
    assert model.explain(prompts, max_new_tokens=8) == loaded.explain(prompts, max_new_tokens=8)


def test_a_missing_artefact_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a TRAIL model directory"):
        load(tmp_path)


def test_ranking_loss_prefers_the_right_order():
    target = torch.tensor([3.0, 1.0, 0.0])
    group = torch.zeros(3)
    good = pairwise_rank_loss(torch.tensor([2.0, 1.0, 0.0]), target, group)
    bad = pairwise_rank_loss(torch.tensor([0.0, 1.0, 2.0]), target, group)
    assert good < bad
    # pairs across cut-offs are not compared
    assert pairwise_rank_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 1])) == 0


def test_info_nce_is_low_when_pairs_match():
    a = torch.eye(4)
    assert info_nce(a, a) < info_nce(a, a.roll(1, dims=0))


def test_training_targets_are_faithful_to_the_prompt_signals():
    examples = build_examples(load_dataset("ml100k"))
    rows = examples.rows(examples.cutoffs[-1:]).head(50)
    rng = np.random.default_rng(0)
    names = list(examples.config.signal_names)
    for r in rows[names].to_numpy(np.float64).tolist():
        signals = dict(zip(names, r))
        text = fit.target_explanation(signals, 3, rng, outlook="rise")
        assert check(text, signals).faithful

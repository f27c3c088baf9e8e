"""How true and how varied explanations are: TRAIL's decodings against the base model prompted zero-shot.

Every explanation is checked by `stream.core.faithfulness.check` against the signals
its prompt showed (the item title is passed so numbers repeated from it do not
count). `faithful_share` is the share of explanations without a false claim;
`claim_precision` the share of checked claims that are true.

TRAIL's explanations are reported three times (docs/explanations.md):
- `trail_unconstrained`: plain greedy decoding, what the model learnt on its own;
- `trail_raw`: decoding held to the item's claim grammar
  (`stream.core.faithfulness.grammar`, llguidance token masks; the forecast clause forced to
  `outlook(predicted count, pace)` of the model's own prediction), before any repair — what
  the stream decodes: sampled among the allowed tokens as the stream samples (temperature,
  top_p: stream.core.decoding's defaults; one seed per explanation,
  `explanation_seed(model_version, item_id, cutoff_ms)`), or greedy with temperature 0;
- `trail`: what the stream publishes, `repair(trail_raw)`, with `repaired_share` and the
  totals `fixed_numbers`, `fixed_directions`, `dropped_clauses`.
Each has `forecast_agreement` (the stated forecast against the direction of the model's own
predicted count) and `forecast_accuracy` (against the realised direction, outlook(true next
count, pace)), beside `majority_accuracy` (always saying the sample's most common realised
direction). The base model's zero-shot answers (`base_zero_shot`) are the honest baseline.

Generation is batched (torch `generate`, left padding, `batch` prompts at a time); the
constraint is a transformers LogitsProcessor over the same llguidance matchers the stream's
ONNX loop uses (`stream.model.constraint`), and sampling another (`SampleProcessor`) that
draws each row's token with the stream's own sampler (`stream.model.onnx_models.Sampler`:
one PCG64 generator per row) and hands `generate` (still do_sample=False) only that token.
Each evaluation's `decoding` in the report says how it was decoded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stream.core import decoding
from stream.core.faithfulness import Repair, check, repair
from stream.core.faithfulness.grammar import CONSTRAINED_MAX_NEW_TOKENS, reason_of, top_driver, against_trend, claim_grammar, level_reason, stated_reason, why_window
from stream.core.forecast import PredictedCount, outlook, pace
from trainer.inference import prompts_of

ZERO_SHOT_INSTRUCTION = (
    "Here are an item's recent sales/interaction counts.\n{prompt}\n"
    "In one or two sentences, say whether it will rise or fall next period and why, citing the numbers."
)
BATCH = 16


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    grams = [tuple(t.lower().split()[i : i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / len(grams) if grams else None


DISTINCT_BLOCK = 50  # distinct-n falls as n grows: per block of 50 texts, as v1's baseline figure was measured


def distinct_per_block(texts: list[str], n: int = 2, block: int = DISTINCT_BLOCK) -> float | None:
    """Mean distinct-n over consecutive, disjoint blocks of `block` texts (a figure that does not fall with the
    sample size, so a 200-text sample compares with a 50-text one); the whole list when shorter."""
    blocks = [texts[i : i + block] for i in range(0, len(texts) - block + 1, block)] or [texts]
    values = [v for v in (distinct_n(b, n) for b in blocks) if v is not None]
    return sum(values) / len(values) if values else None


def _sizes(sizes: list[PredictedCount] | None, n: int,
           drivers: list[dict[str, float] | None] | None = None) -> list[PredictedCount | None]:
    """Each row's prediction (None without); with `drivers`, a prediction that lacks its own takes the row's (the
    checker verifies the driver claims, "this time of year lifts it", against them)."""
    zs = list(sizes) if sizes is not None else [None] * n
    if drivers is not None:
        zs = [replace(z, drivers=d) if z is not None and d and not z.drivers else z for z, d in zip(zs, drivers)]
    return zs


def explanation_metrics(texts: list[str], signals: list[dict[str, float]], titles: list[str],
                        sizes: list[PredictedCount] | None = None) -> dict:
    """`sizes`: each row's prediction (count and range); with them the forecast clauses are checked claims too."""
    results = [check(t, s, title=title, prediction=z) for t, s, title, z in zip(texts, signals, titles, _sizes(sizes, len(texts)))]
    checked = sum(r.checked for r in results)
    false = sum(r.false for r in results)
    n = len(results)
    # what the false claims were: "<kind>:<measure>" ("number:prev_count", "direction:count", ...), most first
    kinds = Counter(f"{c.kind}:{c.measure or 'unattributed'}" for r in results for c in r.claims if not c.ok)
    return {
        "n": n,
        "faithful_share": sum(r.faithful for r in results) / n if n else None,
        "claim_precision": (checked - false) / checked if checked else None,
        "claims_per_explanation": checked / n if n else None,
        "no_claim_share": sum(r.checked == 0 for r in results) / n if n else None,
        "distinct_2": distinct_n(texts, 2),
        "distinct_2_per_50": distinct_per_block(texts, 2),
        "false_claims": dict(kinds.most_common()),
        # the forecast's size ("about 40 next week") and range ("likely 25–55"), stated and true
        "size_stated_share": sum(any(c.kind == "forecast" and c.measure == "count" and c.ok for c in r.claims)
                                 for r in results) / n if n else None,
        "range_stated_share": sum(any(c.kind == "range" and c.ok for c in r.claims) for r in results) / n if n else None,
    }


def directions(counts, paces: list[float]) -> list[str]:
    """outlook() of each next-period count against its row's pace."""
    return [outlook(float(c), p) for c, p in zip(counts, paces)]


def accuracy(stated: list, realised: list[str]) -> tuple[float, float]:
    """(share of `stated` equal to `realised`, the share always saying the most common realised direction gets)."""
    n = len(realised)
    return sum(a == b for a, b in zip(stated, realised)) / n, Counter(realised).most_common(1)[0][1] / n


def forecast_accuracy_all(frame: pd.DataFrame, predicted_count: np.ndarray, horizon_days: float) -> dict:
    """The forced forecast's accuracy over all rows of `frame` (test candidates), against the realised
    direction, beside always saying the most common realised direction: `*_all_candidates`."""
    if not len(frame):
        return {}
    windows = [c for c in frame.columns if c.startswith("count_")]  # all `pace` reads
    paces = [pace(dict(zip(windows, r)), horizon_days) for r in frame[windows].to_numpy(np.float64).tolist()]
    acc, majority = accuracy(directions(predicted_count, paces), directions(frame["label_count"], paces))
    return {"forecast_accuracy_all_candidates": acc, "majority_accuracy_all_candidates": majority,
            "all_candidates": len(frame)}


def forecast_metrics(texts: list[str], signals: list[dict[str, float]], titles: list[str],
                     predicted: list[str] | None, realised: list[str] | None,
                     sizes: list[PredictedCount] | None = None) -> dict:
    """The stated forecast against the model's own direction and against what happened."""
    stated = [check(t, s, title=ti, prediction=z).outlook
              for t, s, ti, z in zip(texts, signals, titles, _sizes(sizes, len(texts)))]
    n = len(stated)
    out: dict = {"forecast_stated_share": sum(x is not None for x in stated) / n if n else None,
                 "forecasts": dict(Counter(x or "none" for x in stated))}
    if predicted is not None and n:
        out["forecast_agreement"] = sum(a == b for a, b in zip(stated, predicted)) / n
    if realised is not None and n:
        out["forecast_accuracy"], out["majority_accuracy"] = accuracy(stated, realised)
        out["realised"] = dict(Counter(realised))
    return out


def reason_metrics(texts: list[str], signals: list[dict[str, float]], titles: list[str], horizon_days: float,
                   sizes: list[PredictedCount] | None = None, realised: list[str] | None = None,
                   drivers: list[dict[str, float] | None] | None = None) -> dict:
    """Does a mover's text say why it is predicted to move? Over the texts whose stated forecast goes against
    the main window's trend (`against_trend`): `reason_share`, the share that give a true reason pointing the
    forecast's way (`stated_reason`: another window's trend, "..., but 109 in the last 28 days, up from 97",
    or the main count's level, "..., but already above its 28-day pace"); `reason_available`, how many of
    them have such a reason at all (`why_window`, `level_reason`), of which `level_available` by the level alone.
    With `drivers` (each row's attribution): `driver_agreement`, the share of rise/fall texts whose stated
    reason (`reason_of`) is the model's top driver (`top_driver`), over `driver_rows`; null without drivers.
    `driver_rows_against`: rise/fall texts with drivers none of which pushes the forecast's way (no top driver:
    they are not in `driver_rows`, and the rule gives their reason; drivers of the gap from the pace with a steady
    reference, stream.core.drivers, leave none); `driver_agreement_all_rows` counts them
    as disagreements (agreement over every rise/fall text with drivers: the stricter reading of the target).
    With `realised`: `reason_accuracy` per reason kind (how often the stated direction happened) beside its
    base rate."""
    against = cited = available = by_level = 0
    kinds: list[tuple[str, str, str | None]] = []  # (reason kind, stated direction, realised direction)
    zs = _sizes(sizes, len(texts))
    ds = list(drivers) if drivers is not None else [None] * len(texts)
    driven = agree = pulled = 0
    for k, (t, s, ti) in enumerate(zip(texts, signals, titles)):
        r = check(t, s, title=ti, prediction=zs[k])
        given = None  # the kind of reason this text gives (for reason_accuracy)
        if ds[k] and r.outlook in ("rise", "fall") and top_driver(ds[k], r.outlook) is None:
            pulled += 1  # every driver pulls against the forecast: no top driver to state (grammar.top_driver)
        elif ds[k] and r.outlook in ("rise", "fall"):
            # driver_agreement: the reason the text states is the model's top driver for its forecast
            driven += 1
            given = reason_of(r.claims, s, horizon_days, r.outlook, ds[k]) if r.faithful else None
            agree += given is not None and given == top_driver(ds[k], r.outlook)
        mover = against_trend(s, horizon_days, r.outlook)
        if mover is None:
            if given is not None:
                kinds.append((given, r.outlook, realised[k] if realised is not None else None))
            continue
        against += 1
        c, p, main, long = mover
        trend = why_window(c, p, main, long, r.outlook) is not None
        level = not trend and level_reason(c, p, main, long, r.outlook) is not None
        available += trend or level
        by_level += level
        kind = stated_reason(r.claims, s, horizon_days, r.outlook) if given is None else given
        cited += kind is not None
        if kind is not None:
            kinds.append((kind, r.outlook, realised[k] if realised is not None else None))
    out = {"against_trend": against, "reason_share": cited / against if against else None,
           "reason_available": available, "level_available": by_level,
           # null when the model gives no drivers (today's v6): the reasons then come from the rule
           "driver_agreement": agree / driven if driven else None, "driver_rows": driven,
           "driver_rows_against": pulled,
           "driver_agreement_all_rows": agree / (driven + pulled) if driven + pulled else None}
    if realised is not None:
        out["reason_accuracy"] = reason_accuracy(kinds, realised)
    return out


def reason_accuracy(stated: list[tuple[str, str, str | None]], realised: list[str]) -> dict:
    """Per reason kind (20.4): how often the direction a reason was given for happened (`accuracy`), beside the
    base rate of those directions over the whole sample (`base_rate`: the accuracy of stating the same directions
    without looking, each as often as the sample realises it). `stated`: (kind, stated direction, realised)."""
    n = len(realised)
    share = Counter(realised)
    out: dict = {}
    for kind in sorted({k for k, _, _ in stated}):
        rows = [(d, r) for k, d, r in stated if k == kind]
        out[kind] = {"n": len(rows), "accuracy": sum(d == r for d, r in rows) / len(rows),
                     "base_rate": sum(share[d] / n for d, _ in rows) / len(rows) if n else None,
                     "directions": dict(Counter(d for d, _ in rows))}
    return out


def repair_metrics(repairs: list[Repair]) -> dict:
    n = len(repairs)
    return {
        "repaired_share": sum(r.changed for r in repairs) / n if n else None,
        "fixed_numbers": sum(r.fixed_numbers for r in repairs),
        "fixed_directions": sum(r.fixed_directions for r in repairs),
        "dropped_clauses": sum(r.dropped_clauses for r in repairs),
    }


def score_trail(raw: list[str], signals: list[dict[str, float]], titles: list[str], item_ids: list,
                unconstrained: list[str] | None = None, predicted: list[str] | None = None,
                realised: list[str] | None = None, horizon_days: float | None = None,
                sizes: list[PredictedCount] | None = None,
                drivers: list[dict[str, float] | None] | None = None) -> tuple[dict, list[dict]]:
    """Metrics of TRAIL's constrained (raw), published (repaired) and unconstrained explanations, and one
    sample per item. `predicted` / `realised`: outlook of the model's predicted / the true next count.
    With `horizon_days`, each set also has `reason_metrics` (does a mover's text say why). `sizes`: each row's
    prediction (count, range): the forecast clauses are then checked claims (size, range, direction)."""
    if not len(raw) == len(signals) == len(titles) == len(item_ids):
        raise ValueError(f"lengths differ: {len(raw)} explanations, {len(signals)} signal rows, "
                         f"{len(titles)} titles, {len(item_ids)} item ids")
    zs = _sizes(sizes, len(raw), drivers)
    sizes = zs if sizes is not None else None
    repairs = [repair(e, s, title=t, prediction=z) for e, s, t, z in zip(raw, signals, titles, zs)]
    served = [r.text for r in repairs]
    report = {"trail": explanation_metrics(served, signals, titles, sizes) | repair_metrics(repairs)
              | forecast_metrics(served, signals, titles, predicted, realised, sizes),
              "trail_raw": explanation_metrics(raw, signals, titles, sizes)
              | forecast_metrics(raw, signals, titles, predicted, realised, sizes)}
    if unconstrained is not None:
        report["trail_unconstrained"] = (explanation_metrics(unconstrained, signals, titles, sizes)
                                         | forecast_metrics(unconstrained, signals, titles, predicted, realised, sizes))
    if horizon_days is not None:
        for name, texts in (("trail", served), ("trail_raw", raw), ("trail_unconstrained", unconstrained)):
            if texts is not None:
                report[name] |= reason_metrics(texts, signals, titles, horizon_days, sizes, realised, drivers)
    samples = []
    for k, (i, t, e, r, s) in enumerate(zip(item_ids, titles, raw, repairs, signals)):
        sample = {"item_id": i, "title": t, "explanation_raw": e,
                  "faithful_raw": check(e, s, title=t, prediction=zs[k]).faithful,
                  "explanation": r.text, "faithful": check(r.text, s, title=t, prediction=zs[k]).faithful,
                  "repaired": r.changed}
        if drivers is not None and drivers[k] and horizon_days is not None:
            # the model's top driver for the stated forecast, and the reason the raw text gives (reason_of)
            r_raw = check(e, s, title=t, prediction=zs[k])
            sample["top_driver"] = top_driver(drivers[k], r_raw.outlook)
            sample["reason_raw"] = (reason_of(r_raw.claims, s, horizon_days, r_raw.outlook, drivers[k])
                                    if r_raw.faithful else None)
        if predicted is not None:
            sample["forecast_predicted"] = predicted[k]
        if realised is not None:
            sample["forecast_realised"] = realised[k]
        if unconstrained is not None:
            sample["explanation_unconstrained"] = unconstrained[k]
            sample["faithful_unconstrained"] = check(unconstrained[k], s, title=t, prediction=zs[k]).faithful
        samples.append(sample)
    return report, samples


# ---- batched generation (torch) -----------------------------------------------------------------

class _RowProcessor:
    """What the batched `generate` processors share. Rows are left-padded, so every row's new tokens start
    at the same column `prompt_len`; a row that emitted the end token is done (generate pads it from then on)."""

    def __init__(self, prompt_len: int, end_id: int) -> None:
        self.prompt_len, self.end_id = prompt_len, end_id
        self.done: set[int] = set()

    def step(self, input_ids: torch.Tensor) -> tuple[list[int], list[int]]:
        """(the rows live before the previous step's token, each row's previous token; both empty at the first
        step), and marks the rows that token ended."""
        if input_ids.shape[1] <= self.prompt_len:
            return [], []
        live = self.live(input_ids.shape[0])
        last = input_ids[:, -1].tolist()
        self.done |= {i for i in live if last[i] == self.end_id}
        return live, last

    def live(self, rows: int) -> list[int]:
        return [i for i in range(rows) if i not in self.done]


class GuideProcessor(_RowProcessor):
    """A transformers LogitsProcessor holding each row of a batched `generate` to its llguidance matcher:
    the token a row sampled at the previous step is fed to its matcher before its next mask."""

    def __init__(self, guide, prompt_len: int, end_id: int) -> None:
        super().__init__(prompt_len, end_id)
        self.guide = guide

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        live, last = self.step(input_ids)
        if live:
            self.guide.advance(live, [last[i] for i in live])
        arr = scores.detach().to(torch.float32).cpu().numpy().copy()
        self.guide.mask(arr, self.live(len(arr)))
        return torch.from_numpy(arr).to(scores.device, scores.dtype)


class SampleProcessor(_RowProcessor):
    """A transformers LogitsProcessor that samples each live row's next token itself (after the guide's mask,
    when one comes first in the list) with `stream.model.onnx_models.Sampler` (per-row PCG64 seeds) and
    leaves only that token finite, so greedy `generate` emits it."""

    def __init__(self, sampler, prompt_len: int, end_id: int) -> None:
        super().__init__(prompt_len, end_id)
        self.sampler = sampler

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step(input_ids)
        arr = scores.detach().to(torch.float32).cpu().numpy()
        out = arr.copy()  # a done row keeps its scores (generate pads it)
        for i in self.live(len(arr)):
            out[i] = -np.inf
            out[i, self.sampler.row(arr[i], i)] = 0.0
        return torch.from_numpy(out).to(scores.device, scores.dtype)


_CONSTRAINTS: dict[int, object] = {}


def claim_constraint(model):
    """The llguidance tokenizer of the model's tokenizer (built once per model: ~0.2 s)."""
    from stream.model.constraint import ClaimConstraint

    key = id(model.tokenizer)
    if key not in _CONSTRAINTS:
        backend = model.tokenizer.backend_tokenizer
        _CONSTRAINTS[key] = ClaimConstraint(backend.to_str(), model.end_id)
    return _CONSTRAINTS[key]


@torch.no_grad()
def generate_ids(model, rows: list[list[int]], max_new_tokens: int, grammars: list[str] | None = None,
                 batch: int = BATCH, desc: str | None = None, *, temperature: float = 0.0, top_p: float = 1.0,
                 seeds: list[int] | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, `batch` at a time (left padding), optionally constrained;
    sampled (`SampleProcessor`, row i seeded with seeds[i]; None: 0) when temperature > 0."""
    from transformers import LogitsProcessorList

    from stream.model.onnx_models import Sampler, row_seeds

    decoding.check(temperature, top_p)
    if decoding.sampled(temperature):
        seeds = row_seeds(seeds, len(rows))
    end = model.end_id
    out: list[list[int]] = [None] * len(rows)  # type: ignore[list-item]
    order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths share a batch
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    for idx in tqdm(chunks, desc=desc, unit="batch", disable=desc is None):
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), end, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, width - len(rows[i]):] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]):] = 1
        procs = []
        if grammars is not None:
            procs.append(GuideProcessor(claim_constraint(model).guide([grammars[i] for i in idx]), width, end))
        if decoding.sampled(temperature):
            procs.append(SampleProcessor(Sampler(temperature, top_p, [seeds[i] for i in idx]), width, end))
        gen = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=end, pad_token_id=end,
                                logits_processor=LogitsProcessorList(procs) if procs else None)
        for j, i in enumerate(idx):
            new = gen[j, width:].tolist()
            if end in new:
                new = new[: new.index(end) + 1]
            out[i] = new
    return out


class OnnxGenerator:
    """The artefact's exported ONNX generator (greedy identical to torch, export.onnx's parity check) with the
    stream's own batched, constrained loop: the evaluation then measures exactly what the stream decodes,
    several times faster than torch `generate` on a CPU."""

    def __init__(self, model_dir, threads: int | None = None) -> None:
        import json
        from pathlib import Path

        from stream.model.artefact import PromptTokenizer, read_export
        from stream.model.constraint import ClaimConstraint
        from stream.model.onnx_models import CPU, Generator

        root = Path(model_dir)
        manifest = json.loads((root / "manifest.json").read_text())
        export = read_export(root)
        files = export.get("files") or {}
        if "generator" not in files or "tokenizer" not in files:
            raise FileNotFoundError(f"{model_dir}: no exported generator (python -m export.onnx --model {model_dir})")
        tok_cfg = export.get("tokenizer", {})
        self.tokenizer = PromptTokenizer(root / files["tokenizer"]["path"],
                                         int(manifest["trail_config"].get("max_prompt_tokens", 80)),
                                         bool(tok_cfg.get("clean_up_tokenization_spaces", False)))
        self.generator = Generator(root / files["generator"]["path"], [CPU], self.tokenizer.end_id, threads)
        self.constraint = ClaimConstraint(root / files["tokenizer"]["path"], self.tokenizer.end_id)

    @staticmethod
    def available(model_dir) -> bool:
        from pathlib import Path

        from stream.model.artefact import read_export

        if not (Path(model_dir) / "manifest.json").is_file():
            return False
        files = read_export(model_dir).get("files") or {}
        return all((Path(model_dir) / files[r]["path"]).is_file() for r in ("generator", "tokenizer") if r in files) \
            and "generator" in files and "tokenizer" in files

    def explain(self, prompts: list[str], grammars: list[str] | None, limit: int, batch: int,
                desc: str | None = None, *, temperature: float = 0.0, top_p: float = 1.0,
                seeds: list[int] | None = None) -> list[str]:
        rows = self.tokenizer.ids(prompts)
        if seeds is None:
            seeds = [0] * len(rows)
        out: list[str] = [""] * len(rows)
        order = np.argsort([len(r) for r in rows], kind="stable")
        chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
        for idx in tqdm(chunks, desc=desc, unit="batch", disable=desc is None):
            guide = self.constraint.guide([grammars[i] for i in idx]) if grammars is not None else None
            new = self.generator.generate_batch([rows[i] for i in idx], limit, guide, temperature=temperature,
                                                top_p=top_p, seeds=[seeds[i] for i in idx])
            for i, n in zip(idx, new):
                out[i] = self.tokenizer.decode(n)
        return out


def explain_texts(model, prompts: list[str], *, signals: list[dict[str, float]] | None = None,
                  forecasts: list[str] | None = None, horizon_days: float = 7, max_new_tokens: int | None = None,
                  batch: int = BATCH, desc: str | None = None, onnx: OnnxGenerator | None = None,
                  temperature: float = 0.0, top_p: float = 1.0, seeds: list[int] | None = None,
                  sizes: list[PredictedCount] | None = None,
                  drivers: list[dict[str, float] | None] | None = None) -> list[str]:
    """TRAIL's greedy explanations, batched; constrained to each item's claim grammar when `forecasts`
    (one outlook per prompt, with `signals`) are given, ending with each row's size and range with `sizes`. Decoded as `Trail.explain` does. With `onnx`,
    on the exported generator (the stream's loop) instead of torch. `temperature > 0`: sampled
    (top_p; prompt i seeded with seeds[i]) instead of greedy."""
    limit = max_new_tokens or model.cfg.max_explanation_tokens
    grammars = None
    if forecasts is not None:
        if signals is None:
            raise ValueError("constrained decoding needs the signals of every prompt")
        ds = list(drivers) if drivers is not None else [None] * len(signals)
        grammars = [claim_grammar(s, horizon_days, f, size=z, drivers=d).lark()
                    for s, f, z, d in zip(signals, forecasts, _sizes(sizes, len(signals)), ds)]
        limit = max(limit, CONSTRAINED_MAX_NEW_TOKENS)  # the grammar ends the text itself (as the explainer)
    if onnx is not None:
        return onnx.explain(prompts, grammars, limit, batch, desc, temperature=temperature, top_p=top_p, seeds=seeds)
    rows = [model.tokenizer(p).input_ids[: model.cfg.max_prompt_tokens] for p in prompts]
    new = generate_ids(model, rows, limit, grammars, batch, desc, temperature=temperature, top_p=top_p, seeds=seeds)
    return [model.tokenizer.decode(n, skip_special_tokens=True).strip() for n in new]


@torch.no_grad()
def zero_shot(model, prompts: list[str], max_new_tokens: int = 60, batch: int = BATCH) -> list[str]:
    """The base model (LoRA disabled) answering an instruction built from the same prompt."""
    tok = model.tokenizer
    rows = []
    for p in prompts:
        chat = [{"role": "user", "content": ZERO_SHOT_INSTRUCTION.format(prompt=p)}]
        rows.append(list(tok.apply_chat_template(chat, add_generation_prompt=True)))
    with model.lm.disable_adapter():
        new = generate_ids(model, rows, max_new_tokens, None, batch, "zero-shot base")
    return [tok.decode(n, skip_special_tokens=True).strip() for n in new]


def explanation_seeds(rows: pd.DataFrame, model_version: str = "") -> list[int]:
    """The stream's seed rule (stream.core.decoding.explanation_seed) for each row: its item and cut-off (ms)."""
    if "cutoff_ms" not in rows or "item_id" not in rows:
        raise ValueError("sampled explanations need the rows' item_id and cutoff_ms (their seeds)")
    return [decoding.explanation_seed(model_version, str(i), int(c))
            for i, c in zip(rows["item_id"].tolist(), rows["cutoff_ms"].to_numpy(np.int64).tolist())]


def _model_version(model_dir: str | None) -> str:
    import json
    from pathlib import Path

    path = Path(model_dir) / "manifest.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return ""
    return str(json.loads(path.read_text()).get("model_version") or "")


def evaluate_explanations(model, rows: pd.DataFrame, horizon_days: float, zero_shot_too: bool = True,
                          predicted_count: np.ndarray | None = None, batch: int = BATCH,
                          model_dir: str | None = None, temperature: float = decoding.EXPLAIN_TEMPERATURE,
                          top_p: float = decoding.EXPLAIN_TOP_P) -> dict:
    """Constrained, published and unconstrained TRAIL explanations of `rows` (and the base model's).

    `predicted_count`: the model's predicted next-period count per row (else the rows'
    `predicted_count` column, as `sample_rows(..., counts=)` adds it); the forecast clause is
    forced to its direction. `label_count` (the true next count), when present, gives the
    realised direction for `forecast_accuracy`. `model_dir`: when it holds an ONNX export, TRAIL's
    texts are decoded on its generator with the stream's batched loop (greedy identical to torch);
    else with torch `generate`.

    The constrained texts (`trail_raw`, `trail`) are decoded as the stream decodes them: sampled with
    `temperature` / `top_p` (0: greedy), row i seeded with explanation_seed(model version of `model_dir`'s
    manifest, item_id, cutoff_ms); `trail_unconstrained` and `base_zero_shot` stay greedy. Each metrics
    entry carries its `decoding`."""
    decoding.check(temperature, top_p)
    names = list(model.norm.signal_names)
    signals = [dict(zip(names, r)) for r in rows[names].to_numpy(np.float64).tolist()]
    titles = rows["title"].astype(str).tolist()
    if predicted_count is None:
        if "predicted_count" not in rows:
            raise ValueError("evaluate_explanations needs the model's predicted counts (predicted_count=)")
        predicted_count = rows["predicted_count"].to_numpy(np.float64)
    paces = [pace(s, horizon_days) for s in signals]
    predicted = directions(predicted_count, paces)
    sizes = predicted_sizes(rows, predicted_count, horizon_days)
    prompts = prompts_of(rows, names, horizon_days, forecasts=sizes)  # as the stream: each shows its forecast
    # each row's attribution (group -> contribution), from a model that gives drivers; None otherwise
    drivers = ([d if isinstance(d, dict) and d else None for d in rows["drivers"].tolist()]
               if "drivers" in rows else None)
    realised = (directions(rows["label_count"], paces)
                if "label_count" in rows else None)
    onnx = OnnxGenerator(model_dir) if model_dir is not None and OnnxGenerator.available(model_dir) else None
    version = _model_version(model_dir)
    seeds = explanation_seeds(rows, version) if decoding.sampled(temperature) else None
    raw = explain_texts(model, prompts, signals=signals, forecasts=predicted, horizon_days=horizon_days, batch=batch,
                        desc="TRAIL explanations (constrained)", onnx=onnx, temperature=temperature, top_p=top_p,
                        seeds=seeds, sizes=sizes, drivers=drivers)
    free = explain_texts(model, prompts, batch=batch, desc="TRAIL explanations (unconstrained)", onnx=onnx)
    report, samples = score_trail(raw, signals, titles, rows["item_id"].tolist(), free, predicted, realised,
                                  horizon_days, sizes, drivers)
    constrained = decoding.settings(temperature, top_p)
    if decoding.sampled(temperature):
        constrained["model_version"] = version
    for name in ("trail", "trail_raw"):
        report[name]["decoding"] = dict(constrained)
    report["trail_unconstrained"]["decoding"] = decoding.settings(0.0, 1.0)
    if zero_shot_too:
        base = zero_shot(model, prompts, batch=batch)
        report["base_zero_shot"] = explanation_metrics(base, signals, titles) | {"decoding": decoding.settings(0, 1)}
        for sample, text, s, t in zip(samples, base, signals, titles):
            sample["base_zero_shot"] = text
            sample["base_faithful"] = check(text, s, title=t).faithful
    return {"metrics": report, "samples": samples,
            "generation": {"engine": "onnx" if onnx is not None else "torch", "batch": batch}}


def predicted_sizes(rows: pd.DataFrame, predicted_count, horizon_days: float) -> list[PredictedCount]:
    """Each row's prediction: its count and, where the rows carry them (`predicted_low` / `predicted_high`, from a
    model with quantile heads; NaN or absent otherwise), its 80% range, and its `drivers` (the checker verifies
    a text's driver claims against them)."""
    counts = np.asarray(predicted_count, np.float64)
    lows = rows["predicted_low"].to_numpy(np.float64) if "predicted_low" in rows else np.full(len(rows), np.nan)
    highs = rows["predicted_high"].to_numpy(np.float64) if "predicted_high" in rows else np.full(len(rows), np.nan)
    drivers = ([d if isinstance(d, dict) and d else None for d in rows["drivers"].tolist()]
               if "drivers" in rows else [None] * len(rows))
    return [PredictedCount(float(c), horizon_days, *((float(lo), float(hi)) if np.isfinite(lo) and np.isfinite(hi)
                                                      else (None, None)), drivers=d)
            for c, lo, hi, d in zip(counts, lows, highs, drivers)]


def sample_rows(frame: pd.DataFrame, scores: np.ndarray, n: int, top_n: int, seed: int = 0,
                counts: np.ndarray | None = None, low: np.ndarray | None = None,
                high: np.ndarray | None = None) -> pd.DataFrame:
    """n rows drawn evenly from each cut-off's top_n by score (the items the stream would explain);
    `counts` (the model's predicted counts, aligned with `frame`) ride along as `predicted_count`, and
    `low` / `high` (its 80% range, from a model with quantile heads) as `predicted_low` / `predicted_high`."""
    ranked = frame.assign(_score=scores)
    if counts is not None:
        ranked = ranked.assign(predicted_count=np.asarray(counts, np.float64))
    if low is not None and high is not None:
        ranked = ranked.assign(predicted_low=np.asarray(low, np.float64), predicted_high=np.asarray(high, np.float64))
    ranked = ranked.sort_values(["cutoff_ms", "_score"], ascending=[True, False])
    head = ranked.groupby("cutoff_ms", sort=False).head(top_n)
    return head.sample(n=min(n, len(head)), random_state=seed).drop(columns="_score")


# ---- seeded samples for docs/explanations.md ---------------------------------------------------------

SAMPLES_BEGIN = "<!-- explanation-samples:begin (python -m trainer.explain_eval --samples ...) -->"
SAMPLES_END = "<!-- explanation-samples:end -->"


def samples_markdown(reports: list[dict], n: int = 10, seed: int = 0) -> str:
    """n samples per evaluation report, drawn with `seed` from its `explanation_samples` (themselves a
    seeded draw of test candidates): never chosen by hand."""
    import random

    lines = []
    for rep in reports:
        pool = rep.get("explanation_samples") or []
        pick = random.Random(seed).sample(range(len(pool)), min(n, len(pool)))
        model = (rep.get("model") or {}).get("dir", "?")
        lines += [f"**{rep.get('dataset', '?')}** ({len(pick)} of {len(pool)} evaluated test candidates, seed {seed}, "
                  f"model `{model}`)", "",
                  "| item | forecast (model / realised) | constrained (published) | unconstrained greedy |",
                  "|---|---|---|---|"]
        for i in sorted(pick):
            s = pool[i]
            cell = lambda t: (t or "").replace("|", "\\|").replace("\n", " ")  # noqa: E731
            pub = cell(s.get("explanation"))
            if s.get("repaired"):
                pub += " *(repaired)*"
            if not s.get("faithful", True):
                pub += " *(unfaithful)*"
            free = cell(s.get("explanation_unconstrained"))
            if "faithful_unconstrained" in s and not s["faithful_unconstrained"]:
                free += " ✗"
            lines.append(f"| {cell(s.get('title'))[:40]} | {s.get('forecast_predicted', '?')} / "
                         f"{s.get('forecast_realised', '?')} | {pub} | {free} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_samples(doc: str, markdown: str) -> None:
    """Replace what stands between the sample markers of `doc`."""
    from pathlib import Path

    path = Path(doc)
    text = path.read_text()
    if SAMPLES_BEGIN not in text or SAMPLES_END not in text:
        raise ValueError(f"{doc}: no sample markers ({SAMPLES_BEGIN!r} ... {SAMPLES_END!r})")
    head, rest = text.split(SAMPLES_BEGIN, 1)
    _, tail = rest.split(SAMPLES_END, 1)
    path.write_text(f"{head}{SAMPLES_BEGIN}\n{markdown}{SAMPLES_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m trainer.explain_eval",
                                 description="Seeded explanation samples from trainer.evaluate reports.")
    ap.add_argument("--samples", nargs="+", required=True, metavar="REPORT.json",
                    help="reports written by python -m trainer.evaluate --model DIR --json")
    ap.add_argument("--n", type=int, default=10, help="samples per dataset (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", default=None, metavar="DOC.md", help="replace the samples between the markers of DOC.md")
    args = ap.parse_args(argv)
    md = samples_markdown([json.loads(open(p).read()) for p in args.samples], args.n, args.seed)
    if args.write:
        write_samples(args.write, md)
    else:
        print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

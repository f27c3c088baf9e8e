"""TRAIL: one causal LM that explains an item's next-period popularity, and whose item states feed the score.

    item    = item_text(title, category, description)   (stream.core.prompts: the item block, static per item)
    z       = mean over the item block's tokens of LM(item)'s last hidden layer   (H,) once per item, cached
    x       = Normalisation.of_frame / of_signals        (S,) the trend signals + horizon, every tick
    score   = rank(x) + rank_item(z, x)                  (B,) ranking score (listwise on next-period distinct users)
    log_count = count(x) + count_item(z, x)              (B,) predicted log1p(next-period count)
    explain = LM head continuing render_prompt(...)      ("bought 41 times in the last 7 days, ...")

`rank` starts as exp_decay's order (x[ema]) and learns a residual; `rank` and `count`
read the numbers only; the item terms are the LLM's contribution,
zero-initialised residuals trained after the numeric parts are frozen, kept only
when they help on the validation cut-offs (rank_item is zeroed when it costs NDCG).
`head.numeric_only(x)` is the same head without them (the `trail_numeric` ablation).
docs/model.md has the losses and why.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stream.core.features import Normalisation

MANIFEST = "manifest.json"
HEAD_FILE = "score_head.safetensors"
ADAPTER_DIR = "adapter"
END_TOKEN = "<|im_end|>"  # SmolLM2's end-of-turn token ends every explanation


@dataclass
class TrailConfig:
    base: str = "smollm2-135m-instruct"  # or a local HF folder
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # LoRA on the top layers only: backward stops there, which halves a CPU step.
    lora_layers: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    head_hidden: int = 64
    max_prompt_tokens: int = 112  # busy MovieLens items reach ~81 tokens with p2, p3's forecast line adds ~15; a cut prompt loses its last line
    max_explanation_tokens: int = 64  # a mover's reason with 3-4 digit counts reaches ~59 tokens (tests)
    max_item_tokens: int = 48  # the item block (title, category, description) the item state reads
    item_dim: int = 32  # item state projected to this before it meets the signals
    item_uses_x: bool = False  # the count's item term reads the item state only (a per-item effect)
    # the ranking starts as a decayed count (+ w * distinct users), chosen on validation ("auto"),
    # or as the named signal ("ema" = exp_decay's order); a learned residual goes on top
    rank_prior: str = "auto"


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, n_out))


SCORE_DESIGN = "item-state-v2"
POOLING = "mean"  # over the item block's tokens (the leading BOS excluded), last hidden layer


class ItemTerm(nn.Module):
    """A per-item residual: LayerNorm(z) -> Linear(H, item_dim), concatenated with x -> MLP -> 1.

    The last layer starts at zero, so adding the term changes nothing until it is trained."""

    def __init__(self, hidden_size: int, n_features: int, cfg: TrailConfig, uses_x: bool = True) -> None:
        super().__init__()
        self.uses_x = uses_x
        self.proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, cfg.item_dim))
        self.mlp = nn.Sequential(nn.Linear(cfg.item_dim + (n_features if uses_x else 0), cfg.head_hidden), nn.GELU(),
                                 nn.Linear(cfg.head_hidden, 1))
        self.zero_()

    def zero_(self) -> None:
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.proj(z), x], dim=-1) if self.uses_x else self.proj(z)
        return self.mlp(h).squeeze(-1)  # (B,)


class PriorMLP(nn.Module):
    """x @ prior + MLP(x), the MLP's last layer zero-initialised: it starts as the prior.

    For the ranking the prior picks the normalised `ema` input: a monotone function of the
    decayed count, i.e. exactly exp_decay's order. Training learns the residual; early
    stopping on validation compares every epoch with that start."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("prior", torch.zeros(n_features))
        self.mlp = _mlp(n_features, hidden, 1)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.prior).unsqueeze(-1) + self.mlp(x)  # (B, 1)


class ScoreHead(nn.Module):
    """v2 head: inputs x (B, S) and item_state z (B, H); outputs score (B,) and log_count (B,)."""

    def __init__(self, hidden_size: int, n_features: int, cfg: TrailConfig) -> None:
        super().__init__()
        self.rank = PriorMLP(n_features, cfg.head_hidden)  # ranking score from the trend signals
        self.rank_item = ItemTerm(hidden_size, n_features, cfg)  # kept only if validation NDCG says so
        self.count = _mlp(n_features, cfg.head_hidden, 1)  # numeric log1p(count)
        self.count_item = ItemTerm(hidden_size, n_features, cfg, uses_x=cfg.item_uses_x)  # the item's residual

    def numeric_only(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, log_count) without the item terms: the `trail_numeric` ablation."""
        return self.rank(x).squeeze(-1), self.count(x).squeeze(-1)

    def forward(self, x: torch.Tensor, item_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, log_count = self.numeric_only(x)
        return score + self.rank_item(item_state, x), log_count + self.count_item(item_state, x)


# ---- the model -----------------------------------------------------------------

class Trail(nn.Module):
    def __init__(self, lm: nn.Module, head: ScoreHead, tokenizer, cfg: TrailConfig, norm: Normalisation,
                 cache_dir: Path | None = None) -> None:
        super().__init__()
        self.lm, self.head, self.tokenizer, self.cfg, self.norm = lm, head, tokenizer, cfg, norm
        self.cache_dir = cache_dir  # item states are kept under cache_dir/item_states; None: not on disk
        self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)

    # the decoder stack (LlamaModel) and the LM head, under the peft wrapper when there is one
    @property
    def decoder(self) -> nn.Module:
        inner = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return inner.model

    @property
    def lm_head(self) -> nn.Module:
        inner = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return inner.lm_head

    # ---- tokenisation ----
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids: (B, T) ids, (B, T) mask."""
        ids = [self.tokenizer(p).input_ids[: self.cfg.max_prompt_tokens] for p in prompts]
        return _pad(ids, self.end_id)

    def encode_pairs(self, prompts: list[str], explanations: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompt + explanation + end: (B, T) ids, (B, T) mask, (B,) last prompt position, (B, T) target mask."""
        rows, last, targets = [], [], []
        for p, e in zip(prompts, explanations):
            p_ids = self.tokenizer(p).input_ids[: self.cfg.max_prompt_tokens]
            e_ids = self.tokenizer(" " + e, add_special_tokens=False).input_ids[: self.cfg.max_explanation_tokens]
            rows.append(p_ids + e_ids + [self.end_id])
            last.append(len(p_ids) - 1)
            targets.append([0] * len(p_ids) + [1] * (len(e_ids) + 1))
        ids, mask = _pad(rows, self.end_id)
        target_mask, _ = _pad(targets, 0)
        return ids, mask, torch.tensor(last), target_mask.bool()

    # ---- forward passes ----
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)

    # ---- item states (once per item) ----
    def encode_items(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded item-block ids (B, T) and mask (B, T); each row starts with the tokenizer's BOS."""
        ids = [self.tokenizer(t).input_ids[: self.cfg.max_item_tokens] for t in texts]
        return _pad(ids, self.end_id)

    def item_state(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, H) mean of the last hidden layer over the item block's tokens (what export traces).

        The leading BOS is left out of the mean: its state is the same for every item."""
        hs = self.hidden(ids, mask)  # (B, T, H)
        pool = mask.clone()
        pool[:, 0] = 0
        pool = pool.to(hs.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hs * pool).sum(dim=1) / pool.sum(dim=1).clamp(min=1.0)

    def state_key(self) -> str:
        """Hash of what an item state depends on besides its text: base, adapter weights, text version, pooling."""
        from stream.core.prompts import ITEM_TEXT_VERSION

        h = hashlib.sha256(f"{self.cfg.base}|{ITEM_TEXT_VERSION}|{POOLING}|{self.cfg.max_item_tokens}".encode())
        h.update((getattr(self, "adapter_key", None) or adapter_key(self.lm)).encode())
        return h.hexdigest()[:20]

    @torch.no_grad()
    def item_states(self, texts: list[str], batch: int = 64, progress: bool = True, cache: bool = True) -> np.ndarray:
        """(N, H) float32 item states of `texts` (`stream.core.prompts.item_text`), cached on disk.

        The cache is `<self.cache_dir>/item_states/<state_key>.npz` (none without a cache_dir), keyed per text by
        sha1: a state is computed once per (base, adapter weights, item_text version, text)."""
        from tqdm import tqdm

        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        store = _StateCache(self.cache_dir, self.state_key()) if cache and self.cache_dir is not None else None
        known = store.get(keys) if store else {}
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
        if todo:
            was_training = self.training
            self.eval()
            lengths = [len(self.tokenizer(t).input_ids) for _, t in todo]
            order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
            new = {}
            for start in tqdm(range(0, len(order), batch), desc="item states", unit="batch", disable=not progress):
                chunk = [todo[i] for i in order[start : start + batch]]
                ids, mask = self.encode_items([t for _, t in chunk])
                out = self.item_state(ids, mask).float().numpy()
                new.update({k: v for (k, _), v in zip(chunk, out)})
            self.train(was_training)
            if store:
                store.put(new)
            known = known | new
        hidden = self.lm.config.hidden_size
        return np.stack([known[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, hidden), np.float32)

    def token_logprobs(self, hs: torch.Tensor, ids: torch.Tensor,
                       target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probability of every explanation token (N,), its id (N,) and its row (N,)."""
        pred_pos = target_mask[:, 1:]  # (B, T-1): position t predicts token t+1
        h = hs[:, :-1][pred_pos]  # (N, H): only explanation positions reach the 49k-way LM head
        logits = self.lm_head(h).float()  # (N, V)
        tokens = ids[:, 1:][pred_pos]  # (N,)
        tok_lp = -F.cross_entropy(logits, tokens, reduction="none")  # (N,)
        row = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(pred_pos)[pred_pos]  # (N,)
        return tok_lp, tokens, row

    @functools.cached_property
    def digit_ids(self) -> torch.Tensor:
        """Sorted ids of the vocabulary's number tokens (SmolLM2 writes one digit per token)."""
        vocab = range(len(self.tokenizer))
        return torch.tensor([i for i in vocab if self.tokenizer.decode([i]).strip().isdigit()], dtype=torch.long)

    @torch.no_grad()
    def explain(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy explanations, one prompt at a time (no padding subtleties)."""
        out = []
        limit = max_new_tokens or self.cfg.max_explanation_tokens
        for p in prompts:
            ids = torch.tensor([self.tokenizer(p).input_ids[: self.cfg.max_prompt_tokens]])
            gen = self.lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False,
                eos_token_id=self.end_id, pad_token_id=self.end_id,
            )
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out


def adapter_key(lm: nn.Module) -> str:
    """sha256 of the LoRA weights (names and values); load() records it before any merge."""
    h = hashlib.sha256()
    for name, p in sorted(lm.named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class _StateCache:
    """One .npz per state key under `cache_dir`/item_states: {"keys": sha1 of text, "states": (N, H)};
    the directory is the stream's too and keeps the most recent files (stream.model.item_states.prune_stores)."""

    def __init__(self, cache_dir: Path, state_key: str) -> None:
        self.path = Path(cache_dir).expanduser() / "item_states" / f"{state_key}.npz"

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return dict(zip(z["keys"].tolist(), z["states"]))
        except (OSError, ValueError, KeyError):  # a torn or foreign file: recompute
            return {}

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        have = self._read()
        return {k: have[k] for k in keys if k in have}

    def put(self, new: dict[str, np.ndarray]) -> None:
        if not new:
            return
        from stream.model.item_states import prune_stores

        merged = self._read() | new
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npz")
        np.savez(tmp, keys=np.array(list(merged)), states=np.stack(list(merged.values())).astype(np.float32))
        tmp.replace(self.path)
        prune_stores(self.path.parent, self.path)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# ---- losses (docs/model.md) --------------------------------------------------------

def lambda_rank_loss(score: torch.Tensor, gain: torch.Tensor, k: int = 20) -> torch.Tensor:
    """LambdaRank with |delta NDCG@k| weights over one cut-off's candidates.

    `gain` is linear (next-period distinct users: an item in the shared list is a hit for
    each of them). Pairs (i, j) with gain_i > gain_j are weighted by how much NDCG@k would
    change if they swapped places in the current ranking; only pairs with at least one
    item in the current top k (or the ideal top k) can change NDCG@k, so only those count.
    """
    n = score.shape[0]
    if n < 2:
        return score.sum() * 0
    with torch.no_grad():
        order = torch.argsort(score, descending=True)
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)
        disc = torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(()))
        ideal = torch.sort(gain, descending=True).values[:k]
        idcg = (ideal / torch.log2(torch.arange(len(ideal)).float() + 2.0)).sum()
        empty = bool(idcg <= 0)
        if not empty:
            top = torch.unique(torch.cat([order[:k], torch.argsort(gain, descending=True)[:k]]))
    if empty:  # no gain at this cut-off: nothing to order (outside no_grad, so it still has a grad_fn)
        return score.sum() * 0
    s_top, g_top, d_top = score[top], gain[top], disc[top]  # (T,)
    dg = g_top.unsqueeze(1) - gain.unsqueeze(0)  # (T, N): gain_top - gain_all
    dd = (d_top.unsqueeze(1) - disc.unsqueeze(0)).abs()
    ds = s_top.unsqueeze(1) - score.unsqueeze(0)
    weight = (dg.abs() * dd / idcg)  # |delta NDCG| of swapping
    # each pair once: orient it so that the first has the larger gain
    sign = torch.sign(dg)
    loss = weight * F.softplus(-sign * ds)
    # a pair with both members in `top` appears twice (once from each side): halve those
    both = torch.zeros(n, dtype=torch.bool)
    both[top] = True
    loss = torch.where(both.unsqueeze(0), loss * 0.5, loss)
    return loss[dg != 0].sum()


# ---- building, saving, loading -------------------------------------------------------

def load_base(base: str, *, cache_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.backbone import resolve_base

    path = resolve_base(base, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return lm, tokenizer


def build(cfg: TrailConfig, norm: Normalisation, init_adapter: str | Path | None = None, *,
          cache_dir: Path) -> Trail:
    """A fresh model: base + LoRA (new, or trainable copy of `init_adapter`, an adapter folder) + a new head.
    `cache_dir` (the caller's `Settings.cache_dir`) holds the converted base model and the item states."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lm, tokenizer = load_base(cfg.base, cache_dir=cache_dir)
    if init_adapter is not None:
        lm = PeftModel.from_pretrained(lm, Path(init_adapter), is_trainable=True)
    else:
        n_layers = lm.config.num_hidden_layers
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            layers_to_transform=list(range(n_layers - cfg.lora_layers, n_layers)), task_type="CAUSAL_LM",
        )
        lm = get_peft_model(lm, lora)
    head = ScoreHead(lm.config.hidden_size, len(norm.names), cfg)
    return Trail(lm, head, tokenizer, cfg, norm, cache_dir=cache_dir)


MANIFEST_ABOUT = {
    "what": "A TRAIL model artefact: one fine-tuned causal LM (base + LoRA adapter/) that explains an item's "
            "next-period popularity, and a small score head (score_head.safetensors) that ranks and counts.",
    "score": "item_state = mean over the item block's tokens (BOS excluded) of the LLM's last hidden layer, "
             "item block = stream.core.prompts.item_text(title, category, description, item_id) (version "
             "item_state.text_version); x = stream.core.features.Normalisation (this manifest's normalisation) "
             "of the trend signals (feature_spec) then the horizon in days; score = rank(x) + rank_item(z, x) "
             "(ranking only, higher = more popular next period); log_count = count(x) + count_item(z, x) = "
             "log1p(predicted next-period count). trail_numeric = the same head without the item terms.",
    "explain": "greedy continuation of stream.core.prompts.render_prompt (prompt_version) by the LM with the adapter",
    "files": {"manifest.json": "this file", "adapter/": "peft LoRA adapter of base_model",
              "score_head.safetensors": "ScoreHead (trainer/model.py) weights",
              "onnx/": "after python -m export.onnx --model DIR: the ONNX files and export.json, their record"},
    "training": "what trainer.fit did, phase by phase (training), and the exact command (command)",
    "metrics": "validation-cut-off figures only; test figures come from python -m trainer.evaluate --model DIR",
}


@dataclass
class Manifest:
    model_version: str
    base_model: str
    trail_config: dict
    feature_spec: dict
    normalisation: dict
    prompt_version: str
    horizon_days: dict
    datasets: list[str]
    metrics: dict = field(default_factory=dict)
    command: str = ""
    score_design: str = ""  # "item-state-v2" for this code; v1 artefacts have none
    item_state: dict = field(default_factory=dict)  # {"pooling", "hidden_size", "text_version", "max_tokens"}
    training: dict = field(default_factory=dict)  # what the fit did: adapter source, steps, device, minutes ...
    about: dict = field(default_factory=dict)  # MANIFEST_ABOUT: the artefact describes itself

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a TRAIL model directory (no {MANIFEST})")
        data = json.loads(path.read_text())
        data.pop("onnx", None)  # an export before EXPORT_VERSION 4 wrote its record here; now it is onnx/export.json
        return cls(**data)


def save(model: Trail, manifest: Manifest, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(directory / ADAPTER_DIR)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, directory / HEAD_FILE)
    manifest.save(directory)


def config_of(manifest: Manifest) -> TrailConfig:
    known = {f.name for f in fields(TrailConfig)}  # an older fit's manifest may name a field since removed (embed_dim)
    return TrailConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest.trail_config.items()
                          if k in known})


def load_head(directory: str | Path) -> ScoreHead:
    """The score head alone, from its weights and the manifest (no base model: export.onnx --head-first)."""
    from safetensors.torch import load_file

    manifest = Manifest.load(directory)
    head = ScoreHead(int(manifest.item_state["hidden_size"]), len(manifest.normalisation["names"]),
                     config_of(manifest))
    head.load_state_dict(load_file(Path(directory) / HEAD_FILE))
    return head.eval()


def load(directory: str | Path, merge: bool = False, *, cache_dir: Path) -> tuple[Trail, Manifest]:
    """Rebuild the model from the artefact directory alone (base weights come from resolve_base; `cache_dir`,
    the caller's `Settings.cache_dir`, holds the converted base model and the item states)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = Manifest.load(directory)
    if manifest.score_design != SCORE_DESIGN:
        raise ValueError(f"{directory}: score design {manifest.score_design or 'v1 (prompt-token score)'!r}, this "
                         f"code reads {SCORE_DESIGN!r}; rebuild it with python -m trainer.fit --init-adapter "
                         f"{directory / ADAPTER_DIR} --budget-minutes 0 ...")
    cfg = config_of(manifest)
    norm = Normalisation.from_dict(manifest.normalisation)
    lm, tokenizer = load_base(cfg.base, cache_dir=cache_dir)
    lm = PeftModel.from_pretrained(lm, directory / ADAPTER_DIR)
    key = adapter_key(lm)  # the item-state cache key survives a merge
    if merge:
        lm = lm.merge_and_unload()
    head = ScoreHead(lm.config.hidden_size, len(norm.names), cfg)
    head.load_state_dict(load_file(directory / HEAD_FILE))
    model = Trail(lm, head, tokenizer, cfg, norm, cache_dir=cache_dir)
    model.adapter_key = key
    model.eval()
    return model, manifest


__all__ = ["Trail", "TrailConfig", "ScoreHead", "ItemTerm", "Manifest", "SCORE_DESIGN", "POOLING", "build", "load",
           "save", "lambda_rank_loss"]

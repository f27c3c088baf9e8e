"""TRAIL: one causal LM that scores an item's next-period popularity and explains it.

    prompt  = render_prompt(item, signals)           (stream.core.prompts: the same text online)
    h       = LM(prompt)[last prompt token]           (B, H) hidden state, LoRA on the top layers
    score   = numeric(x) + text(h)                    (B,) predicted log(1+next-period count)
    explain = LM head continuing the prompt           ("bought 41 times in the last 7 days, ...")

x is the item's normalised trend-signal vector (the manifest records the
normalisation). The numeric branch is fitted first on every training row (cheap),
then the LLM learns the residual that text (title, category, season) explains,
while its LM head learns faithful explanations and two contrastive terms tie the
score and the words to the same evidence (docs/model.md has the exact losses).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    embed_dim: int = 32  # InfoNCE space shared by the score token and the signal vector
    max_prompt_tokens: int = 80
    max_explanation_tokens: int = 48


# ---- trend-signal features ---------------------------------------------------

def signal_transform(values: np.ndarray) -> np.ndarray:
    """Signed log1p: counts span 0..10^4, velocities are signed."""
    return np.sign(values) * np.log1p(np.abs(values))


@dataclass
class Normalisation:
    names: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, names: list[str], values: np.ndarray) -> "Normalisation":
        t = signal_transform(values)
        # floor: a signal constant in a small training slice must not divide later inputs by ~0
        return cls(list(names), t.mean(axis=0).tolist(), np.maximum(t.std(axis=0), 1e-2).tolist())

    def apply(self, values: np.ndarray) -> np.ndarray:
        """(N, S) raw signals in `names` order -> (N, S) float32 model input."""
        return ((signal_transform(values) - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, n_out))


class ScoreHead(nn.Module):
    def __init__(self, hidden_size: int, n_features: int, cfg: TrailConfig) -> None:
        super().__init__()
        self.numeric = _mlp(n_features, cfg.head_hidden, 1)
        self.text = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, 1)
        )
        nn.init.zeros_(self.text[-1].weight)  # starts as the numeric branch alone
        nn.init.zeros_(self.text[-1].bias)
        self.score_proj = nn.Linear(hidden_size, cfg.embed_dim)
        self.signal_proj = _mlp(n_features, cfg.head_hidden, cfg.embed_dim)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # h: (B, H) score-token hidden state; x: (B, S) normalised signals
        return (self.numeric(x) + self.text(h)).squeeze(-1)  # (B,)


# ---- the model -----------------------------------------------------------------

class Trail(nn.Module):
    def __init__(self, lm: nn.Module, head: ScoreHead, tokenizer, cfg: TrailConfig, norm: Normalisation) -> None:
        super().__init__()
        self.lm, self.head, self.tokenizer, self.cfg, self.norm = lm, head, tokenizer, cfg, norm
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

    def score(self, ids: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Prompt-only score path (what export.onnx traces): (B,) predicted log1p(count)."""
        hs = self.hidden(ids, mask)  # (B, T, H)
        last = mask.sum(dim=1) - 1  # (B,) right padding: last real token
        h = hs[torch.arange(ids.shape[0]), last]  # (B, H)
        return self.head(h, x)

    def explanation_logprob(self, hs: torch.Tensor, ids: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean log-probability of each row's explanation tokens: (B,), and the summed NLL over all tokens."""
        pred_pos = target_mask[:, 1:]  # (B, T-1): position t predicts token t+1
        h = hs[:, :-1][pred_pos]  # (N_tok, H): only explanation positions reach the 49k-way LM head
        logits = self.lm_head(h).float()  # (N_tok, V)
        tokens = ids[:, 1:][pred_pos]  # (N_tok,)
        tok_lp = -F.cross_entropy(logits, tokens, reduction="none")  # (N_tok,)
        row = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(pred_pos)[pred_pos]  # (N_tok,)
        per_row = torch.zeros(ids.shape[0]).index_add_(0, row, tok_lp) / pred_pos.sum(dim=1).clamp(min=1)
        return per_row, -tok_lp.sum()

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


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# ---- losses (docs/model.md) --------------------------------------------------------

def pairwise_rank_loss(score: torch.Tensor, target: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RankNet logistic loss over pairs of the same cut-off whose targets differ."""
    diff_t = target.unsqueeze(0) - target.unsqueeze(1)  # (B, B)
    diff_s = score.unsqueeze(0) - score.unsqueeze(1)
    pairs = (group.unsqueeze(0) == group.unsqueeze(1)) & (diff_t > 0)
    if not pairs.any():
        return score.sum() * 0
    return F.softplus(-diff_s[pairs]).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: row i of a should match row i of b against the rest of the batch."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature  # (B, B)
    labels = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ---- building, saving, loading -------------------------------------------------------

def load_base(base: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.backbone import resolve_base

    path = resolve_base(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return lm, tokenizer


def build(cfg: TrailConfig, norm: Normalisation) -> Trail:
    from peft import LoraConfig, get_peft_model

    lm, tokenizer = load_base(cfg.base)
    n_layers = lm.config.num_hidden_layers
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets),
        layers_to_transform=list(range(n_layers - cfg.lora_layers, n_layers)), task_type="CAUSAL_LM",
    )
    lm = get_peft_model(lm, lora)
    head = ScoreHead(lm.config.hidden_size, len(norm.names), cfg)
    return Trail(lm, head, tokenizer, cfg, norm)


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
    onnx: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a TRAIL model directory (no {MANIFEST})")
        return cls(**json.loads(path.read_text()))


def save(model: Trail, manifest: Manifest, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(directory / ADAPTER_DIR)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, directory / HEAD_FILE)
    manifest.save(directory)


def load(directory: str | Path, merge: bool = False) -> tuple[Trail, Manifest]:
    """Rebuild the model from the artefact directory alone (base weights come from resolve_base)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = Manifest.load(directory)
    cfg = TrailConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest.trail_config.items()})
    norm = Normalisation(**manifest.normalisation)
    lm, tokenizer = load_base(cfg.base)
    lm = PeftModel.from_pretrained(lm, directory / ADAPTER_DIR)
    if merge:
        lm = lm.merge_and_unload()
    head = ScoreHead(lm.config.hidden_size, len(norm.names), cfg)
    head.load_state_dict(load_file(directory / HEAD_FILE))
    model = Trail(lm, head, tokenizer, cfg, norm)
    model.eval()
    return model, manifest


def predicted_count(log_score: np.ndarray) -> np.ndarray:
    return np.expm1(np.maximum(log_score, 0.0))


__all__ = ["Trail", "TrailConfig", "ScoreHead", "Normalisation", "Manifest", "build", "load", "save"]

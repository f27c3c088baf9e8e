"""Constrained decoding: llguidance token masks that hold each row of a batch to its claim grammar.

`stream.core.faithfulness.grammar.claim_grammar` writes, per item, the language of true
explanations with the forecast clause fixed; llguidance (Rust, MIT; `pip install llguidance`)
compiles it (~2 ms) and, at every step, computes the set of tokens that keep the text inside
it (~0.1 ms a row on this CPU, against ~25-60 ms for one decoder step). The mask is applied to
the logits before a token is chosen (greedy, or seeded sampling: stream.core.decoding), so the
decoder only ever picks an *allowed* token:
the model still chooses shape, phrasing and which facts to cite; it cannot emit a wrong number,
a wrong direction word, or a forecast other than the forced one. Once the grammar is complete,
the only allowed token is the end token.

Used by the stream's ONNX loop (`stream.model.onnx_models.Generator.generate_batch`, numpy)
and by the trainer's torch `generate` (`trainer.explain_eval.GuideProcessor`) alike: the
logits are a (B, V) float32 numpy array (a CPU torch tensor's `.numpy()` shares its memory).

The tokenizer comes from the artefact's tokenizer.json with the `tokenizers` library only
(no transformers). The tokenizer.json converted from SmolLM2's GGUF carries a SentencePiece-style
decoder chain (ByteFallback, Fuse, Replace, ByteLevel) that llguidance cannot invert (its mask
computation panics); the vocabulary is byte-level BPE, so the decoder is replaced by a plain
ByteLevel one for llguidance's copy (the serving tokenizer is untouched).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


class GuideError(RuntimeError):
    """A grammar llguidance refused, or a token a matcher could not accept."""


class ClaimConstraint:
    """The llguidance tokenizer of one artefact; `guide(grammars)` makes the matchers of one batch."""

    def __init__(self, tokenizer_json: Path | str, end_id: int) -> None:
        """`tokenizer_json`: the path of a tokenizer.json, or its text (a string starting with "{")."""
        import llguidance

        text = tokenizer_json if isinstance(tokenizer_json, str) and tokenizer_json.lstrip().startswith("{") \
            else Path(tokenizer_json).read_text()
        spec = json.loads(text)
        pre = json.dumps(spec.get("pre_tokenizer") or {})
        if "ByteLevel" in pre:
            spec["decoder"] = BYTE_LEVEL_DECODER
        self._llg = llguidance
        self.end_id = end_id
        self.tokenizer = llguidance.LLTokenizer(json.dumps(spec), eos_token=end_id)
        self.vocab_size = self.tokenizer.vocab_size

    def matcher(self, lark: str):
        m = self._llg.LLMatcher(self.tokenizer, self._llg.grammar_from("lark", lark), log_level=1)
        if m.is_error():
            raise GuideError(f"llguidance refused the grammar: {m.get_error()}")
        return m

    def guide(self, grammars: Sequence[str | None]) -> "Guide":
        """One matcher per row (None: that row decodes unconstrained)."""
        return Guide(self, [None if g is None else self.matcher(g) for g in grammars])


class Guide:
    """Per-row matchers of one batch: `mask(logits, rows)` before a token is chosen, `advance(rows, tokens)` after."""

    def __init__(self, constraint: ClaimConstraint, matchers: list) -> None:
        import llguidance.numpy as lln

        self._lln = lln
        self.constraint = constraint
        self.matchers = matchers
        self.bitmask = lln.allocate_token_bitmask(len(matchers), constraint.vocab_size)
        self.seconds = 0.0  # time spent computing and applying masks
        self.steps = 0
        self.forced = 0  # tokens fast-forwarded (fed without a decoding step of their own)

    def part(self, rows: Sequence[int]) -> "Guide":
        """A guide over some of these rows (their own matchers, renumbered 0..): one shard of a batch decoded apart
        (stream.model.onnx_models.ShardedGenerator); `absorb` adds its counts back."""
        return Guide(self.constraint, [self.matchers[i] for i in rows])

    def absorb(self, parts: Sequence["Guide"]) -> None:
        for g in parts:
            self.seconds += g.seconds
            self.steps += g.steps
            self.forced += g.forced

    def mask(self, logits: np.ndarray, rows: Sequence[int] | None = None) -> None:
        """Set the logits of disallowed tokens to -inf, in place; logits (B, V) for the batch's rows."""
        import time

        t0 = time.perf_counter()
        rows = range(len(self.matchers)) if rows is None else rows
        v = logits.shape[-1]
        for i in rows:
            m = self.matchers[i]
            if m is None:
                continue
            self._lln.fill_next_token_bitmask(m, self.bitmask, i)
            if m.is_error():
                raise GuideError(f"row {i}: {m.get_error()}")
            allowed = np.unpackbits(self.bitmask[i].view(np.uint8), bitorder="little")[:v].astype(bool)
            if v > allowed.shape[0]:
                allowed = np.concatenate([allowed, np.zeros(v - allowed.shape[0], bool)])
            logits[i, ~allowed] = -np.inf
        self.seconds += time.perf_counter() - t0
        self.steps += 1

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        for i, t in zip(rows, tokens):
            m = self.matchers[i]
            if m is None or m.is_stopped():
                continue
            if not m.consume_token(int(t)):
                raise GuideError(f"row {i}: token {t} refused: {m.get_error()}")

    def fast_forward(self, row: int, limit: int | None = None) -> list[int]:
        """The tokens the grammar forces next for this row (consumed here): the rest of a number, of a
        window phrase ... The caller feeds them to the model in the same step as the sampled token."""
        m = self.matchers[row]
        if m is None or m.is_stopped() or limit == 0:
            return []
        ff = m.compute_ff_tokens()[:limit]
        if ff and not m.consume_tokens(ff):
            raise GuideError(f"row {row}: forced tokens {ff} refused: {m.get_error()}")
        self.forced += len(ff)
        return ff

    def stopped(self, row: int) -> bool:
        """The grammar is complete and admits nothing but the end token."""
        m = self.matchers[row]
        return m is not None and m.is_stopped()

    def accepting(self, row: int) -> bool:
        m = self.matchers[row]
        return m is None or m.is_accepting()

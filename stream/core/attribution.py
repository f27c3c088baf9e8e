"""Exact Shapley values over a few input groups: what each group of a prediction's inputs moved.

For a function f of grouped inputs, a prediction x and a reference input r (an average item at an
average time), a coalition S of groups is the input with S's groups from x and the others from r;
v(S) = f(that input). Group g's Shapley value is
    phi_g = sum over S not holding g of |S|! (n - |S| - 1)! / n! * (v(S + g) - v(S)),
computed exactly from all 2^n coalitions, evaluated in one batch of B * 2^n rows (n <= 5 groups:
32 evaluations per prediction). They add up: sum_g phi_g = f(x) - f(r) (tests check it).
Pure numpy: `fn` is the model (an ONNX session, a torch head behind a numpy wrapper ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import product
from math import factorial

import numpy as np

MAX_GROUPS = 8
HORIZON = "horizon_days"  # stream.core.features.HORIZON (not imported: features imports nothing from here)
# The driver groups of the count's range head (trainer.quantiles), in record order. No neighbourhood
# group: the head has no neighbourhood input, so its Shapley value would be 0.
DRIVER_GROUPS = ("trend", "level", "season", "text")


def signal_group(name: str) -> str | None:
    """The driver group of a model input: own short-term trend (day/week windows, the fast decays,
    idle time) or own long-term level (28-day window, the slow decay, lifetime count, age); None
    for the horizon (not attributed)."""
    if name == HORIZON:
        return None
    if name.endswith("_28d") or name in ("ema_14d", "total_count", "age_h"):
        return "level"
    return "trend"


def coalitions(n: int) -> np.ndarray:
    """(2^n, n) bool: every subset of n groups, one per row."""
    return np.array(list(product((False, True), repeat=n)), dtype=bool).reshape(-1, n)


def shapley_weights(masks: np.ndarray) -> np.ndarray:
    """(n, 2^n) matrix W with phi = W @ v: +w(S) where g in S (as S' = S + g), -w(S) where g not in S."""
    n_coal, n = masks.shape
    size = masks.sum(axis=1)
    w = np.zeros((n, n_coal))
    for g in range(n):
        has = masks[:, g]
        # the coalition with g has |S| = size - 1 others; the one without it has size others
        w[g, has] = [factorial(k - 1) * factorial(n - k) / factorial(n) for k in size[has]]
        w[g, ~has] = [-factorial(k) * factorial(n - k - 1) / factorial(n) for k in size[~has]]
    return w


def group_shapley(fn: Callable[[dict[str, np.ndarray]], np.ndarray], inputs: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray], fixed: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """({group: phi (B,)}, f(x) (B,), f(reference) (B,)) for B predictions.

    `inputs`: group -> (B, d_g) values; `reference`: group -> (d_g,) values of the reference, or (B, d_g), one
    reference per prediction;
    `fixed`: inputs that are not attributed (e.g. the horizon), (B, d) each, passed as they are.
    `fn` receives {name: (B * 2^n, d)} for every group and fixed input and returns (B * 2^n,)."""
    groups = list(inputs)
    n = len(groups)
    if not 0 < n <= MAX_GROUPS:
        raise ValueError(f"exact Shapley over {n} groups: need 1..{MAX_GROUPS}")
    B = len(next(iter(inputs.values())))
    masks = coalitions(n)  # (C, n)
    C = len(masks)
    batch = {}
    for g_i, g in enumerate(groups):
        x = np.asarray(inputs[g])
        r = np.broadcast_to(np.asarray(reference[g], x.dtype), x.shape)
        take = masks[:, g_i][None, :, None]  # (1, C, 1)
        batch[g] = np.where(take, x[:, None, :], r[:, None, :]).reshape(B * C, -1)
    for name, value in (fixed or {}).items():
        batch[name] = np.repeat(np.asarray(value), C, axis=0)
    v = np.asarray(fn(batch), np.float64).reshape(B, C)
    phi = v @ shapley_weights(masks).T  # (B, n)
    return {g: phi[:, i] for i, g in enumerate(groups)}, v[:, -1], v[:, 0]

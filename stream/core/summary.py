"""Short texts for the terminal faces (`python -m stream.tools.report`, the demo's board): a prediction's size and
range and an explanation's reason, in the words and rounding the explanations use (stream.core.forecast)."""

from __future__ import annotations

from stream.core.forecast import stated_range, stated_size


def size_text(count: float | None, low: float | None = None, high: float | None = None) -> str:
    """"~40 (25–55)": the predicted count and its 80% range as the explanation states them; "~40" without a
    range (a model without quantile heads); "-" without a count."""
    if count is None:
        return "-"
    text = f"~{stated_size(count)}"
    if low is not None and high is not None:
        lo, hi = stated_range(low, high)
        text += f" ({lo}–{hi})"
    return text


def reason_text(reason: str | None, source: str | None = None, driver: str | None = None) -> str:
    """"why: neighbourhood (top driver)", "why: level (rule; top driver text)": the kind of reason a text gives,
    where it came from, and the model's top driver when the text could not give it; "" when there is nothing."""
    parts = []
    if reason is not None:
        parts.append(f"why: {reason}" + (" (top driver)" if source == "drivers" else " (rule)" if source == "rule" else ""))
    if driver is not None and not (reason == driver and source == "drivers"):
        parts.append(f"top driver {driver}")
    return "; ".join(parts)

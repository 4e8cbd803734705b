"""Number formatting and the small block records (tables, key-value lists, notes) the template renders."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from pipeline.evaluate import WARNING_PHRASES

DASH = "—"
NA = "na"  # level of a note saying that data is not available
_NUMBER = r"[−+\-]?[\d,.]+(e[−+\-]?\d+)?"
_NUMERIC = re.compile(rf"^({_NUMBER}(–{_NUMBER})?( ?%| s| min.*| h.*)?( \(.+\))?|—|)$")


def num(x: Any, digits: int = 3) -> str:
    """A number with `digits` decimals; None, NaN and non-numbers become '—' (text passes through)."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{f:.{digits}f}" if math.isfinite(f) else DASH


def count(x: Any) -> str:
    """An integer count with thousands separators, or '—'."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return DASH
    return f"{round(f):,}" if math.isfinite(f) else DASH


def ci(lo: Any, hi: Any, digits: int = 2) -> str:
    """'lo–hi' or '—' when either end is missing."""
    a, b = num(lo, digits), num(hi, digits)
    return DASH if DASH in (a, b) else f"{a}–{b}"


def with_ci(point: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """'0.871 (0.802–0.933)' or the point alone when the CI is missing."""
    text = num(point, digits)
    interval = ci(lo, hi, digits)
    return text if interval == DASH or text == DASH else f"{text} ({interval})"


CALIBRATION_NAMES = {
    "temperature": "temperature scaling",
    "vector": "vector scaling",
    "isotonic": "isotonic regression",
    "none": "no calibration (plain softmax)",
}


def calibration_name(method: Any, temperature: Any = None) -> str:
    """'temperature scaling (T = 1.62)', 'no calibration (plain softmax)', ...; '—' when unknown."""
    if not method:
        return DASH
    name = CALIBRATION_NAMES.get(str(method), str(method))
    t = as_float(temperature)
    return f"{name} (T = {t:.2f})" if method == "temperature" and t is not None else name


def signed_with_ci(point: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """A difference with its CI, '+0.012 (−0.030 to +0.041)'; the point alone without a CI; '—' without a point."""
    values = [as_float(v) for v in (point, lo, hi)]
    if values[0] is None:
        return DASH
    text = f"{values[0]:+.{digits}f}"
    if values[1] is None or values[2] is None:
        return text
    return f"{text} ({values[1]:+.{digits}f} to {values[2]:+.{digits}f})"


def note_level(text: str) -> str:
    """The level of an evaluation note: 'warn' when it holds one of evaluate's `WARNING_PHRASES`, else 'info'."""
    return "warn" if any(phrase in text for phrase in WARNING_PHRASES) else "info"


def rate_with_ci(test: Any, key: str) -> str:
    """A test rate with its patient-bootstrap CI, '0.750 (0.620–0.860)'; the point alone without a CI."""
    if not isinstance(test, dict):
        return DASH
    bounds = test.get(f"{key}_ci")
    low, high = bounds if isinstance(bounds, list | tuple) and len(bounds) == 2 else (None, None)
    return with_ci(test.get(key), low, high)


def duration(seconds: Any) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return DASH
    if not math.isfinite(s):
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def as_float(x: Any) -> float | None:
    """float(x), or None when x is missing or not a finite number."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def as_list(x: Any) -> list[Any]:
    """A list from a list or a JSON-encoded list (MLflow params are strings); [] otherwise."""
    if isinstance(x, list | tuple):
        return list(x)
    if isinstance(x, str):
        try:
            value = json.loads(x)
        except ValueError:
            return []
        return value if isinstance(value, list) else []
    return []


def as_floats(x: Any) -> list[float | None]:
    """Numbers from a list, or from numpy's printed form "[0.1 0.2 nan]" (MLflow's log_dict stringifies
    arrays); non-numbers become None; anything else gives []."""
    if isinstance(x, str) and x.startswith("[") and x.endswith("]") and "..." not in x:
        x = x[1:-1].replace(",", " ").split()
    if not isinstance(x, list | tuple):
        return []
    return [as_float(v) for v in x]


def table(
    head: list[str], rows: list[list[Any]], caption: str | None = None, numeric: list[bool] | None = None
) -> dict[str, Any]:
    """A table block; numeric columns (every cell a number or '—', unless given) are right-aligned."""
    width = max([len(head), *[len(r) for r in rows]])
    cells = [[str(c) for c in row] + [""] * (width - len(row)) for row in rows]
    head = [*map(str, head), *[""] * (width - len(head))]
    if numeric is None:  # the first column labels the rows: left-aligned even when it holds numbers
        numeric = [i > 0 and bool(cells) and all(_NUMERIC.match(r[i]) for r in cells) for i in range(width)]
    numeric = [*numeric, *[False] * (width - len(numeric))]
    return {"type": "table", "head": head, "rows": cells, "numeric": numeric, "caption": caption}


def kv(rows: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key-value block; rows whose value is None are dropped."""
    return {"type": "kv", "rows": [(k, str(v)) for k, v in rows if v is not None]}


def note(text: str, level: str = "info") -> dict[str, Any]:
    """A highlighted note: level 'info', 'na' (not available) or 'warn'."""
    return {"type": "note", "text": text, "level": level}


def para(text: str) -> dict[str, Any]:
    return {"type": "para", "text": text}


def pre(text: str, caption: str | None = None) -> dict[str, Any]:
    return {"type": "pre", "text": text, "caption": caption}


def figures(items: list[tuple[str, str | None]], figs: dict[str, str]) -> dict[str, Any]:
    """Figures that exist among (name, caption); a missing one becomes a 'not available' caption."""
    out = [
        {"src": f"data:image/png;base64,{figs[name]}" if figs.get(name) else None, "caption": cap, "name": name}
        for name, cap in items
    ]
    return {"type": "figures", "items": out}


def group(blocks: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Small tables side by side (wrapping on narrow screens); None when empty."""
    kept = [b for b in blocks if b]
    return {"type": "group", "blocks": kept} if kept else None


def section(sid: str, title: str, blocks: Sequence[dict[str, Any] | None], lead: str | None = None) -> dict[str, Any]:
    return {"id": sid, "title": title, "blocks": [b for b in blocks if b], "lead": lead}

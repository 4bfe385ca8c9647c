"""Values made fit for strict JSON: JSON has no NaN or infinity."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts and lists too) replaced by ``None``.

    JSON has no NaN: ``json.dumps`` would write ``NaN``, which strict parsers refuse.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy and JAX scalars
        return finite_or_none(value.item())
    return value

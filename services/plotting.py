"""What the run's and the comparison's figures share: smoothing, and a style per distribution that
keeps ten lines legible (one colour per task family, a line style per difficulty)."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

FAMILY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DIFFICULTY_STYLES = ("-", "--", ":", "-.")


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (odd), shrunk at both ends."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    half = window // 2
    return [fmean(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def distribution_styles(distributions: Sequence[str]) -> dict[str, dict[str, str]]:
    """Matplotlib `color` and `linestyle` per distribution name `family/level`: a colour per family (in
    order of first appearance), a line style per level within it."""
    families: dict[str, list[str]] = {}
    for name in distributions:
        families.setdefault(name.split("/", 1)[0], []).append(name)
    styles = {}
    for family_index, members in enumerate(families.values()):
        for level_index, name in enumerate(members):
            styles[name] = {
                "color": FAMILY_COLOURS[family_index % len(FAMILY_COLOURS)],
                "linestyle": DIFFICULTY_STYLES[level_index % len(DIFFICULTY_STYLES)],
            }
    return styles

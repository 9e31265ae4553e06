"""Colours: one per control-plane label, the same hues `streamflow status` uses in a terminal.

The SVG graph, the legend, the label chips and the tables all read them from here, so a
label looks the same everywhere on the dashboard.
"""

from __future__ import annotations

from ledger.operator import LABEL_ORDER

#: Fill colour of each label; white text reads on every one of them.
LABEL_COLOURS: dict[str, str] = {
    "Needs Review": "#a21caf",
    "Blocked": "#dc2626",
    "Waiting": "#b45309",
    "Runnable": "#0e7490",
    "Running": "#1d4ed8",
    "Cancelled": "#6b7280",
    "Done": "#15803d",
}

#: The labels in the order an operator should look at them: Needs Review, Blocked,
#: Waiting, Runnable first (`ledger.operator.LABEL_ORDER`).
LABELS: tuple[str, ...] = tuple(label.value for label in LABEL_ORDER)

#: Rich styles (as the CLI colours evidence classifications) to CSS classes.
_RICH_TO_CSS = {
    "green": "good",
    "yellow": "warn",
    "magenta": "review",
    "red": "bad",
    "cyan": "info",
    "dim": "quiet",
    "bold": "strong",
}


def label_colour(label: str) -> str:
    return LABEL_COLOURS.get(label, "#374151")


def css_class(rich_style: str) -> str:
    """The CSS class for a rich style name such as "bold red" (its last word decides)."""
    words = rich_style.split()
    return _RICH_TO_CSS.get(words[-1], "") if words else ""

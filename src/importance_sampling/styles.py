"""One look per sampler across every figure of the repository: colour, line style and marker.

Every plot (analysis.py, variance.py, the notebooks) takes its lines from ``sampler_style``, so
a sampler looks the same in every figure, and no two samplers share a colour or a line style.
Colours are matplotlib's tab10 (readable for the common colour-vision deficiencies as far as a
10-colour palette can be; the line styles and markers carry the distinction too).
"""

from __future__ import annotations

import math

# The paper's four samplers first (its order), then those beyond the paper.
SAMPLER_STYLES: dict[str, dict] = {
    "uniform": {"color": "tab:gray", "linestyle": (0, (5, 2)), "marker": "s"},
    "loss": {"color": "tab:orange", "linestyle": "-.", "marker": "^"},
    "upper_bound": {"color": "tab:blue", "linestyle": "-", "marker": "o"},
    "gradient_norm": {"color": "tab:green", "linestyle": (0, (1, 1)), "marker": "D"},
    "upper_bound_auto": {"color": "tab:purple", "linestyle": (0, (8, 2, 2, 2)), "marker": "v"},
    "history": {"color": "tab:brown", "linestyle": (0, (3, 1, 1, 1, 1, 1)), "marker": "P"},
    "online_batch": {"color": "tab:red", "linestyle": (0, (2, 3)), "marker": "X"},
    "selective_backprop": {"color": "tab:pink", "linestyle": (0, (6, 2, 1, 2)), "marker": "<"},
    "infobatch": {"color": "tab:olive", "linestyle": (0, (12, 3)), "marker": ">"},
}
SAMPLER_ORDER = tuple(SAMPLER_STYLES)

# Samplers this table does not know (a user's own) cycle through what is left.
_SPARE = [
    {"color": "tab:cyan", "linestyle": (0, (4, 1, 1, 1)), "marker": "h"},
    {"color": "black", "linestyle": (0, (1, 2, 5, 2)), "marker": "*"},
]


def sampler_style(name: str) -> dict:
    """matplotlib keyword arguments (color, linestyle, marker) of a sampler's lines."""
    if name in SAMPLER_STYLES:
        return dict(SAMPLER_STYLES[name])
    return dict(_SPARE[sum(map(ord, name)) % len(_SPARE)])  # stable across runs and processes


def sampler_color(name: str) -> str:
    return sampler_style(name)["color"]


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Readable tick labels on a log axis: plain numbers (0.3, 1, 2) instead of 3x10^-1, at
    1-2-5 steps when the axis spans less than two decades (where matplotlib would label crowded
    minor ticks) and at powers of ten otherwise. Call after the data and limits are set."""
    from matplotlib import ticker

    for name in ("x", "y") if axis == "both" else (axis,):
        scale_axis = ax.xaxis if name == "x" else ax.yaxis
        low, high = ax.get_xlim() if name == "x" else ax.get_ylim()
        decades = abs(math.log10(high / low)) if low > 0 and high > 0 else 99
        subs = (1.0, 2.0, 3.0, 5.0) if decades < 1.2 else (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
        scale_axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        scale_axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        scale_axis.set_minor_formatter(ticker.NullFormatter())

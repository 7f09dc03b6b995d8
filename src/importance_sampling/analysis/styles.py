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
    1-2-3-5 steps when the axis spans about a decade, 1-2-5 up to 2.5 decades and powers of ten
    beyond (matplotlib's own choice labels crowded minor ticks on short axes). The ticks follow
    the axis limits as drawn."""
    from matplotlib import ticker

    class PlainLogLocator(ticker.Locator):
        def __call__(self):
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin, vmax):
            low, high = sorted((vmin, vmax))
            if low <= 0:
                return ticker.LogLocator().tick_values(vmin, vmax)
            decades = math.log10(high / low)
            subs = (1, 2, 3, 5) if decades < 1.2 else (1, 2, 5) if decades < 2.5 else (1,)
            ticks = [
                m * 10.0**k
                for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                for m in subs
                if low <= m * 10.0**k <= high
            ]
            if len(ticks) < 2:  # a very short axis: evenly spaced round numbers instead
                ticks = [
                    t for t in ticker.MaxNLocator(4).tick_values(low, high) if low <= t <= high
                ]
            return ticks

        def nonsingular(self, vmin, vmax):
            return ticker.LogLocator().nonsingular(vmin, vmax)

    for name in ("x", "y") if axis == "both" else (axis,):
        scale_axis = ax.xaxis if name == "x" else ax.yaxis
        scale_axis.set_major_locator(PlainLogLocator())
        scale_axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        scale_axis.set_minor_formatter(ticker.NullFormatter())

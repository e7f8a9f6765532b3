"""The look every figure of ``plot`` shares: one fixed colour, marker and line style per variant,
plain log axes, the grid of panels and legend entries.

Kept in one place so a variant looks the same in every figure of a grid. Colours come from seaborn's
colour-blind-safe palette; DWF depths share a blue ramp (darker = deeper, from azure to ultramarine:
vivid enough at every depth not to be taken for the dark brown, olive and grey of the baselines) and
differ by marker; families differ by line style.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; must come before pyplot

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from benchmark.analysis import curves as cv  # noqa: E402


@functools.lru_cache(maxsize=1)
def _palette() -> list:
    """seaborn's colour-blind-safe palette (imported here: seaborn takes seconds to import)."""
    import seaborn as sns

    return sns.color_palette("colorblind", 10)


#: The ends of the colour ramp of a method's curves (DWF's depths): every step stays a saturated blue.
RAMP_ENDS = ("#2a9df4", "#1d2fa0")
_RAMP_MARKERS = ("o", "s", "D", "^", "v", "p")  # the curves of a method with a colour ramp, in turn
_VARIANT_LINES = ("-", (0, (5, 2)), (0, (1, 1)), (0, (6, 1, 1, 1, 1, 1)))  # a method's variants, in turn
_SPARE = [0, 5, 2, 4, 6, 8]  # palette slots for methods without a plotting.style


@dataclass(frozen=True)
class Style:
    color: tuple
    marker: str
    linestyle: object

    def line_kwargs(self) -> dict:
        return {"color": self.color, "linestyle": self.linestyle}


def _darken(color, amount: float) -> tuple:
    return tuple(float(c) * (1 - amount) for c in color)


def _ramp(n: int) -> list[tuple]:
    """``n`` colours from light to dark between ``RAMP_ENDS`` (one curve: the palette's blue)."""
    import seaborn as sns

    return [tuple(_palette()[0])] if n == 1 else [tuple(c) for c in sns.blend_palette(RAMP_ENDS, n)]


def variant_styles(info: dict[str, tuple[str, dict]]) -> dict[str, Style]:
    """A fixed style per variant (same variant, same look in every figure of a grid), from each
    method's ``plotting.style`` / ``plotting.ramp``; ``info`` is ``Results.variant_info()``."""
    styles = {}
    ramps: dict[str, list] = {}  # method -> [(curve rank, variant)] of a method drawn as a colour ramp
    for variant, (method, values) in info.items():
        found = cv.method_class(method)
        if found is not None and found.plotting.ramp:
            ramps.setdefault(method, []).append((found.plotting.rank(values), variant))
    for ramp in ramps.values():
        ramp.sort()
        colours = _ramp(len(ramp))
        for i, (_, variant) in enumerate(ramp):
            styles[variant] = Style(colours[i], _RAMP_MARKERS[i % len(_RAMP_MARKERS)], "-")
    spare = 0
    others: dict[str, int] = {}  # method -> its variants styled so far besides the plain one
    for variant, (method, _) in sorted(info.items()):
        if variant in styles or cv.is_reference(method):
            continue
        found = cv.method_class(method)
        if found is not None and found.plotting.style is not None:
            slot, darken, marker, ls = found.plotting.style
            if variant != method:  # "magnitude +FT", "lottery LRR": the method's colour, darker, and a
                i = others[method] = others.get(method, -1) + 1  # line of its own (the first one solid)
                darken += 0.35 if i % 2 == 0 else 0.15
                ls = _VARIANT_LINES[i % len(_VARIANT_LINES)]
        else:
            slot, darken, marker, ls = _SPARE[spare % len(_SPARE)], 0.3 * (spare // len(_SPARE)), "o", (0, (3, 1))
            spare += 1
        styles[variant] = Style(_darken(_palette()[slot], darken), marker, ls)
    return styles


def plain_log_axis(axis) -> None:
    """Log ticks as 1, 10, 100 rather than 10^0, 10^1, 10^2."""
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def panel_axes(n: int, panel_size=(4.8, 3.7), max_cols: int = 3):
    ncols = 2 if n == 4 else min(n, max_cols)  # 2 x 2 rather than 3 + 1
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(panel_size[0] * ncols + 2.2, panel_size[1] * nrows + 0.6))
    axes = list(grid.flat)
    for extra in axes[n:]:
        fig.delaxes(extra)
    return fig, axes[:n]


def legend_handle(style: Style, label: str) -> Line2D:
    return Line2D([], [], marker=style.marker, markersize=6, linewidth=1.8, label=label, **style.line_kwargs())

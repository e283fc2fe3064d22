"""matplotlib helpers shared by the report plots. matplotlib is a dependency; where it is missing anyway (an install
with --no-deps) ``pyplot`` returns None, no plot is written and none is claimed."""

from __future__ import annotations

import io
from pathlib import Path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig, path: Path) -> Path:
    """Render ``fig`` to PNG bytes, close it, and write them atomically to ``path``."""
    from .io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def value_axis(ax, values, axis: str = "y") -> None:
    """A log axis when ``values`` span more than a factor of 10 (a random gate's perplexity can be 100x dense),
    else a linear one, where ticks fall at round numbers; plain tick labels either way."""
    finite = [v for v in values if v is not None and v == v and v > 0]
    if finite and max(finite) / min(finite) > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    plain_ticks(ax, axis)


def plain_ticks(ax, axis: str = "y") -> None:
    """Tick labels as plain numbers (``43275``, ``1.05``), never ``4.3275×10⁴``: on a log axis spanning less
    than a decade matplotlib labels the minor ticks in scientific notation otherwise."""
    import math

    from matplotlib.ticker import FuncFormatter

    def plain(v: float, _=None) -> str:  # .4g alone writes 50000 as 5e+04
        return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"

    def minor(v: float, _) -> str:  # on a log axis: label 2x and 5x of each decade, not all eight minor ticks
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return plain(v) if lead in (2, 5) else ""

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(plain))
    target.set_minor_formatter(FuncFormatter(minor))

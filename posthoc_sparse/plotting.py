"""matplotlib helpers shared by the report plots (matplotlib is optional: without it no plot is written)."""

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

"""What the analyses share: loading a detection config, plain-text tables, matplotlib (Agg) figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..fileio import atomic_write

__all__ = ["format_table", "require_matplotlib", "save_figure"]

#: the one-line install hint when matplotlib is missing
MATPLOTLIB_HINT = "matplotlib is needed for plots; install it with: pip install 'detkit[plot]'"


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the Agg (file-only) backend.

    Raises:
        UsageError: matplotlib is not installed; the message says how to install it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(MATPLOTLIB_HINT) from None
    return plt


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Write matplotlib figure ``fig`` as a PNG to ``path`` atomically (folders created), then close it."""
    plt = require_matplotlib()
    try:
        with atomic_write(path, binary=True) as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """Plain-text table; ``align`` holds one of '<' or '>' per column (default: first left, rest right)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "<" + ">" * (len(header) - 1)
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(f"{c:{align[i]}{widths[i]}}" for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

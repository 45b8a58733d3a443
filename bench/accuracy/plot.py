"""Needle-in-a-haystack heatmaps (accuracy over depth x context length): matplotlib when it is installed,
else a plain PNG of coloured cells written here (no labels; the JSON holds the numbers)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Grid = Sequence[Sequence[float | None]]  # [depth][length], accuracy in [0, 1] or None (not run)


def heatmaps(panels: dict[str, Grid], depths: Sequence[float], lengths: Sequence[int], path: str | Path,
             title: str = "") -> str:
    """One panel per entry of `panels`; returns the backend used ("matplotlib" or "png")."""
    try:
        import matplotlib
    except ImportError:
        _write_png(panels, path)
        return "png"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    fig.subplots_adjust(wspace=0.3)
    for n, (ax, (name, grid)) in enumerate(zip(axes[0], panels.items(), strict=True)):
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        if n == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=10)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "matplotlib"


def _colour(v: float | None) -> tuple[int, int, int]:
    if v is None:
        return (200, 200, 200)
    v = min(1.0, max(0.0, v))
    return (int(255 * min(1.0, 2 - 2 * v)), int(255 * min(1.0, 2 * v)), 60)  # red -> yellow -> green


def _write_png(panels: dict[str, Grid], path: str | Path, cell: int = 24, gap: int = 12) -> None:
    grids = list(panels.values())
    rows = max(len(g) for g in grids)
    cols = [max((len(r) for r in g), default=0) for g in grids]
    width = sum(c * cell for c in cols) + gap * (len(grids) + 1)
    height = rows * cell + 2 * gap
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    x0 = gap
    for grid, ncol in zip(grids, cols, strict=True):
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                colour = _colour(v)
                for y in range(gap + i * cell + 1, gap + (i + 1) * cell):
                    pixels[y][x0 + j * cell + 1:x0 + (j + 1) * cell] = [colour] * (cell - 1)
        x0 += ncol * cell + gap
    raw = b"".join(b"\x00" + bytes(c for px in line for c in px) for line in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)

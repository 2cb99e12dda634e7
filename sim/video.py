"""Videos of rollouts with the instruction drawn on the frames, and the per-task bar chart.

Frames are upscaled (the env's static camera is small, 96x96 by default) and a caption band
above the image shows the current instruction and the chain's progress. GIFs are written
with Pillow through imageio; MP4 needs the optional ``imageio-ffmpeg`` package
(:func:`mp4_available`). Charts use matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

import importlib.util
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dreamrt.errors import UserError

VIDEO_FORMATS = ("gif", "mp4")
_BAND_BG = (24, 24, 24)
_TEXT = (235, 235, 235)
_DONE = (110, 220, 110)


def mp4_available() -> bool:
    """Whether imageio can write MP4 here (it needs the imageio-ffmpeg package)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def check_video_format(fmt: str) -> None:
    """A UserError for an unknown format, or for mp4 without imageio-ffmpeg."""
    if fmt not in VIDEO_FORMATS:
        raise UserError(f"Unknown video format {fmt!r}; expected one of {', '.join(VIDEO_FORMATS)}.")
    if fmt == "mp4" and not mp4_available():
        raise UserError(
            "video_format=mp4 needs the imageio-ffmpeg package, which is not installed. "
            "Install it (`pip install imageio-ffmpeg`) or use video_format=gif."
        )


def caption_frame(frame: np.ndarray, header: str, text: str, width: int, status: str = "") -> np.ndarray:
    """``frame`` (H, W, 3) uint8 scaled to ``width`` pixels wide under a caption band.

    The band has a fixed height, so all frames of a video match: ``header`` with ``status``
    right-aligned in green on the first line, then ``text`` (the instruction) wrapped onto at
    most two lines. Returns (band + H', W', 3) uint8 with both sides even, as encoders want.
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = frame.shape[:2]
    width += width % 2
    height = max(2, round(h * width / w))
    height += height % 2
    image = Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.Resampling.BILINEAR)
    font_size = max(10, width // 22)
    font = ImageFont.load_default(size=font_size)
    chars = max(10, int(width / (0.55 * font_size)))  # rough characters per line for this font
    lines = textwrap.wrap(text, chars, max_lines=2, placeholder=" ...") or [""]
    line_h = font_size + 4
    band = 6 + 3 * line_h
    band += band % 2
    canvas = Image.new("RGB", (width, band + height), _BAND_BG)
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), header, fill=_TEXT, font=font)
    if status:
        draw.text((width - 4, 3), status, fill=_DONE, font=font, anchor="ra")
    for i, line in enumerate(lines):
        draw.text((4, 3 + (i + 1) * line_h), line, fill=_TEXT, font=font)
    return np.asarray(canvas)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float, fmt: str = "gif") -> Path:
    """Write equally sized (H, W, 3) uint8 ``frames`` as a GIF or MP4 at ``fps``; returns the path."""
    import imageio.v3 as iio

    check_video_format(fmt)
    if not frames:
        raise UserError(f"No frames to write to {path}.")
    path = Path(path).with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = np.stack(frames)  # (T, H, W, 3)
    if fmt == "gif":
        # GIF frame delays are whole centiseconds; loop=0 repeats forever.
        iio.imwrite(path, stack, extension=".gif", duration=max(20, round(1000 / fps)), loop=0)
    else:
        iio.imwrite(path, stack, extension=".mp4", fps=fps, codec="libx264", macro_block_size=2)
    return path


def per_task_chart(
    path: str | Path, per_task: Mapping[str, float], attempts: Mapping[str, int], title: str
) -> Path:
    """A horizontal bar chart of per-task success rates (PNG), one bar per attempted task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(per_task)
    rates = [per_task[n] for n in names]
    fig = Figure(figsize=(8, 0.28 * max(len(names), 4) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    ax.barh(y, rates, color="#4c72b0")
    ax.set_yticks(y, [f"{n} ({attempts.get(n, 0)})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("success rate (attempts in brackets)")
    ax.set_title(title, fontsize=10)
    for yi, r in zip(y, rates):
        inside = r > 0.9  # no room right of a long bar: write inside it
        ax.text(
            r - 0.01 if inside else r + 0.01,
            yi,
            f"{r:.2f}",
            va="center",
            ha="right" if inside else "left",
            fontsize=7,
            color="white" if inside else "black",
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

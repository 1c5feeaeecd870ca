"""Learning curves of few-label fine-tuning as one PNG (Pillow), for ``ssl_benchmark.py`` and
``ssl_budget.py``: held-out Dice against fine-tuning step, mean over seeds, one line per arm, a row of
panels per K (the mean of the five scored organs, spleen, pancreas).

The scripts import this module as ``_curves`` (``python bench/<script>.py`` puts ``bench/`` on
``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")
COLOURS = [(90, 90, 90), (40, 110, 220), (230, 120, 30), (200, 40, 60), (140, 80, 200), (40, 160, 80)]


def curves(per_k: dict[str, dict[str, list[dict[str, Any]]]], path: Path, mark: int | None = None) -> bool:
    """The learning curves as a PNG (Pillow): held-out Dice against fine-tuning step, mean over seeds, one
    line per arm; a row of panels per K (the mean of the five organs, spleen, pancreas); ``mark``: a
    fine-tuning step to draw as a vertical line (the chosen budget). False when no run has curve points."""
    from PIL import Image, ImageDraw

    from lad_fast.preview.render import _font

    cols, w, h, pad = ("mean", "spleen", "pancreas"), 360, 240, 44
    arms = list(next(iter(per_k.values())))
    legend = 20 * ((len(arms) + 2) // 3) + 10
    img = Image.new("RGB", (w * len(cols), h * len(per_k) + legend), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font(11)
    drawn = False
    for row, (k, res) in enumerate(per_k.items()):
        for col, organ in enumerate(cols):
            x0, y0 = col * w + pad, row * h + 24
            x1, y1 = (col + 1) * w - 12, (row + 1) * h - 30
            title = "mean of 5 organs" if organ == "mean" else organ
            draw.text(
                (x0, y0 - 18),
                f"K = {k}: {title} (held-out Dice, mean over seeds)",
                fill=(20, 20, 20),
                font=font,
            )
            steps = sorted({p["step"] for runs in res.values() for r in runs for p in r["curve"]})
            if not steps:
                continue
            for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
                y = y1 - tick * (y1 - y0)
                draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
                draw.text((x0 - 30, y - 6), f"{tick:.2f}", fill=(90, 90, 90), font=font)
            draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
            span = max(steps[-1] - 0, 1)
            for s in (steps[0], steps[len(steps) // 2], steps[-1]):
                draw.text((x0 + s / span * (x1 - x0) - 8, y1 + 4), str(s), fill=(90, 90, 90), font=font)
            draw.text(((x0 + x1) // 2 - 40, y1 + 16), "fine-tuning step", fill=(90, 90, 90), font=font)
            if mark is not None and 0 < mark <= span:
                xm = x0 + mark / span * (x1 - x0)
                for ya in range(int(y0), int(y1), 8):  # dashed
                    draw.line([(xm, ya), (xm, min(ya + 4, y1))], fill=(160, 160, 160))
                draw.text((xm + 3, y0 + 3), f"budget {mark}", fill=(110, 110, 110), font=font)
            for i, runs in enumerate(res.values()):
                points = []
                for s in steps:
                    at = [next((p["dice"] for p in r["curve"] if p["step"] == s), None) for r in runs]
                    at = [d for d in at if d is not None]
                    if at:
                        y = sum(_curve_value(d, organ) for d in at) / len(at)
                        points.append((x0 + s / span * (x1 - x0), y1 - y * (y1 - y0)))
                if points:
                    draw.line(points, fill=COLOURS[i % len(COLOURS)], width=2)
                    for px, py in points:
                        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=COLOURS[i % len(COLOURS)])
                    drawn = True
    legend_y = h * len(per_k) + 4
    for i, arm in enumerate(arms):
        x, y = 20 + (i % 3) * w, legend_y + (i // 3) * 20
        draw.line([(x, y + 7), (x + 24, y + 7)], fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((x + 30, y), arm, fill=(20, 20, 20), font=font)
    if drawn:
        img.save(path)
    return drawn


def _curve_value(dice: dict[str, float], organ: str) -> float:
    if organ == "mean":
        return sum(dice.get(o, 0.0) for o in ORGANS) / len(ORGANS)
    return dice.get(organ, 0.0)

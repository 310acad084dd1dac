"""Draws the README's picture of the schedule family from guidance_core itself (Pillow only).

    python docs/make_schedule_picture.py            # writes docs/images/schedules.png

Each panel is one schedule over a 30-step run, values taken from the same code that samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guidance_core.schedules import Constant, Cosine, Custom, Linear  # noqa: E402

STEPS = 30
PANELS = [
    ("Constant(7)", Constant(7.0)),
    ("Linear(7 → 1)", Linear(7.0, 1.0)),
    ("Cosine (defaults: 7.5 → 0.15)", Cosine()),
    ("Cosine, warmup 0.2 from 1", Cosine(7.5, 1.0, warmup=0.2, warmup_init=1.0)),
    ("Cosine, 1.5 cycles", Cosine(7.5, 1.0, num_cycles=1.5)),
    ("Cosine, k_decay 0.5 / 1 / 3", [Cosine(7.5, 1.0, k_decay=k) for k in (0.5, 1.0, 3.0)]),
    ("Custom '7.5, 6, 4, 3'", Custom((7.5, 6.0, 4.0, 3.0))),
    ("T-Norm style: Cosine 0.25 → 0.05", Cosine(0.25, 0.05)),
]
COLORS = [(86, 156, 214), (220, 120, 80), (120, 190, 110)]
PANEL_W, PANEL_H, MARGIN, COLUMNS = 360, 220, 36, 4


def font(size: int):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def draw_panel(draw: ImageDraw.ImageDraw, left: int, top: int, title: str, schedules) -> None:
    schedules = schedules if isinstance(schedules, list) else [schedules]
    curves = [s.values(STEPS) for s in schedules]
    low = min(0.0, *(min(c) for c in curves))
    high = max(max(c) for c in curves) * 1.1 or 1.0
    x0, y0, x1, y1 = left + MARGIN, top + 30, left + PANEL_W - 12, top + PANEL_H - 26
    draw.rectangle((left + 4, top + 4, left + PANEL_W - 4, top + PANEL_H - 4), outline=(70, 70, 70), fill=(32, 32, 32))
    draw.text((left + 12, top + 10), title, fill=(230, 230, 230), font=font(14))
    draw.line((x0, y1, x1, y1), fill=(120, 120, 120))
    draw.line((x0, y0, x0, y1), fill=(120, 120, 120))
    for value in (low, high / 1.1):
        y = y1 - (value - low) / (high - low) * (y1 - y0)
        draw.text((left + 6, y - 7), f"{value:g}", fill=(160, 160, 160), font=font(11))
    draw.text((x1 - 60, y1 + 6), f"step {STEPS - 1}", fill=(160, 160, 160), font=font(11))
    for color, curve in zip(COLORS, curves, strict=False):
        points = [(x0 + i / (STEPS - 1) * (x1 - x0), y1 - (v - low) / (high - low) * (y1 - y0))
                  for i, v in enumerate(curve)]
        draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)


def main(out: Path = REPO / "docs" / "images" / "schedules.png") -> Path:
    rows = (len(PANELS) + COLUMNS - 1) // COLUMNS
    image = Image.new("RGB", (COLUMNS * PANEL_W, rows * PANEL_H), (24, 24, 24))
    draw = ImageDraw.Draw(image)
    for index, (title, schedule) in enumerate(PANELS):
        draw_panel(draw, (index % COLUMNS) * PANEL_W, (index // COLUMNS) * PANEL_H, title, schedule)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


if __name__ == "__main__":
    print(main())

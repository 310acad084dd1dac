"""Draws the pack's icon, docs/images/icon.png (the Comfy Registry's [tool.comfy] Icon): three prediction
arrows from one point, the guided one (the sum of the others' differences) drawn longest.

Run: python docs/make_icon.py (needs Pillow; ComfyUI's environment has it).
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256  # the registry shows icons square, at most 400 x 400
OUT = Path(__file__).parent / "images" / "icon.png"


def arrow(draw: ImageDraw.ImageDraw, start, end, colour, width):
    draw.line([start, end], fill=colour, width=width)
    (x0, y0), (x1, y1) = start, end
    length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    head = 3.2 * width
    left = (x1 - head * ux + 0.6 * head * uy, y1 - head * uy - 0.6 * head * ux)
    right = (x1 - head * ux - 0.6 * head * uy, y1 - head * uy + 0.6 * head * ux)
    draw.polygon([end, left, right], fill=colour)


def main() -> None:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([8, 8, SIZE - 8, SIZE - 8], radius=44, fill=(28, 32, 44, 255))
    origin = (60, 196)
    arrow(draw, origin, (118, 92), (120, 130, 150, 255), 10)   # uncond
    arrow(draw, origin, (168, 136), (90, 170, 230, 255), 10)   # cond
    arrow(draw, origin, (214, 52), (250, 190, 70, 255), 14)    # guided: further along cond - uncond
    OUT.parent.mkdir(parents=True, exist_ok=True)
    image.save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

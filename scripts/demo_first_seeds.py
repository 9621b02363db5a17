"""The first six seeds of "a photo of sks" per arm of a demo run, one labelled row each (docs/demo/sks-first-six-seeds.png).

    python scripts/demo_first_seeds.py DEMO_OUT docs/demo/sks-first-six-seeds.png

Crops the first row of each arm's grid (eval/ARM/plain/grid_ARM_00_a-photo-of-sks.png, six 128-px tiles).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

TILE, COLUMNS, LABEL_WIDTH = 128, 6, 130


def main(argv=None) -> int:
    demo_out, out = (Path(a) for a in (argv or sys.argv[1:]))
    report_arms = ["base"] + sorted(p.name for p in (demo_out / "eval").iterdir() if p.name != "base")
    order = [a for a in ("base", "standard", "offset", "control") if a in report_arms]
    canvas = Image.new("RGB", (LABEL_WIDTH + COLUMNS * TILE, len(order) * TILE), "white")
    draw = ImageDraw.Draw(canvas)
    for row, arm in enumerate(order):
        grid = Image.open(demo_out / "eval" / arm / "plain" / f"grid_{arm}_00_a-photo-of-sks.png").convert("RGB")
        canvas.paste(grid.crop((0, 0, COLUMNS * TILE, TILE)), (LABEL_WIDTH, row * TILE))
        draw.text((8, row * TILE + TILE // 2 - 6), arm, fill="black")
    canvas.save(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

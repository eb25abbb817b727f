"""Render a contact sheet of synthetic chest radiographs, each captioned with its view and planted findings.

    .venv/bin/python docs/make_contact_sheet.py [--out docs/img/synthetic_cxr_contact_sheet.png]
                                                [--size 256] [--seed 0]

The sheet is the visual check of carebench.data.synthetic.radiograph: every finding family appears at least
once, next to finding-free films in each view, so a reader can judge at a glance whether the renderer looks
like chest X-rays and whether each finding looks like what it is called.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from carebench.data.synthetic.radiograph import render_radiograph

# (view, findings) per tile; severities chosen to be clearly visible but not extreme.
TILES: list[tuple[str, dict[str, float]]] = [
    ("PA", {}),
    ("AP", {}),
    ("LATERAL", {}),
    ("PA", {"cardiomegaly": 0.9}),
    ("PA", {"consolidation_right": 0.7}),
    ("AP", {"consolidation_left": 0.8}),
    ("PA", {"effusion_right": 0.6}),
    ("AP", {"effusion_left": 0.7}),
    ("AP", {"edema": 0.8, "cardiomegaly": 0.5}),
    ("PA", {"atelectasis": 0.9}),
    ("PA", {"pneumothorax": 0.7}),
    ("AP", {"ett": 1.0, "central_line": 1.0}),
    ("PA", {"pacemaker": 1.0, "cardiomegaly": 0.4}),
    ("AP", {"ett": 1.0, "central_line": 1.0, "edema": 0.6, "effusion_left": 0.4, "effusion_right": 0.4}),
    ("PA", {"body_size": 1.0, "exposure": 0.25}),
    ("LATERAL", {"cardiomegaly": 0.8, "effusion_left": 0.6}),
]
COLUMNS = 4


def caption(view: str, findings: dict[str, float]) -> str:
    shown = [f"{k.replace('_', ' ')} {v:.1f}" for k, v in findings.items()]
    return f"{view}: " + (", ".join(shown) if shown else "no findings")


def contact_sheet(size: int, seed: int) -> Image.Image:
    font = ImageFont.load_default(size=max(10, size // 18))
    line_h = int(font.size * 1.3)
    cap_h = 2 * line_h + 6
    rows = (len(TILES) + COLUMNS - 1) // COLUMNS
    sheet = Image.new("L", (COLUMNS * size, rows * (size + cap_h)), color=255)
    draw = ImageDraw.Draw(sheet)
    for i, (view, findings) in enumerate(TILES):
        img = render_radiograph(np.random.default_rng([seed, i]), findings, size, view)
        x, y = (i % COLUMNS) * size, (i // COLUMNS) * (size + cap_h)
        sheet.paste(Image.fromarray(img), (x, y))
        words, lines = caption(view, findings).split(" "), [""]
        for w in words:  # wrap to the tile width, at most two lines
            trial = f"{lines[-1]} {w}".strip()
            if draw.textlength(trial, font=font) > size - 8 and lines[-1]:
                lines.append(w)
            else:
                lines[-1] = trial
        for k, text in enumerate(lines[:2]):
            draw.text((x + 4, y + size + 3 + k * line_h), text, fill=0, font=font)
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "img" / "synthetic_cxr_contact_sheet.png"
    )
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sheet = contact_sheet(args.size, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=args.out.parent)  # write whole, then rename
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG", optimize=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()

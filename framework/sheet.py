"""Contact sheets: a labelled grid of images (used by `diffstage sheet`, reusable by sweep reports)."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int | None = None,
                  cell: int | None = None, label_height: int = 14, pad: int = 4) -> Image.Image:
    """Lay `images` out row by row, each scaled to fit a `cell`-pixel square (nearest neighbour,
    so small images stay crisp; aspect ratio kept) with its label underneath."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    labels = list(labels) if labels is not None else [""] * len(images)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    columns = columns or min(len(images), 10)
    rows = -(-len(images) // columns)
    cell = cell or max(96, max(max(im.size) for im in images))
    font = ImageFont.load_default()
    width = columns * (cell + pad) + pad
    height = rows * (cell + label_height + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell + pad), pad + r * (cell + label_height + pad)
        scale = cell / max(image.size)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        sheet.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (x + (cell - w) // 2, y + (cell - h) // 2))
        text = label if draw.textlength(label, font=font) <= cell else label[: max(1, cell // 7)] + "…"
        draw.text((x + cell / 2, y + cell + 1), text, fill="black", font=font, anchor="ma")
    return sheet

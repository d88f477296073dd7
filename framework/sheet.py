"""Contact sheets: a labelled grid of images (used by `diffstage sheet`, reusable by sweep reports)."""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MAX_LABEL = 200  # characters measured at most: a 100,000-character prompt is clipped long before it is drawn
LINE_BREAKS = ("\r\n", "\n", "\r", "\x85", "\u2028", "\u2029")


def label_text(label: str) -> str:
    """`label` as one line of plain text: line breaks shown as "⏎", tabs as spaces, other control and format
    characters (bell, right-to-left overrides, zero-width marks) as "�", so a prompt is drawn as what it says
    and cannot reorder or break the line it is drawn on."""
    text = str(label)[: MAX_LABEL * 2]
    for brk in LINE_BREAKS:
        text = text.replace(brk, "⏎")
    text = text.replace("\t", " ")
    return "".join("�" if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in text)


def fitted(text: str, width: float, measure, ellipsis: str = "…") -> str:
    """`text` clipped with `ellipsis` to fit `width` as `measure` measures it."""
    cut, text = len(text) > MAX_LABEL, text[:MAX_LABEL]
    if not cut and measure(text) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with its ellipsis
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if measure(text[:mid] + ellipsis) <= width else (low, mid - 1)
    return text[:low] + ellipsis


def _drawable(text: str, draw: ImageDraw.ImageDraw, font) -> tuple[str, str]:
    """`text` and the ellipsis to clip it with; their Latin-1 approximations where the font is Pillow's bitmap
    font (Pillow without FreeType), which has no other characters."""
    try:
        draw.textlength(text + "…", font=font)
        return text, "…"
    except UnicodeEncodeError:
        return text.encode("latin-1", "replace").decode("latin-1"), "..."


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
        text, ellipsis = _drawable(label_text(label), draw, font)
        text = fitted(text, cell, lambda t: draw.textlength(t, font=font), ellipsis)
        draw.text((x + cell / 2, y + cell + 1), text, fill="black", font=font, anchor="ma")
    return sheet

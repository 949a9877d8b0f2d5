"""The strength sweep as one labelled picture: strengths across, checkpoints down, each tile with its checkpoint and
strength written under it, gaps between tiles; and which tile a click on the picture falls on. PIL only (no torch),
so the UI can use the layout."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SWEEP_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
GAP = 8  # pixels between tiles and around the grid
BACKGROUND = (38, 38, 42)  # dark, so gaps show between white-ground and dark images alike
TEXT = (236, 236, 236)
MIN_FONT = 11
MIN_TILE, MAX_TILE = 128, 512  # tile width in the grid: small images are enlarged so their labels fit; large ones
# shrunk, so a grid of 1024 px Flux/SDXL images stays a picture a browser shows and downloads quickly


@dataclass(frozen=True)
class GridLayout:
    """Where each tile of a sweep grid lies; row r, column c is checkpoint `rows[r]` at `strengths[c]`."""
    rows: tuple[str, ...]
    strengths: tuple[float, ...]
    tile: tuple[int, int]  # a tile's image size in the grid
    band: int  # height of the label band under each tile
    gap: int = GAP

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.tile
        return (self.gap + len(self.strengths) * (width + self.gap),
                self.gap + len(self.rows) * (height + self.band + self.gap))

    def tile_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """The tile's image as (left, top, right, bottom)."""
        left, top = self._origin(row, column)
        return left, top, left + self.tile[0], top + self.tile[1]

    def label_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        left, top = self._origin(row, column)
        return left, top + self.tile[1], left + self.tile[0], top + self.tile[1] + self.band

    def tile_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, column) of the tile whose image or label holds the point; None in a gap or outside."""
        width, height = self.tile[0] + self.gap, self.tile[1] + self.band + self.gap
        column, across = divmod(int(x) - self.gap, width)
        row, down = divmod(int(y) - self.gap, height)
        inside = 0 <= column < len(self.strengths) and 0 <= row < len(self.rows)
        return (row, column) if inside and across < self.tile[0] and down < height - self.gap else None

    def label(self, row: int, column: int) -> tuple[str, str]:
        return self.rows[row], strength_label(self.strengths[column])

    def _origin(self, row: int, column: int) -> tuple[int, int]:
        return (self.gap + column * (self.tile[0] + self.gap),
                self.gap + row * (self.tile[1] + self.band + self.gap))


def draw_grid(tiles: list[list[Image.Image]], rows: list[str],
              strengths: tuple[float, ...]) -> tuple[Image.Image, GridLayout]:
    """`tiles[r][c]`: checkpoint `rows[r]` at `strengths[c]` (all one size) → the labelled grid and its layout."""
    tile = _tile_size(tiles[0][0].size)
    font = _font(tile[0], [*rows, *map(strength_label, strengths)])
    line = font.getbbox("Hg0")[3]
    pad = line // 4 + 1
    layout = GridLayout(tuple(rows), tuple(strengths), tile, band=2 * line + 3 * pad)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(tiles):
        for c, image in enumerate(row):
            sheet.paste(_fit(image.convert("RGB"), tile), layout.tile_box(r, c)[:2])
            left, top, right, _ = layout.label_box(r, c)
            for i, text in enumerate(layout.label(r, c)):
                draw.text(((left + right) / 2, top + pad + i * (line + pad)), text, fill=TEXT, font=font, anchor="mt")
    return sheet, layout


def strength_label(strength: float) -> str:
    return f"strength {strength:g}"


def _tile_size(size: tuple[int, int]) -> tuple[int, int]:
    """Enlarged by a whole factor up to MIN_TILE (pixels stay sharp), or shrunk to MAX_TILE, keeping the aspect."""
    width, height = size
    if width < MIN_TILE:
        factor = -(-MIN_TILE // width)
        return width * factor, height * factor
    if width > MAX_TILE:
        return MAX_TILE, max(1, round(height * MAX_TILE / width))
    return width, height


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.NEAREST if size[0] > image.width else Image.Resampling.LANCZOS)


def _font(width: int, texts: list[str]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, 1/16 of the tile wide, smaller while the longest label does not fit the tile."""
    for size in range(max(MIN_FONT, width // 16), MIN_FONT - 1, -1):
        font = ImageFont.load_default(size)
        if max(font.getlength(text) for text in texts) <= width - 4:
            break
    return font

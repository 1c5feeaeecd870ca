"""PNG previews of CT volumes: three orthogonal slices with coloured mask outlines (Pillow only).

Arrays are canonical ``(D, H, W)`` = (superior, anterior, patient's right). Panels follow the
radiological display convention: axial with anterior up and the patient's right on the viewer's left,
coronal with superior up and the patient's right on the left, sagittal with superior up and anterior
on the left. Pixels are resampled so that one screen pixel covers the same millimetres on both axes.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lad_fast.preview.inputs import CANONICAL_NAMES, TOTALSEG_NAMES  # noqa: F401 (re-exported)

# One colour per canonical organ, whatever vocabulary a mask uses (a TotalSegmentator, AbdomenCT-1K,
# Lad or canonical id is coloured by the organ it names). Saturated, far apart (RGB distance >= 90) and
# none grey, so that outlines stand out on CT and from each other; bone is bright, vertebrae brown.
ORGAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "liver": (230, 40, 40),
    "spleen": (40, 110, 255),
    "kidney_right": (255, 225, 0),
    "kidney_left": (255, 135, 0),
    "pancreas": (0, 235, 235),
    "pancreatic_lesion": (255, 0, 255),
    "stomach": (150, 80, 255),
    "gallbladder": (0, 190, 60),
    "aorta": (255, 150, 200),
    "inferior_vena_cava": (160, 255, 120),
    "vertebrae": (150, 90, 40),
}
PANEL_PX = 384  # the longest side of the axial panel, in pixels
BG = (0, 0, 0)
TEXT = (235, 235, 235)


def organ_of(name: str) -> str | None:
    """The canonical organ a vocabulary's label name stands for (``vertebrae_L1`` -> ``vertebrae``)."""
    if name in ORGAN_COLOURS:
        return name
    if name == "sacrum" or name.startswith("vertebrae"):
        return "vertebrae"
    if name in ("kidney", "kidneys"):  # AbdomenCT-1K's one label for both sides
        return "kidney_right"
    return None


def label_colour(label: int, name: str | None = None) -> tuple[int, int, int]:
    """The outline colour of ``label``: its organ's (``name`` given; without it the id is taken as a
    canonical id, what every mask lad-fast writes holds), else a hue hashed from the id."""
    organ = organ_of(name) if name is not None else CANONICAL_NAMES.get(label)
    if organ in ORGAN_COLOURS:
        return ORGAN_COLOURS[organ]  # type: ignore[index]
    hue = (label * 0.61803398875) % 1.0  # golden-ratio hues spread neighbouring ids apart
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_grey(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"window {window} must have low < high")
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _panel(
    img2d: np.ndarray,
    lab2d: np.ndarray | None,
    row_mm: float,
    col_mm: float,
    mm_per_px: float,
    names: dict[int, str] | None = None,
) -> Image.Image:
    """Greyscale slice (already display-oriented, uint8) resized to square pixels, outlines drawn on top."""
    rows = max(1, round(img2d.shape[0] * row_mm / mm_per_px))
    cols = max(1, round(img2d.shape[1] * col_mm / mm_per_px))
    grey = Image.fromarray(img2d).resize((cols, rows), Image.BILINEAR).convert("RGB")
    if lab2d is None or not lab2d.any():
        return grey
    big = np.asarray(Image.fromarray(lab2d.astype(np.int32)).resize((cols, rows), Image.NEAREST))
    # A pixel is on an outline when a 4-neighbour has another label.
    edge = np.zeros(big.shape, bool)
    edge[1:, :] |= big[1:, :] != big[:-1, :]
    edge[:-1, :] |= big[:-1, :] != big[1:, :]
    edge[:, 1:] |= big[:, 1:] != big[:, :-1]
    edge[:, :-1] |= big[:, :-1] != big[:, 1:]
    edge &= big > 0
    rgb = np.asarray(grey).copy()
    for label in np.unique(big[edge]):
        rgb[edge & (big == label)] = label_colour(int(label), (names or {}).get(int(label)))
    return Image.fromarray(rgb)


def _centre(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if mask is not None and mask.any():
        c = np.argwhere(mask > 0).mean(axis=0)
        return int(round(c[0])), int(round(c[1])), int(round(c[2]))
    return shape[0] // 2, shape[1] // 2, shape[2] // 2


def render_slices(
    hu: np.ndarray,
    mask: np.ndarray | None,
    spacing: tuple[float, float, float],
    window: tuple[float, float] = (-160, 240),
    title: str | None = None,
    names: dict[int, str] | None = None,
) -> Image.Image:
    """Axial, coronal and sagittal slices side by side, with mask outlines and a legend.

    ``hu`` and ``mask`` are ``(D, H, W)`` canonical; ``spacing`` is mm along (D, H, W). The slices pass
    through the centroid of the mask's foreground (the volume centre without a mask). ``names`` maps
    label ids to legend text (default: ``label <id>``) and picks each outline's organ colour (default:
    ids are canonical).
    """
    if hu.ndim != 3:
        raise ValueError(f"render_slices needs a 3D (D, H, W) volume, got shape {hu.shape}")
    if mask is not None and mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {hu.shape}")
    sd, sh, sw = spacing
    d, h, w = _centre(mask, hu.shape)
    grey = _to_grey(hu, window)
    mm_per_px = max(hu.shape[1] * sh, hu.shape[2] * sw) / PANEL_PX

    def lab(sl: tuple) -> np.ndarray | None:
        return None if mask is None else mask[sl]

    # Display orientation: flip H (anterior up / left) and W (patient's right on the left), D (superior up).
    nm = names
    panels = [
        ("axial", _panel(grey[d, ::-1, ::-1], _flip(lab((d,)), (0, 1)), sh, sw, mm_per_px, nm)),
        ("coronal", _panel(grey[::-1, h, ::-1], _flip(lab((slice(None), h)), (0, 1)), sd, sw, mm_per_px, nm)),
        ("sagittal", _panel(grey[::-1, ::-1, w], _flip(lab((Ellipsis, w)), (0, 1)), sd, sh, mm_per_px, nm)),
    ]
    present = [] if mask is None else [int(v) for v in np.unique(mask) if v != 0]
    font = _font(12)
    pad, label_h = 6, 17
    top = pad + (18 if title else 0)
    axial, coronal, sagittal = (p for _, p in panels)
    # Thin slabs (few slices) stack coronal over sagittal beside the axial panel instead of in a row.
    stacked = coronal.height + sagittal.height + label_h <= axial.height
    if stacked:
        right = axial.width + 2 * pad
        spots = [(pad, top), (right, top), (right, top + coronal.height + label_h)]
        width = right + max(coronal.width, sagittal.width) + pad
        body_h = axial.height
    else:
        xs = np.cumsum([pad] + [p.width + pad for _, p in panels])
        spots = [(int(x0), top) for x0 in xs[:3]]
        width = int(xs[3])
        body_h = max(p.height for _, p in panels)
    cols = 4
    legend_rows = (len(present) + cols - 1) // cols
    height = top + label_h + body_h + pad + legend_rows * 16 + (pad if present else 0)
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill=TEXT, font=font)
    for (name, panel), (x0, y0) in zip(panels, spots, strict=True):
        draw.text((x0, y0), name, fill=TEXT, font=font)
        canvas.paste(panel, (x0, y0 + label_h))
    y_leg = top + label_h + body_h + pad
    col_w = (width - pad) // cols
    names = names or {}
    counts: dict[str, int] = {}
    for label in present:
        counts[names.get(label, "")] = counts.get(names.get(label, ""), 0) + 1
    for i, label in enumerate(present):
        lx, ly = pad + (i % cols) * col_w, y_leg + (i // cols) * 16
        draw.rectangle((lx, ly + 3, lx + 10, ly + 13), fill=label_colour(label, names.get(label)))
        text = names.get(label, "")
        # Several ids sharing one name (vertebral levels) keep their id so the legend stays readable.
        text = f"label {label}" if not text else (f"{text} {label}" if counts[text] > 1 else text)
        draw.text((lx + 14, ly), text, fill=TEXT, font=font)
    return canvas


def _flip(a: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray | None:
    return None if a is None else np.flip(a, axes)


def render_grid(
    rows: list[list[np.ndarray]],
    labels: list[str] | None = None,
    window: tuple[float, float] = (-160, 240),
    spacing: tuple[float, float] = (1.0, 1.0),
) -> Image.Image:
    """Axial slices side by side, one row per entry of ``rows`` (e.g. input, reconstruction).

    Each item is an axial slice ``(H, W)`` or a volume ``(D, H, W)`` (its middle slice is shown), in the
    units ``window`` clips (HU, or [-1, 1] for prepared data). ``spacing`` is mm along (H, W).
    """
    if not rows or not all(rows):
        raise ValueError("render_grid needs at least one row with at least one slice")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"render_grid got {len(labels)} labels for {len(rows)} rows")
    slices = [[a[a.shape[0] // 2] if a.ndim == 3 else a for a in row] for row in rows]
    for row in slices:
        for a in row:
            if a.ndim != 2:
                raise ValueError(f"render_grid items must be (H, W) or (D, H, W), got shape {a.shape}")
    mm_per_px = max(max(a.shape[0] * spacing[0], a.shape[1] * spacing[1]) for r in slices for a in r) / 192
    tiles = [[_panel(_to_grey(a, window)[::-1, ::-1], None, *spacing, mm_per_px) for a in r] for r in slices]
    font = _font(12)
    pad, left = 4, (90 if labels else 0)
    tile_w = max(t.width for r in tiles for t in r)
    tile_h = max(t.height for r in tiles for t in r)
    ncol = max(len(r) for r in tiles)
    canvas = Image.new("RGB", (left + ncol * (tile_w + pad) + pad, len(tiles) * (tile_h + pad) + pad), BG)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(tiles):
        y = pad + i * (tile_h + pad)
        if labels:
            draw.text((pad, y + tile_h // 2 - 6), labels[i], fill=TEXT, font=font)
        for j, tile in enumerate(row):
            canvas.paste(tile, (left + pad + j * (tile_w + pad), y))
    return canvas


def tile_grid(tiles: list[Image.Image], columns: int = 2) -> Image.Image:
    """Tiles (one per volume, from :func:`render_slices`) in rows of ``columns``, top-left aligned."""
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    cols = max(1, min(columns, len(tiles)))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    canvas = Image.new("RGB", (cols * w, ((len(tiles) + cols - 1) // cols) * h), BG)
    for k, tile in enumerate(tiles):
        canvas.paste(tile, ((k % cols) * w, (k // cols) * h))
    return canvas


def write_preview(
    sources: Path | str | list[Path | str],
    out: Path | None = None,
    mask: Path | None = None,
    names: dict[int, str] | None = None,
    cases: list[str] | tuple[str, ...] = (),
    n: int | None = None,
    columns: int = 2,
    vocabulary: str | None = None,
) -> Path:
    """Render volumes side by side into one PNG; returns its path.

    sources: NIfTI files or DICOM folders (``mask`` outlines a single one), a generated dataset folder
    (its first ``n`` volumes with their masks), a prepared dataset (``cases`` by id, else its first ``n``)
    or a prepared case folder ``PREPARED/cases/<id>`` (see :func:`lad_fast.preview.inputs.preview_items`).
    Legend names come from the dataset (``dataset.json`` labels, the canonical organs of a prepared
    dataset; for ``mask``, ``vocabulary`` or what :func:`lad_fast.preview.inputs.raw_mask_vocabulary`
    reads from it) unless ``names`` is given; colours follow the organ.
    out: the PNG (default: in the current folder, ``<source name>.png`` or ``preview.png`` for several);
    never inside a generated dataset's ``images/`` or ``masks/``.
    """
    import io as _io

    from lad_fast.preview.inputs import check_output, default_output, preview_items
    from lad_fast.utils.atomic import write_bytes

    src = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(x) for x in sources]
    items = preview_items(src, mask=mask, cases=cases, n=n, vocabulary=vocabulary)
    out = Path(out) if out is not None else default_output(src, items)
    check_output(out)
    tiles = [render_slices(i.hu, i.mask, i.spacing, title=i.title, names=names or i.names) for i in items]
    buf = _io.BytesIO()
    tile_grid(tiles, columns).save(buf, format="PNG")
    write_bytes(out, buf.getvalue())
    return out

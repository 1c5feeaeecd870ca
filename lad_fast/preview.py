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

# Fixed colours for the organs lad-fast cares about (TotalSegmentator v2 ids); others get a hashed hue.
ORGAN_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (80, 160, 255),  # spleen
    2: (255, 200, 0),  # kidney_right
    3: (255, 140, 0),  # kidney_left
    4: (0, 230, 120),  # gallbladder
    5: (230, 60, 60),  # liver
    6: (200, 110, 255),  # stomach
    7: (0, 255, 255),  # pancreas
    52: (255, 80, 200),  # aorta
    63: (120, 120, 255),  # inferior_vena_cava
}
# TotalSegmentator v2 vertebra ids 27..50 run from L5 up to C1.
_LEVELS = (
    [f"L{i}" for i in range(5, 0, -1)]
    + [f"T{i}" for i in range(12, 0, -1)]
    + [f"C{i}" for i in range(7, 0, -1)]
)
TOTALSEG_NAMES: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
    7: "pancreas", 52: "aorta", 63: "inferior_vena_cava", 25: "sacrum", 26: "vertebrae_S1",
    **{27 + i: f"vertebrae_{lv}" for i, lv in enumerate(_LEVELS)},
}  # fmt: skip
PANEL_PX = 384  # the longest side of the axial panel, in pixels
BG = (0, 0, 0)
TEXT = (235, 235, 235)


def label_colour(label: int) -> tuple[int, int, int]:
    if label in ORGAN_COLOURS:
        return ORGAN_COLOURS[label]
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
    img2d: np.ndarray, lab2d: np.ndarray | None, row_mm: float, col_mm: float, mm_per_px: float
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
        rgb[edge & (big == label)] = label_colour(int(label))
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
    label ids to legend text (default: ``label <id>``).
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
    panels = [
        ("axial", _panel(grey[d, ::-1, ::-1], _flip(lab((d,)), (0, 1)), sh, sw, mm_per_px)),
        ("coronal", _panel(grey[::-1, h, ::-1], _flip(lab((slice(None), h)), (0, 1)), sd, sw, mm_per_px)),
        ("sagittal", _panel(grey[::-1, ::-1, w], _flip(lab((Ellipsis, w)), (0, 1)), sd, sh, mm_per_px)),
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
        draw.rectangle((lx, ly + 3, lx + 10, ly + 13), fill=label_colour(label))
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


def _names_for(mask_path: Path | None) -> dict[int, str] | None:
    """Legend names when the mask's dataset says its vocabulary (``labels.json`` beside ``masks/``)."""
    import json

    from lad_fast.data.labels import VOCABULARIES

    if mask_path is None:
        return None
    for folder in (mask_path.parent, mask_path.parent.parent):
        meta = folder / "labels.json"
        if meta.is_file():
            try:
                vocab = json.loads(meta.read_text()).get("vocabulary")
            except (OSError, ValueError, AttributeError):
                return None
            if vocab == "totalseg":
                return dict(TOTALSEG_NAMES)
            return dict(VOCABULARIES.get(vocab, {})) or None
    return None


def write_preview(
    image: Path, out: Path | None = None, mask: Path | None = None, names: dict[int, str] | None = None
) -> Path:
    """Render a NIfTI file or DICOM folder (and an optional label map) to a PNG; returns its path.

    The default ``out`` is beside the image: ``<name>.png`` (``ct.nii.gz`` -> ``ct.png``).
    """
    import io as _io

    from lad_fast.atomic import write_bytes
    from lad_fast.data.geometry import canonical_dhw
    from lad_fast.data.io import read_image, read_labels

    image = Path(image)
    vol = read_image(image)
    hu, affine = canonical_dhw(vol)
    spacing = tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    lab = None
    if mask is not None:
        lab, _ = canonical_dhw(read_labels(Path(mask)))
        if lab.shape != hu.shape:
            from lad_fast.errors import InputError

            raise InputError(f"{mask}: mask shape {lab.shape} differs from image {image} shape {hu.shape}")
    if out is None:
        stem = image.name
        for ext in (".nii.gz", ".nii"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
        out = image.parent / f"{stem}.png" if image.is_file() else image.parent / f"{image.name}.png"
    names = names or _names_for(None if mask is None else Path(mask))
    pic = render_slices(np.asarray(hu, np.float32), lab, spacing, title=image.name, names=names)  # type: ignore[arg-type]
    buf = _io.BytesIO()
    pic.save(buf, format="PNG")
    write_bytes(out, buf.getvalue())
    return Path(out)

"""Showing an evaluation report: rich tables on the terminal and a PNG panel (Pillow only).

The panel has per-organ Dice bars (synthetic vs its conditioning masks, the shuffled baseline, the real
ceiling) on the left and per-organ HU histograms (real vs synthetic) on the right.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from lad_fast.preview.render import _font

SYN, SHUF, REAL = (70, 140, 230), (150, 150, 150), (60, 180, 90)
INK, GRID, PAPER = (20, 20, 20), (220, 220, 220), (255, 255, 255)


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def tables(report: dict[str, Any]) -> list[Any]:
    """The report as rich Tables (realism with its two reference rows, fidelity and HU per organ), then
    one line each for mask metrics that were skipped and for a segmenter too weak to score masks."""
    fid = report["fidelity"]
    notes = [f"warning: {fid['warning']}"] if fid.get("warning") else []
    if fid.get("skipped"):
        notes.append(fid["skipped"])
    return [_realism_table(report), _organ_table(report), *notes]


def _realism_table(report: dict[str, Any]) -> Any:
    """FID and MMD of the synthetic volumes with the real-vs-real floor and the trivial ceiling; the
    diversity in the caption."""
    from rich.table import Table

    realism = Table(title=f"Realism ({report['features']['extractor']} features)", title_justify="left")
    for col in ("", "FID", "MMD linear", "MMD gaussian", "volumes"):
        realism.add_column(col, justify="left" if not col else "right")
    rows = [
        ("synthetic vs real", report["realism"]),
        ("floor: real vs real (halves)", report["references"]["real_vs_real"]),
        ("ceiling: trivial (mean + noise)", report["references"]["trivial"]),
    ]
    for name, r in rows:
        vols = "/".join(str(n) for n in r.get("volumes", [])) or r.get("skipped", "-")
        realism.add_row(
            name, _f(r.get("fid")), _f(r.get("mmd_linear"), 5), _f(r.get("mmd_gaussian"), 5), vols
        )
    div = report["diversity"]
    realism.caption = (
        f"diversity (mean pairwise MS-SSIM, lower is more diverse): synthetic {_f(div['synthetic'])}, "
        f"real {_f(div['real'])}"
    )
    realism.caption_justify = "left"
    return realism


def _organ_table(report: dict[str, Any]) -> Any:
    """Per organ: Dice and volume error against the conditioning masks, the shuffled baseline, the real
    ceiling, and HU inside the masks; the mean and the structure L1 below."""
    from rich.table import Table

    fid = report["fidelity"]
    syn, shuf, real = fid.get("synthetic", {}), fid.get("shuffled", {}), fid.get("real", {})
    hu = report["intensity"]
    organs = Table(title="Mask fidelity and intensity per organ", title_justify="left")
    heads = (
        "organ",
        "Dice",
        "shuffled",
        "real ceiling",
        "vol. err",
        "vol. err shuffled",
        "HU real",
        "HU synthetic",
    )
    for col in heads:
        organs.add_column(col, justify="left" if col == "organ" else "right")

    def hu_cell(stats: dict | None) -> str:
        return "-" if not stats else f"{stats['median']:.0f} [{stats['iqr']:.0f}]"

    for organ in fid["organs"]:
        organs.add_row(
            organ,
            _f(syn.get("dice", {}).get(organ)),
            _f(shuf.get("dice", {}).get(organ)),
            _f(real.get("dice", {}).get(organ)),
            _f(syn.get("volume_error", {}).get(organ)),
            _f(shuf.get("volume_error", {}).get(organ)),
            hu_cell(hu["real"].get(organ)),
            hu_cell(hu["synthetic"].get(organ)),
        )
    organs.add_row(
        "mean",
        _f(syn.get("mean_dice")),
        _f(shuf.get("mean_dice")),
        _f(real.get("mean_dice")),
        _f(syn.get("mean_volume_error")),
        _f(shuf.get("mean_volume_error")),
        "",
        "",
        end_section=True,
    )
    organs.add_row(
        "structure L1",
        _f(syn.get("structure_l1")),
        _f(shuf.get("structure_l1")),
        _f(real.get("structure_l1")),
    )
    ceiling = f" (not available: {real['skipped']})" if "skipped" in real else ""
    masks = report.get("segmentations") or {}
    by = (
        f"external segmentations ({masks['source']})"
        if masks.get("source") not in (None, "segmenter")
        else ""
    )
    organs.caption = (
        f"Dice and volume error of the segmented synthetic volumes{' by ' + by if by else ''} against their "
        "conditioning masks; shuffled: against another volume's mask; real ceiling: the segmenter on real "
        f"volumes vs their labels{ceiling}. HU: median [IQR] inside the {hu['real_masks']} (real) and "
        f"{hu['synthetic_masks']} (synthetic) masks."
    )
    organs.caption_justify = "left"
    return organs


# --------------------------------------------------------------------------------------------- the panel


def _dice_chart(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], report: dict[str, Any]) -> None:
    x0, y0, x1, y1 = box
    fid = report["fidelity"]
    organs = fid["organs"]
    series = [
        ("synthetic vs condition", SYN, fid.get("synthetic", {}).get("dice", {})),
        ("shuffled baseline", SHUF, fid.get("shuffled", {}).get("dice", {})),
        (
            "real ceiling" + (" (n/a)" if "skipped" in fid.get("real", {}) else ""),
            REAL,
            fid.get("real", {}).get("dice", {}),
        ),
    ]
    font, small = _font(14), _font(11)
    draw.text((x0, y0), "Dice per organ", fill=INK, font=font)
    if fid.get("skipped"):  # no segmenter: say so where the bars would be
        draw.text((x0 + 130, y0 + 2), "skipped: no segmenter (see the report)", fill=INK, font=small)
    top, bottom, left = y0 + 50, y1 - 60, x0 + 36
    for k, (name, colour, _) in enumerate(series):  # legend
        lx = x0 + k * 150
        draw.rectangle((lx, y0 + 24, lx + 10, y0 + 34), fill=colour)
        draw.text((lx + 14, y0 + 22), name, fill=INK, font=small)
    for tick in range(0, 11, 2):
        y = bottom - (bottom - top) * tick / 10
        draw.line((left, y, x1, y), fill=GRID)
        draw.text((x0, y - 6), f"{tick / 10:.1f}", fill=INK, font=small)
    if not organs:
        return
    group = (x1 - left) / len(organs)
    bar = max(3.0, group * 0.8 / len(series))
    for i, organ in enumerate(organs):
        gx = left + i * group + group * 0.1
        for k, (_, colour, values) in enumerate(series):
            v = values.get(organ)
            if v is None:
                continue
            bx = gx + k * bar
            draw.rectangle((bx, bottom - (bottom - top) * v, bx + bar - 1, bottom), fill=colour)
        label = organ.replace("kidney_", "kid. ").replace("inferior_vena_cava", "IVC").replace("_", " ")
        draw.text((gx, bottom + 6 + 14 * (i % 2)), label, fill=INK, font=small)
    draw.line((left, bottom, x1, bottom), fill=INK)


def _histogram(draw: ImageDraw.ImageDraw, box, title: str, edges: list[float], real, syn) -> None:
    x0, y0, x1, y1 = box
    small = _font(11)
    draw.text((x0, y0), title, fill=INK, font=small)
    top, bottom = y0 + 16, y1 - 16
    draw.rectangle((x0, top, x1, bottom), outline=GRID)
    draw.text((x0, bottom + 2), f"{edges[0]:.0f}", fill=INK, font=small)
    draw.text((x1 - 28, bottom + 2), f"{edges[-1]:.0f} HU", fill=INK, font=small)
    peak = max(max(real or [0]), max(syn or [0]), 1e-9)
    for values, colour in ((real, REAL), (syn, SYN)):
        if not values:
            continue
        n = len(values)
        pts = [
            (x0 + (x1 - x0) * (j + 0.5) / n, bottom - (bottom - top - 2) * v / peak)
            for j, v in enumerate(values)
        ]
        draw.line(pts, fill=colour, width=2)


def render_panel(report: dict[str, Any]) -> Image.Image:
    """The report's PNG panel: Dice bars (left) and HU histograms real vs synthetic (right)."""
    width, height = 1280, 520
    img = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(img)
    r, ref = report["realism"], report["references"]
    title = (
        f"lad-fast evaluate: {report['synthetic']['volumes']} synthetic vs {report['real']['volumes']} real, "
        f"{report['features']['extractor']} features. FID {_f(r['fid'])} "
        f"(floor {_f(ref['real_vs_real'].get('fid'))}, ceiling {_f(ref['trivial'].get('fid'))}); "
        f"MS-SSIM diversity {_f(report['diversity']['synthetic'])}"
    )
    draw.text((16, 10), title, fill=INK, font=_font(14))
    _dice_chart(draw, (16, 44, 600, height - 10), report)
    hist = report["intensity"]["histograms"]
    organs = [o for o in report["fidelity"]["organs"] if hist["real"].get(o) or hist["synthetic"].get(o)][:9]
    cols = 3
    cell_w, cell_h = (width - 650 - 16) // cols, (height - 80) // 3
    draw.text((650, 44), "HU histograms inside organ masks:", fill=INK, font=_font(14))
    draw.rectangle((930, 48, 940, 58), fill=REAL)
    draw.text((944, 46), "real", fill=INK, font=_font(11))
    draw.rectangle((990, 48, 1000, 58), fill=SYN)
    draw.text((1004, 46), "synthetic", fill=INK, font=_font(11))
    for i, organ in enumerate(organs):
        x, y = 650 + (i % cols) * cell_w, 70 + (i // cols) * cell_h
        _histogram(
            draw, (x, y, x + cell_w - 14, y + cell_h - 6), organ, hist["real"]["edges"],
            hist["real"].get(organ), hist["synthetic"].get(organ),
        )  # fmt: skip
    return img

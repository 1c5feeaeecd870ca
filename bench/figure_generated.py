"""The README's picture of generated volumes: a real (phantom) case beside generated ones, same grid.

Each tile is ``lad_fast.preview.render.render_slices`` of one volume (axial, coronal, sagittal; radiological
convention) with organ outlines: the real case's labels, and for every generated volume the augmented
mask that conditioned it. Not a test.

    python bench/figure_generated.py --real PREPARED --generated generated --n 3 --out docs/generated_tiny.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, required=True, help="prepared dataset (its first case is shown)")
    ap.add_argument("--generated", type=Path, required=True, help="output folder of lad-fast generate")
    ap.add_argument("--n", type=int, default=3, help="generated volumes to show")
    ap.add_argument("--columns", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from lad_fast.data.geometry import canonical_dhw, unit_to_hu
    from lad_fast.data.io import read_image, read_labels
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.generate.writer import IMAGES, MASKS, read_manifest, volume_paths
    from lad_fast.organs import CANONICAL_ORGANS
    from lad_fast.preview.render import render_slices

    names = dict(enumerate(CANONICAL_ORGANS))
    ds = PreparedDataset(args.real)
    case = ds[0]
    window = tuple(ds.geometry.hu_window)
    spacing = tuple(float(s) for s in ds.geometry.spacing)
    tiles = [
        render_slices(
            unit_to_hu(np.asarray(case["image"], np.float32), window),
            np.asarray(case["mask"]),
            spacing,
            title=f"phantom {ds.case_ids[0]} (real data, same grid)",
            names=names,
        )
    ]
    records = read_manifest(args.generated)
    for i in sorted(records)[: args.n]:
        image_path, mask_path = volume_paths(args.generated, records[i]["id"])
        assert image_path.parent.name == IMAGES and mask_path.parent.name == MASKS
        hu, affine = canonical_dhw(read_image(image_path))
        lab, _ = canonical_dhw(read_labels(mask_path))
        step = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        rec = records[i]
        title = f"{rec['id']}: {rec['sampler']} {rec['steps']} steps, guidance {rec['guidance']:g}"
        mm = tuple(float(s) for s in step)
        tiles.append(render_slices(np.asarray(hu, np.float32), lab, mm, title=title, names=names))
    cols = args.columns
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for k, tile in enumerate(tiles):
        canvas.paste(tile, ((k % cols) * w, (k // cols) * h))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({len(tiles)} tiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

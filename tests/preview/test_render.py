"""PNG previews: panel geometry, display orientation, outlines where the mask is, and write_preview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lad_fast.preview.render import (
    ORGAN_COLOURS,
    PANEL_PX,
    TOTALSEG_NAMES,
    label_colour,
    render_grid,
    render_slices,
    write_preview,
)


def _volume() -> tuple[np.ndarray, np.ndarray]:
    hu = np.full((8, 40, 40), -1000.0, np.float32)
    hu[:, 5:35, 5:35] = 40.0
    mask = np.zeros(hu.shape, np.uint8)
    mask[2:6, 20:30, 25:35] = 5  # anterior (high H) and patient's right (high W)
    return hu, mask


def _colour_pixels(img: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    return np.argwhere(np.all(np.asarray(img) == colour, axis=-1))


def test_render_slices_size_and_outline_position():
    hu, mask = _volume()
    img = render_slices(hu, mask, spacing=(4.0, 2.0, 2.0), title="t")
    assert img.mode == "RGB"
    # Thin slab: coronal and sagittal stack beside the square axial panel.
    assert PANEL_PX + 12 < img.width < 3 * PANEL_PX and img.height >= PANEL_PX
    px = _colour_pixels(img, label_colour(5))
    assert len(px) > 20
    top = 6 + 18 + 17
    # (row, col) inside the axial panel (the legend swatch below it has the colour too).
    axial = px[(px[:, 1] < PANEL_PX + 6) & (px[:, 0] < top + PANEL_PX)]
    assert len(axial) > 8
    rows = (axial[:, 0] - top) / PANEL_PX
    cols = (axial[:, 1] - 6) / PANEL_PX
    # Anterior up: the organ (H 20..30 of 40) sits in the upper half; patient's right on the viewer's left.
    assert rows.max() < 0.55 and cols.max() < 0.45
    # Without a mask there are no coloured outline pixels.
    plain = render_slices(hu, None, spacing=(4.0, 2.0, 2.0))
    assert len(_colour_pixels(plain, label_colour(5))) == 0


def test_render_slices_aspect_follows_spacing():
    hu, _ = _volume()
    wide = render_slices(hu, None, spacing=(4.0, 1.0, 3.0))
    arr = np.asarray(wide)[6 + 17 :, 6 : 6 + PANEL_PX].max(axis=-1)
    rows, cols = np.nonzero(arr > 100)  # the 40 HU square is bright in the default window
    # 30 voxels at 1 mm (rows) vs 30 voxels at 3 mm (columns): three times wider than tall.
    assert 2.6 < (np.ptp(cols) + 1) / (np.ptp(rows) + 1) < 3.4


def test_render_slices_rejects_bad_input():
    hu, mask = _volume()
    with pytest.raises(ValueError, match=r"needs a 3D \(D, H, W\) volume"):
        render_slices(hu[0], None, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match=r"mask shape \(8, 40, 39\) differs"):
        render_slices(hu, mask[:, :, :39], spacing=(1, 1, 1))
    with pytest.raises(ValueError, match=r"window \(10, 0\) must have low < high"):
        render_slices(hu, None, spacing=(1, 1, 1), window=(10, 0))


def test_render_grid_rows():
    hu, _ = _volume()
    img = render_grid([[hu, hu[3]], [hu * 0]], labels=["input", "recon"])
    assert img.width > 2 * 192 and img.height > 2 * 192
    with pytest.raises(ValueError, match=r"2 labels for 1 rows"):
        render_grid([[hu]], labels=["a", "b"])
    with pytest.raises(ValueError, match=r"at least one row"):
        render_grid([])


def test_write_preview_nifti(tmp_path, monkeypatch):
    from lad_fast.data.geometry import dhw_to_nifti
    from lad_fast.data.io import write_nifti
    from lad_fast.errors import InputError

    hu, mask = _volume()
    affine = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])  # (d, h, w) -> RAS
    img_ijk, aff_ijk = dhw_to_nifti(hu, affine)
    lab_ijk, _ = dhw_to_nifti(mask, affine)
    write_nifti(tmp_path / "ct.nii.gz", img_ijk, aff_ijk, kind="image")
    write_nifti(tmp_path / "seg.nii.gz", lab_ijk, aff_ijk, kind="labels")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = write_preview(tmp_path / "ct.nii.gz", mask=tmp_path / "seg.nii.gz")
    assert out == Path("ct.png") and out.is_file()  # in the current folder, not beside the image
    pic = Image.open(out)
    # seg.nii.gz is TotalSegmentator's name: its id 5 is the liver, named and coloured as the liver
    title = f"{tmp_path.name}/ct.nii.gz + seg.nii.gz (TotalSegmentator ids)"
    direct = render_slices(hu, mask, spacing=(4.0, 2.0, 2.0), title=title, names=TOTALSEG_NAMES)
    assert label_colour(5, TOTALSEG_NAMES[5]) == ORGAN_COLOURS["liver"]
    assert pic.size == direct.size and np.array_equal(np.asarray(pic.convert("RGB")), np.asarray(direct))
    write_nifti(tmp_path / "small.nii.gz", lab_ijk[:-1], aff_ijk, kind="labels")
    with pytest.raises(InputError, match=r"small.nii.gz: mask shape .* differs from image"):
        write_preview(tmp_path / "ct.nii.gz", out=tmp_path / "x.png", mask=tmp_path / "small.nii.gz")
    assert not (tmp_path / "x.png").exists()


# -------------------------------------------------------------------- previews that compare


def test_each_organ_has_one_distinguishable_colour_in_every_vocabulary():
    import itertools
    import math

    from lad_fast.data.labels import ABDOMENCT1K, LAD_PANCREAS
    from lad_fast.organs import CANONICAL_ORGANS
    from lad_fast.preview.render import ORGAN_COLOURS, TOTALSEG_NAMES

    assert set(ORGAN_COLOURS) == set(CANONICAL_ORGANS[1:])
    for (a, ca), (b, cb) in itertools.combinations(ORGAN_COLOURS.items(), 2):
        assert math.dist(ca, cb) >= 90, (a, b)
    assert all(max(c) - min(c) >= 100 for c in ORGAN_COLOURS.values())  # saturated: none grey like CT
    liver = ORGAN_COLOURS["liver"]
    # canonical id 1, TotalSegmentator id 5, AbdomenCT-1K id 1: one liver colour
    assert label_colour(1) == label_colour(5, TOTALSEG_NAMES[5]) == label_colour(1, ABDOMENCT1K[1]) == liver
    assert label_colour(1, LAD_PANCREAS[1]) == label_colour(5) == ORGAN_COLOURS["pancreas"]
    assert label_colour(30, TOTALSEG_NAMES[30]) == label_colour(11) == ORGAN_COLOURS["vertebrae"]
    assert label_colour(40, "thyroid") not in ORGAN_COLOURS.values()  # not an organ of ours: a hashed hue


def _write_generated(root: Path, n: int) -> None:
    """A generated dataset as ``generate`` leaves it: volumes, manifest lines, dataset.json."""
    import json

    from lad_fast.data.geometry import dhw_to_nifti
    from lad_fast.data.io import write_nifti
    from lad_fast.generate.writer import dataset_json

    hu, mask = _volume()
    mask[mask == 5] = 1  # canonical liver
    affine = np.diag([2.0, 2.0, 4.0, 1.0])[[2, 1, 0, 3]]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    records = []
    for i in range(n):
        vid = f"lad_{i:06d}"
        write_nifti(root / "images" / f"{vid}.nii.gz", *dhw_to_nifti(hu + 10 * i, affine), kind="image")
        write_nifti(root / "masks" / f"{vid}.nii.gz", *dhw_to_nifti(mask, affine), kind="labels")
        records.append({"id": vid, "index": i, "sampler": "euler", "steps": 30, "guidance": 3.0})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "dataset.json").write_text(json.dumps(dataset_json(records, "test")))


def test_preview_of_a_generated_folder_is_one_grid_named_from_dataset_json(tmp_path, monkeypatch):
    from lad_fast.organs import CANONICAL_ORGANS
    from lad_fast.preview.inputs import preview_items
    from lad_fast.preview.render import ORGAN_COLOURS

    gen = tmp_path / "generated"
    _write_generated(gen, 3)
    items = preview_items([gen], n=2)
    assert [i.title for i in items] == [
        f"generated/lad_00000{k}: euler 30 steps, guidance 3.0" for k in (0, 1)
    ]
    assert items[0].names == dict(enumerate(CANONICAL_ORGANS)) and items[0].mask.max() == 1
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = write_preview([gen], n=2)
    assert out == Path("generated.png") and sorted(p.name for p in work.iterdir()) == ["generated.png"]
    assert sorted(p.name for p in (gen / "images").iterdir()) == [f"lad_00000{k}.nii.gz" for k in range(3)]
    pic = Image.open(out).convert("RGB")
    one = render_slices(items[0].hu, items[0].mask, items[0].spacing, title=items[0].title)
    assert pic.width == 2 * one.width  # two tiles side by side
    assert len(_colour_pixels(pic, ORGAN_COLOURS["liver"])) > 40  # canonical 1 drawn as liver
    # an image of the dataset brings its own mask and names; several sources also make one grid
    single = preview_items([gen / "images" / "lad_000002.nii.gz"])
    assert single[0].mask is not None and single[0].names[1] == "liver"
    two = [gen / "images" / "lad_000000.nii.gz", gen / "images" / "lad_000001.nii.gz"]
    assert write_preview(two) == Path("preview.png")


def test_preview_of_prepared_cases(tiny_phantoms, tmp_path, monkeypatch):
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.errors import InputError
    from lad_fast.preview.inputs import preview_items

    ds = PreparedDataset(tiny_phantoms)
    first, second = ds.case_ids[:2]
    by_flag = preview_items([tiny_phantoms], cases=[second])
    by_path = preview_items([tiny_phantoms / "cases" / second])
    titles = [i.title for i in by_flag]
    named = f"{tiny_phantoms.name}/{second}: prepared, preset tiny (canonical organs)"
    assert titles == [i.title for i in by_path] == [named]
    assert np.array_equal(by_flag[0].hu, by_path[0].hu) and by_flag[0].names[5] == "pancreas"
    assert by_flag[0].spacing == tuple(float(s) for s in ds.geometry.spacing)
    assert [i.title.split(":")[0] for i in preview_items([tiny_phantoms], n=2)] == [
        f"{tiny_phantoms.name}/{first}",
        f"{tiny_phantoms.name}/{second}",
    ]
    monkeypatch.chdir(tmp_path)
    assert write_preview(tiny_phantoms / "cases" / second) == Path(f"{second}.png")
    with pytest.raises(InputError, match=rf"no case 'nope' \(cases: {first}, {second}"):
        preview_items([tiny_phantoms], cases=["nope"])


def test_preview_refusals_read_their_messages(tmp_path, tiny_phantoms):
    from lad_fast.errors import ConfigError

    gen = tmp_path / "generated"
    _write_generated(gen, 1)
    image = gen / "images" / "lad_000000.nii.gz"
    with pytest.raises(ConfigError, match=r"inside the generated dataset .*images/, which holds only its"):
        write_preview(image, out=gen / "images" / "look.png")
    with pytest.raises(ConfigError, match=r"--case picks cases of a prepared dataset; .* is not one"):
        write_preview(image, cases=["a"], out=tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"--mask outlines one image; got 2 sources"):
        write_preview([image, image], mask=image, out=tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"--mask outlines a NIfTI or DICOM image; .* brings its own masks"):
        write_preview(tiny_phantoms, mask=image, out=tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"a preview is a PNG"):
        write_preview(image, out=tmp_path / "x.jpg")
    assert not list(tmp_path.glob("x.*"))


def test_cli_preview_takes_several_sources_and_n(tmp_path, monkeypatch, capsys):
    from lad_fast.cli.app import main

    gen = tmp_path / "generated"
    _write_generated(gen, 3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["preview", str(gen), "--n", "3", "--out", "cmp.png"])
    assert exit_.value.code == 0 and capsys.readouterr().out == "wrote cmp.png\n"
    assert Image.open(tmp_path / "cmp.png").width > 0
    with pytest.raises(SystemExit) as exit_:
        main(["preview", str(gen / "images" / "lad_000000.nii.gz"), "--case", "x"])
    assert exit_.value.code == 2 and "--case picks cases of a prepared dataset" in capsys.readouterr().err


# ------------------------------------------------------------------------------ raw label maps, titles


def test_a_raw_totalsegmentator_map_is_named_and_coloured_by_organ(shared):
    from lad_fast.organs import CANONICAL_ORGANS
    from lad_fast.preview.inputs import preview_items
    from lad_fast.preview.render import organ_of

    case = shared / "totalseg_example"
    [item] = preview_items([case / "ct.nii.gz"], mask=case / "seg.nii.gz")
    assert item.title == "totalseg_example/ct.nii.gz + seg.nii.gz (TotalSegmentator ids)"
    assert item.names == TOTALSEG_NAMES and item.names[5] == "liver" and item.names[7] == "pancreas"
    # every organ lad-fast keeps gets the colour it has in a prepared (canonical) mask
    present = [int(i) for i in np.unique(item.mask) if i in TOTALSEG_NAMES]
    organs = {organ_of(TOTALSEG_NAMES[i]) for i in present}
    assert {"liver", "pancreas", "spleen", "vertebrae"} <= organs
    for i in present:
        canonical = CANONICAL_ORGANS.index(organ_of(TOTALSEG_NAMES[i]))
        assert label_colour(i, item.names[i]) == label_colour(canonical)
    pic = render_slices(item.hu, item.mask, item.spacing, title=item.title, names=item.names)
    assert len(_colour_pixels(pic, ORGAN_COLOURS["liver"])) > 40


def test_raw_map_vocabulary_from_option_labels_json_or_unknown(tmp_path):
    import json

    from lad_fast.data.geometry import dhw_to_nifti
    from lad_fast.data.io import write_nifti
    from lad_fast.errors import ConfigError
    from lad_fast.preview.inputs import preview_items

    hu, mask = _volume()
    affine = np.diag([4.0, 2.0, 2.0, 1.0])[[2, 1, 0, 3]]
    write_nifti(tmp_path / "ct.nii.gz", *dhw_to_nifti(hu, affine), kind="image")
    write_nifti(tmp_path / "labels5.nii.gz", *dhw_to_nifti(mask, affine), kind="labels")
    [unknown] = preview_items([tmp_path / "ct.nii.gz"], mask=tmp_path / "labels5.nii.gz")
    assert unknown.names is None and unknown.title.endswith("(label ids unknown: pass --vocabulary)")
    [given] = preview_items(
        [tmp_path / "ct.nii.gz"], mask=tmp_path / "labels5.nii.gz", vocabulary="canonical"
    )
    assert given.names[5] == "pancreas" and given.title.endswith("labels5.nii.gz (canonical ids)")
    (tmp_path / "labels.json").write_text(json.dumps({"vocabulary": "abdomenct1k"}))
    [listed] = preview_items([tmp_path / "ct.nii.gz"], mask=tmp_path / "labels5.nii.gz")
    assert listed.names == {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
    assert listed.title.endswith("(AbdomenCT-1K ids)")
    with pytest.raises(ConfigError, match=r"--vocabulary names the label ids of --mask; give the label map"):
        preview_items([tmp_path / "ct.nii.gz"], vocabulary="lad")


def test_a_generated_title_names_the_preset_of_its_source_dataset(tmp_path, tiny_phantoms):
    import json

    from lad_fast.preview.inputs import preview_items

    gen = tmp_path / "gen"
    _write_generated(gen, 1)
    record = json.loads((gen / "manifest.jsonl").read_text())
    record["source_dataset"] = str(tiny_phantoms)
    (gen / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    [item] = preview_items([gen])
    assert item.title == "gen/lad_000000: euler 30 steps, guidance 3.0, preset tiny"

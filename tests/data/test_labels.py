"""Label vocabularies -> canonical ids, the AbdomenCT-1K kidney split and user maps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from lad_fast.data.io import read_labels
from lad_fast.data.labels import (
    CANONICAL_ID,
    CANONICAL_ORGANS,
    TOTALSEG_V2,
    TOTALSEG_V2_NAMES,
    UnknownLabelWarning,
    load_user_map,
    split_kidneys,
    to_canonical,
)
from lad_fast.errors import ConfigError, InputError

C = CANONICAL_ID
# 2 mm voxels, origin 40 mm to the patient's left of the midline: world x = 2 i - 40 (RAS).
RAS = np.diag([2.0, 2.0, 2.0, 1.0])
RAS[0, 3] = -40.0


def _abdomen() -> np.ndarray:
    """(40, 8, 4) AbdomenCT-1K ids: a big liver at the right (large x), spleen left, kidneys both sides."""
    labels = np.zeros((40, 8, 4), dtype=np.uint8)
    labels[22:40, :, :] = 1  # liver: far bigger than everything else, x in [4, 38] mm
    labels[0:4, 2:6, :] = 3  # spleen, x in [-40, -34] mm
    labels[6:9, 0:3, 1:3] = 2  # left kidney, x about -26 mm
    labels[24:27, 0:3, 1:3] = 2  # right kidney, x about 10 mm: left of the all-voxel centroid (about 14 mm)
    labels[15:17, 4:6, 2] = 4  # pancreas
    return labels


def test_totalseg_table_matches_names() -> None:
    assert {TOTALSEG_V2[i] for i in TOTALSEG_V2_NAMES.values()} <= set(CANONICAL_ORGANS)
    assert TOTALSEG_V2_NAMES["vertebrae_C1"] == 50 and TOTALSEG_V2_NAMES["vertebrae_L5"] == 27
    assert all(
        TOTALSEG_V2[i] == name
        for name, i in TOTALSEG_V2_NAMES.items()
        if not name.startswith(("vert", "sac"))
    )


def test_totalseg_sample_maps_without_warning(shared: Path) -> None:
    seg = read_labels(shared / "totalseg_example" / "seg.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ids 1..117 are all known, kept or not
        out, unknown = to_canonical(seg.array, "totalseg", seg.affine, source=seg.source)
    assert unknown == [] and out.dtype == np.uint8 and out.shape == seg.shape
    for ts_id, organ in [
        (1, "spleen"),
        (2, "kidney_right"),
        (3, "kidney_left"),
        (5, "liver"),
        (7, "pancreas"),
    ]:
        np.testing.assert_array_equal(out == C[organ], seg.array == ts_id)
    np.testing.assert_array_equal(out == C["vertebrae"], (seg.array >= 25) & (seg.array <= 50))
    assert not np.any(out[np.isin(seg.array, [10, 18, 64, 117])])  # lungs, bowel, portal vein, cartilage


def test_lad_reference_mask(shared: Path) -> None:
    mask = np.load(shared / "lad_reference" / "Case_00001_mask.npy")
    out, unknown = to_canonical(mask, "lad")
    assert unknown == []
    np.testing.assert_array_equal(out, np.choose(mask, [0, C["pancreas"], C["pancreatic_lesion"]]))


def test_unknown_ids_warn_or_fail() -> None:
    labels = np.array([[[0, 1, 2], [7, 300, 1]]], dtype=np.int32)
    with pytest.warns(
        UnknownLabelWarning, match=r"case\.nii\.gz: label ids \[7, 300\] are outside the lad vocab"
    ):
        out, unknown = to_canonical(labels, "lad", source="case.nii.gz")
    assert unknown == [7, 300]
    np.testing.assert_array_equal(out, [[[0, C["pancreas"], C["pancreatic_lesion"]], [0, 0, C["pancreas"]]]])
    with pytest.raises(
        InputError, match=r"case\.nii\.gz: label ids \[7, 300\] are outside the lad vocabulary"
    ):
        to_canonical(labels, "lad", strict=True, source="case.nii.gz")
    with pytest.warns(UnknownLabelWarning, match=r"label ids \[118\] are outside the totalseg vocabulary"):
        to_canonical(np.array([[[118, 5]]]), "totalseg")


def test_bad_label_values() -> None:
    with pytest.raises(InputError, match=r"m\.nii: label map holds non-integer values"):
        to_canonical(np.array([[[0.0, 1.5]]]), "lad", source="m.nii")
    with pytest.raises(InputError, match=r"m\.nii: label map holds negative ids \(min -1\)"):
        to_canonical(np.array([[[0, -1]]]), "lad", source="m.nii")
    out, _ = to_canonical(np.array([[[0.0, 2.0]]], dtype=np.float32), "lad")
    assert out.tolist() == [[[0, C["pancreatic_lesion"]]]]
    with pytest.raises(
        ConfigError, match=r"unknown label vocabulary 'msd'; choose one of totalseg, abdomenct1k"
    ):
        to_canonical(np.zeros((2, 2, 2), np.uint8), "msd")


def test_abdomenct1k_kidney_split_by_side() -> None:
    labels = _abdomen()
    out, unknown = to_canonical(labels, "abdomenct1k", RAS)
    assert unknown == []
    assert np.all(out[24:27, 0:3, 1:3] == C["kidney_right"])
    assert np.all(out[6:9, 0:3, 1:3] == C["kidney_left"])
    assert np.count_nonzero(out == C["kidney_right"]) == np.count_nonzero(out == C["kidney_left"]) == 18
    assert np.all(out[labels == 1] == C["liver"]) and np.all(out[labels == 3] == C["spleen"])
    assert np.all(out[labels == 4] == C["pancreas"])

    # Same anatomy stored LPS (i runs toward the patient's left): the sides follow the world, not the index.
    lps = RAS.copy()
    lps[0, 0], lps[0, 3] = -2.0, 38.0
    out_lps, _ = to_canonical(labels[::-1].copy(), "abdomenct1k", lps)
    np.testing.assert_array_equal(out_lps[::-1], out)


def test_kidney_split_without_liver_and_spleen() -> None:
    labels = _abdomen()
    labels[np.isin(labels, [1, 3])] = 0  # midline falls back to the kidneys' own centroid
    out, _ = to_canonical(labels, "abdomenct1k", RAS)
    assert np.all(out[24:27, 0:3, 1:3] == C["kidney_right"]) and np.all(
        out[6:9, 0:3, 1:3] == C["kidney_left"]
    )
    with pytest.raises(ValueError, match=r"splitting the both-sides kidney label needs the volume's affine"):
        to_canonical(labels, "abdomenct1k")


def test_split_kidneys_keeps_components_whole() -> None:
    kidney = np.zeros((10, 4, 4), dtype=bool)
    kidney[1:3, 1:3, 1:3] = True
    kidney[5:9, 1:3, 1:3] = True  # spans x = 5..8 mm with a midline at 6 mm: centroid 6.5 -> right
    right, left = split_kidneys(kidney, np.eye(4), midline_x=6.0)
    np.testing.assert_array_equal(right, kidney & (np.arange(10)[:, None, None] >= 5))
    np.testing.assert_array_equal(left, kidney & (np.arange(10)[:, None, None] < 5))


def test_user_map(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"1": "liver", "2": "kidney", "3": "spleen", "9": "background"}))
    table = load_user_map(path)
    assert table == {1: "liver", 2: "kidney", 3: "spleen", 9: "background"}
    labels = _abdomen()
    labels[labels == 4] = 9
    out, unknown = to_canonical(labels, table, RAS)
    assert unknown == [] and not np.any(out[labels == 9])
    assert np.all(out[24:27, 0:3, 1:3] == C["kidney_right"])

    path.write_text(json.dumps({"1": "heart"}))
    with pytest.raises(
        InputError, match=r"map\.json: unknown organ 'heart' for id 1; valid names: background, liver"
    ):
        load_user_map(path)
    path.write_text(json.dumps({"one": "liver"}))
    with pytest.raises(InputError, match=r"map\.json: label id 'one' is not an integer"):
        load_user_map(path)
    path.write_text("{1: liver")
    with pytest.raises(InputError, match=r"map\.json: not a readable JSON label map"):
        load_user_map(path)
    path.write_text("[]")
    with pytest.raises(InputError, match=r"map\.json: a label map must be a non-empty JSON object"):
        load_user_map(path)
    with pytest.raises(InputError, match=r"nothere\.json: label map file not found"):
        load_user_map(tmp_path / "nothere.json")

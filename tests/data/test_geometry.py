from __future__ import annotations

import numpy as np
import pytest

from lad_fast.config import GeometryConfig, get_preset
from lad_fast.data.geometry import (
    canonical_dhw,
    check_coverage,
    crop_or_pad,
    dhw_to_nifti,
    hu_to_unit,
    nifti_to_dhw,
    prepare_case,
    resample,
    unit_to_hu,
    window_start,
)
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.data.volume import Volume
from lad_fast.errors import InputError

PANCREAS = CANONICAL_ID["pancreas"]
LIVER = CANONICAL_ID["liver"]
TINY = GeometryConfig(shape=(16, 64, 64), spacing=(4.6, 6.4, 6.4))


def ras_volume(rng: np.random.Generator, shape_ijk=(7, 6, 5), spacing=(1.5, 2.0, 3.0)):
    """A random RAS (i, j, k) array and its affine."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-40.0, 12.5, 90.0)
    return rng.normal(size=shape_ijk).astype(np.float32), affine


def reorient_by_hand(ras: np.ndarray, affine_ras: np.ndarray, codes: str):
    """The same world data stored with file axes ``codes`` (e.g. "PIR"), built without nibabel:
    file axis a follows RAS axis perm[a], reversed when its letter is L, P or I."""
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    perm = [axis_of[c] for c in codes]
    flip = [c in "LPI" for c in codes]
    arr = ras.transpose(perm)
    for a, f in enumerate(flip):
        if f:
            arr = np.flip(arr, axis=a)
    # file index v -> RAS index u: u[perm[a]] = v[a] or n - 1 - v[a]
    to_ras = np.zeros((4, 4))
    to_ras[3, 3] = 1
    for a, (p, f) in enumerate(zip(perm, flip, strict=True)):
        to_ras[p, a] = -1.0 if f else 1.0
        to_ras[p, 3] = ras.shape[p] - 1 if f else 0.0
    return np.ascontiguousarray(arr), affine_ras @ to_ras


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "SLA", "IRP", "ASL"])
def test_canonical_dhw_same_data_in_every_orientation(codes):
    rng = np.random.default_rng(0)
    ras, affine_ras = ras_volume(rng)
    arr, affine = reorient_by_hand(ras, affine_ras, codes)
    dhw, affine_dhw = canonical_dhw(Volume(arr, affine, f"{codes}.nii.gz"))
    np.testing.assert_array_equal(dhw, ras.transpose(2, 1, 0))
    np.testing.assert_allclose(affine_dhw, affine_ras[:, [2, 1, 0, 3]], atol=1e-9)
    # D steps superior (+z), H anterior (+y), W right (+x).
    assert affine_dhw[2, 0] > 0 and affine_dhw[1, 1] > 0 and affine_dhw[0, 2] > 0


def test_canonical_dhw_rejects_non_3d():
    with pytest.raises(InputError, match=r"flat\.nii\.gz: expected a 3D volume, got shape \(4, 5\)"):
        canonical_dhw(Volume(np.zeros((4, 5)), np.eye(4), "flat.nii.gz"))


def test_dhw_to_nifti_round_trip_and_world_positions():
    rng = np.random.default_rng(1)
    ras, affine_ras = ras_volume(rng)
    dhw, affine_dhw = canonical_dhw(Volume(ras, affine_ras, "x"))
    ijk, affine_ijk = dhw_to_nifti(dhw, affine_dhw)
    np.testing.assert_array_equal(ijk, ras)
    np.testing.assert_allclose(affine_ijk, affine_ras)
    back, affine_back = nifti_to_dhw(ijk, affine_ijk)
    np.testing.assert_array_equal(back, dhw)
    np.testing.assert_allclose(affine_back, affine_dhw)
    d, h, w = 3, 2, 4
    assert dhw[d, h, w] == ijk[w, h, d]
    np.testing.assert_allclose(affine_dhw @ [d, h, w, 1], affine_ijk @ [w, h, d, 1])


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_resample_affine_is_exact_on_a_linear_field(codes):
    # Linear interpolation reproduces a linear function of world position exactly, so every interior
    # voxel of the resampled grid must equal the function at the world point its affine names.
    ras_shape, spacing = (20, 18, 12), (1.1, 0.9, 2.5)
    affine_ras = np.diag([*spacing, 1.0])
    affine_ras[:3, 3] = (5.0, -7.0, 30.0)
    idx = np.indices(ras_shape).reshape(3, -1)
    world = (affine_ras @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    coef = np.array([0.7, -1.3, 2.1])
    field = (coef @ world).reshape(ras_shape).astype(np.float64)
    arr, affine = reorient_by_hand(field, affine_ras, codes)
    dhw, affine_dhw = canonical_dhw(Volume(arr, affine, "f"))
    out, new_affine = resample(dhw, affine_dhw, (2.3, 1.6, 1.6), order=1)
    assert out.shape == (13, 10, 14)  # round(12 * 2.5 / 2.3), round(18 * 0.9 / 1.6), round(20 * 1.1 / 1.6)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), (2.3, 1.6, 1.6))
    inner = np.indices(out.shape).reshape(3, -1)
    pts = (new_affine @ np.vstack([inner, np.ones(inner.shape[1])]))[:3]
    # the source's inclusive world box (voxel centres)
    lo, hi = affine_ras[:3, 3], affine_ras[:3, 3] + (np.array(ras_shape) - 1) * spacing
    inside = np.all((pts >= lo[:, None] - 1e-9) & (pts <= hi[:, None] + 1e-9), axis=0)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(out.reshape(-1)[inside], (coef @ pts)[inside], atol=1e-6)
    # the field of view's centre is kept
    centre_old = affine_dhw @ [*(np.array(dhw.shape) - 1) / 2, 1]
    centre_new = new_affine @ [*(np.array(out.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)


def test_resample_labels_nearest_keeps_ids_and_position():
    mask = np.zeros((30, 40, 40), dtype=np.uint8)
    mask[10:20, 5:15, 20:35] = PANCREAS
    mask[2:5, 30:38, 2:8] = LIVER
    affine = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    out, new_affine = resample(mask, affine, (2.0, 1.6, 1.6), order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, LIVER, PANCREAS}

    def centroid(m, a):
        idx = np.argwhere(m == PANCREAS).mean(axis=0)
        return (a @ [*idx, 1])[:3]

    np.testing.assert_allclose(centroid(out, new_affine), centroid(mask, affine), atol=0.8)


def brute_force_best(hit: np.ndarray, depth: int) -> int:
    return max(int(hit[s : s + depth].sum()) for s in range(len(hit) - depth + 1))


def test_window_holds_all_organ_slices_centred():
    mask = np.zeros((100, 4, 4), dtype=np.uint8)
    mask[40:50, 1, 1] = PANCREAS
    start = window_start(100, 32, mask, (PANCREAS,))
    assert start == 29  # organ centre 44.5 = start + 15.5
    assert start <= 40 and start + 32 >= 50


def test_window_prefers_the_most_organ_slices():
    mask = np.zeros((120, 3, 3), dtype=np.uint8)
    mask[0:10, 0, 0] = PANCREAS
    mask[60:80, 2, 2] = CANONICAL_ID["pancreatic_lesion"]
    mask[30:40] = LIVER  # not a window organ
    start = window_start(120, 32, mask, (PANCREAS, CANONICAL_ID["pancreatic_lesion"]))
    assert start <= 60 and start + 32 >= 80


def test_window_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n, depth = int(rng.integers(20, 80)), int(rng.integers(4, 19))
        mask = (rng.random((n, 2, 2)) < rng.uniform(0.02, 0.3)).astype(np.uint8) * PANCREAS
        hit = mask.any(axis=(1, 2))
        start = window_start(n, depth, mask, (PANCREAS,))
        assert 0 <= start <= n - depth
        if hit.any():
            assert hit[start : start + depth].sum() == brute_force_best(hit, depth)


def test_window_centred_without_mask_or_organ_and_padded_when_short():
    empty = np.zeros((50, 2, 2), dtype=np.uint8)
    assert window_start(50, 32, None, (PANCREAS,)) == 9
    assert window_start(50, 32, empty, (PANCREAS,)) == 9
    assert window_start(20, 32, None, (PANCREAS,)) == -6


def test_crop_or_pad_fills_outside():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = crop_or_pad(a, (-1, 1, -2), (4, 2, 8), fill=-5)
    assert out.shape == (4, 2, 8)
    np.testing.assert_array_equal(out[1:3, :, 2:6], a[:, 1:3, :])
    assert (out[0] == -5).all() and (out[3] == -5).all() and (out[:, :, :2] == -5).all()
    assert (out[:, :, 6:] == -5).all()


def test_hu_window_round_trip_and_clip():
    hu = np.array([-2000.0, -1000.0, -300.0, 0.0, 400.0, 3000.0])
    unit = hu_to_unit(hu, (-1000.0, 400.0))
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [-1, -1, 0, 1000 / 700 - 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(unit, (-1000.0, 400.0)), np.clip(hu, -1000, 400), atol=1e-3)


def test_too_small_names_file_axis_and_millimetres():
    # 5 slices x 4.6 mm = 23 mm < half of 16 x 4.6 = 73.6 mm
    affine = np.diag([6.4, 6.4, 4.6, 1.0])
    with pytest.raises(
        InputError,
        match=r"small\.nii\.gz: too small along axis D .* covers 23\.0 mm, needs "
        r"at least 36\.8 mm",
    ):
        check_coverage((64, 64, 5), affine, TINY, "small.nii.gz")
    # LPS file whose first axis is the short one: W (left-right) is reported
    affine = np.diag([-6.4, -6.4, 4.6, 1.0])
    with pytest.raises(InputError, match=r"axis W \(left-right\): covers 128\.0 mm, needs at least 204\.8"):
        check_coverage((20, 64, 16), affine, TINY, "lps.nii.gz")
    check_coverage((32, 32, 8), np.diag([6.4, 6.4, 4.6, 1.0]), TINY, "ok.nii.gz")  # exactly half: fine


def test_too_small_says_which_preset_fits_or_that_none_does(monkeypatch):
    from dataclasses import replace

    import lad_fast.config

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    with pytest.raises(
        InputError,
        match=r"covers 180\.0 mm, needs at least 204\.8 mm \(0\.5 of the preset's 409\.6 mm field of view\); "
        r"no preset fits it \(the least any preset needs along this axis is 204\.8 mm\): use a scan that "
        r"covers more of the body, or leave this case out \(prepare --skip-invalid",
    ):
        check_coverage((122, 60, 30), affine, TINY, "crop.nii.gz")
    # A preset with a smaller in-plane field of view (128 x 1.6 mm = 204.8 mm) would accept it.
    small = replace(get_preset("lad"), preset="small")
    small = replace(small, geometry=replace(small.geometry, shape=(32, 128, 128)))
    monkeypatch.setitem(lad_fast.config.PRESETS, "small", lambda: small)
    with pytest.raises(
        InputError, match=r"field of view\); prepare it with --preset small, which needs 102\.4 mm"
    ):
        check_coverage((122, 60, 30), affine, TINY, "crop.nii.gz")


def sphere_case(codes: str, centre_world, shape_ras=(70, 66, 30), spacing=(3.2, 3.2, 2.5)):
    """A body of soft tissue with a bright sphere (and a pancreas label) at ``centre_world`` mm."""
    affine_ras = np.diag([*spacing, 1.0])
    affine_ras[:3, 3] = (-90.0, -70.0, -30.0)
    idx = np.indices(shape_ras).reshape(3, -1)
    world = (affine_ras @ np.vstack([idx, np.ones(idx.shape[1])]))[:3].reshape(3, *shape_ras)
    r = np.sqrt(sum((world[a] - centre_world[a]) ** 2 for a in range(3)))
    hu = np.where(r < 25.0, 300.0, 40.0).astype(np.float32)
    labels = np.where(r < 25.0, 7, 0).astype(np.uint8)  # TotalSegmentator pancreas id
    hu_f, affine = reorient_by_hand(hu, affine_ras, codes)
    lab_f, _ = reorient_by_hand(labels, affine_ras, codes)
    return Volume(hu_f, affine, "ct.nii.gz"), Volume(lab_f, affine, "seg.nii.gz")


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_prepare_case_keeps_world_position(codes):
    centre = np.array([10.0, -5.0, 20.0])
    image, labels = sphere_case(codes, centre)
    canonical = np.where(labels.array == 7, PANCREAS, 0).astype(np.uint8)
    case = prepare_case(image, labels, TINY, label_array=canonical)
    assert case.image.shape == (16, 64, 64) and case.image.dtype == np.float32
    assert case.mask.shape == (16, 64, 64) and case.mask.dtype == np.uint8
    assert -1.0 <= case.image.min() and case.image.max() <= 1.0
    # in-plane the source (192 x 160 mm) is smaller than 409.6 mm: padded with air (-1) and label 0
    assert case.image[:, 0, 0].max() == -1.0 and case.mask[:, 0, 0].max() == 0
    # a sampled sphere's centroid moves by a fraction of a voxel (6.4 mm in-plane): half a voxel allowed
    for vol in (case.image > 0.5, case.mask == PANCREAS):
        idx = np.argwhere(vol).mean(axis=0)
        np.testing.assert_allclose((case.affine @ [*idx, 1])[:3], centre, atol=3.2)
    box = case.crop_box()
    assert box["stop"][0] - box["start"][0] == 16 and box["start"][1] < 0  # padded in H


@pytest.mark.parametrize("codes", ["LPS", "IRP"])
def test_prepare_case_affine_is_exact_on_a_linear_field(codes):
    # HU linear in world position (inside the window): every prepared voxel that lies inside the source
    # must hold the field's value at the world point the prepared affine names.
    shape_ras, spacing = (40, 36, 20), (5.5, 6.0, 4.0)
    affine_ras = np.diag([*spacing, 1.0])
    affine_ras[:3, 3] = (-100.0, -90.0, 10.0)
    idx = np.indices(shape_ras).reshape(3, -1)
    coef = np.array([1.5, -2.0, 3.0])
    field = (coef @ (affine_ras @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]).reshape(shape_ras)
    arr, affine = reorient_by_hand(field.astype(np.float32), affine_ras, codes)
    case = prepare_case(Volume(arr, affine, "lin.nii.gz"), None, TINY)
    hu = unit_to_hu(case.image, TINY.hu_window)
    pidx = np.indices(case.image.shape).reshape(3, -1)
    pts = (case.affine @ np.vstack([pidx, np.ones(pidx.shape[1])]))[:3]
    lo, hi = affine_ras[:3, 3], affine_ras[:3, 3] + (np.array(shape_ras) - 1) * spacing
    inside = np.all((pts >= lo[:, None]) & (pts <= hi[:, None]), axis=0)
    assert inside.sum() > 5000
    expected = np.clip(coef @ pts, *TINY.hu_window)  # the window clips the field's top
    np.testing.assert_allclose(hu.reshape(-1)[inside], expected[inside], atol=0.05)
    assert (
        hu.reshape(-1)[~np.all((pts >= lo[:, None] - 6) & (pts <= hi[:, None] + 6), axis=0)] == -1000
    ).all()


def test_prepare_case_without_mask_is_centred():
    image, _ = sphere_case("RAS", np.array([0.0, 0.0, 0.0]), shape_ras=(40, 40, 60), spacing=(6.4, 6.4, 2.3))
    case = prepare_case(image, None, TINY)
    assert case.mask is None
    assert case.resampled_shape == (30, 40, 40) and case.crop_start == (7, -12, -12)


def test_prepare_case_label_array_shape_checked():
    image, labels = sphere_case("RAS", np.zeros(3))
    with pytest.raises(InputError, match=r"seg\.nii\.gz: label_array has shape \(2, 2, 2\)"):
        prepare_case(image, labels, TINY, label_array=np.zeros((2, 2, 2), np.uint8))

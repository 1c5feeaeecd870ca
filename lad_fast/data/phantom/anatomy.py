"""The abdomen the phantoms draw: tissues, their HU, and the organs at the level of the pancreas.

Coordinates are world mm in a standard frame centred on the abdominal cavity: x toward the patient's
right, y anterior, z superior, with z = 0 at the middle of the field of view (about L1/L2, the pancreas).
Random per-case parameters (sizes, positions, fat thickness, variants) are drawn here from one generator.

HU follow a portal-venous contrast phase for the vessels and kidneys (aorta ~180, portal / splenic vein
~160, kidney cortex ~160, medulla ~120) and unenhanced-like values for the parenchyma the phantom
spec fixes (liver ~60, spleen ~50, pancreas ~45); fat -100, bile and fluid ~10, bone cortex ~1000 over
cancellous ~420, gas and air -1000.
"""

from __future__ import annotations

import math

import numpy as np

from lad_fast.data.phantom.shapes import Canvas, catmull_rom, ellipsoid, tube

# Tissue ids (index into TISSUE_HU). 0 is air outside the body.
AIR, SKIN, FAT, MUSCLE, VFAT, LIVER, SPLEEN, CORTEX, MEDULLA, SINUS_FAT, URINE = range(11)
PANCREAS, STOMACH_WALL, STOMACH_FLUID, GAS, BILE, AORTA, IVC, VEIN = range(11, 19)
BONE_CORTEX, BONE_CANCELLOUS, DISC, CSF, BOWEL_WALL, BOWEL_FLUID, STOOL, CYST = range(19, 27)

TISSUE_HU = np.array(
    [-1000, 40, -100, 50, -95, 60, 50, 160, 120, -80, 10,
     45, 45, 15, -1000, 10, 180, 140, 160,
     1000, 420, 90, 10, 45, 20, -250, 8],
    np.float32,
)  # fmt: skip

# TotalSegmentator v2 ids.
SPLEEN_ID, KIDNEY_R_ID, KIDNEY_L_ID, GALLBLADDER_ID, LIVER_ID, STOMACH_ID, PANCREAS_ID = 1, 2, 3, 4, 5, 6, 7
AORTA_ID, IVC_ID = 52, 63
VERTEBRA_IDS = {"L3": 29, "L2": 30, "L1": 31, "T12": 32}  # 27..32 = L5..T12

SOFT = (VFAT,)  # organs are only painted over visceral fat unless they take priority explicitly


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _body(cv: Canvas, rng: np.random.Generator, fields: list[np.ndarray], s: float) -> None:
    """Skin, subcutaneous fat, abdominal-wall muscle and the visceral cavity (polar layers)."""
    a_in, b_ant, b_post = 136 * s * _u(rng, 0.95, 1.05), 98 * s * _u(rng, 0.9, 1.08), 84 * s
    fat0 = _u(rng, 6, 30)  # thin to obese
    X, Y = cv.X, cv.Y
    theta = np.arctan2(Y, X)
    r = np.sqrt(X * X + Y * Y)
    c, sn = np.cos(theta), np.sin(theta)
    b = np.where(sn > 0, np.float32(b_ant), np.float32(b_post))
    r_in = 1.0 / np.sqrt((c / a_in) ** 2 + (sn / b) ** 2)
    # Gentle random lobes keep the outline from being a perfect ellipse.
    for k in (2, 3, 4):
        r_in = r_in * (1 + np.float32(_u(rng, -0.025, 0.025)) * np.cos(k * theta + _u(rng, 0, 6.3)))
    r_in = r_in * (1 + np.float32(0.006) * fields[0])
    # Fat is thicker anteriorly and laterally, thin over the spine; low angular harmonics vary it.
    fat = fat0 * (1.0 + 0.35 * sn) * (1 - 0.5 * np.clip(-sn, 0, 1) ** 4)
    for k in (1, 2, 3):
        fat = fat * (1 + np.float32(_u(rng, -0.12, 0.12)) * np.cos(k * theta + _u(rng, 0, 6.3)))
    muscle = np.float32(_u(rng, 8, 13)) * (1 + 0.25 * np.abs(c))
    r_out = r_in + muscle + fat
    cv.tissue[r < r_out] = SKIN
    cv.tissue[r < r_out - 2.5] = FAT
    cv.tissue[r < r_in + muscle] = MUSCLE
    # Linea alba: the rectus muscles part at the midline anteriorly.
    cv.tissue[(r < r_in + muscle) & (r >= r_in) & (np.abs(X) < 5) & (Y > 0)] = FAT
    cv.tissue[r < r_in] = VFAT


def _ribs(cv: Canvas, rng: np.random.Generator, s: float) -> None:
    """Lower ribs: oblique bars in the lateral wall that slope down toward the front."""
    z0 = _u(rng, 10, 40)
    for j in range(4):
        zr = z0 - 28 * j  # successive ribs lower
        for side in (-1, 1):
            for phi in np.linspace(-70, 40, 16):  # posterior to anterolateral, angle from the side
                a = math.radians(phi)
                x = side * 146 * s * math.cos(a)
                y = (104 if phi > 0 else 90) * s * math.sin(a)
                z = zr - 0.45 * (phi + 70)  # a rib slopes downward toward the front
                res = ellipsoid(cv, (x, y, z), (6, 6, 5))
                if res is not None:
                    sl, q = res
                    cv.paint(sl, q < 1, BONE_CORTEX, only=(MUSCLE, FAT, VFAT))
                    cv.paint(sl, q < 0.35, BONE_CANCELLOUS, only=(BONE_CORTEX,))


def _spine(cv: Canvas, rng: np.random.Generator, s: float) -> None:
    """Vertebral bodies with discs, spinal canal, posterior arch and the muscles around the spine."""
    yb = -28 * s
    rx, ry = 21 * _u(rng, 0.92, 1.1), 16 * _u(rng, 0.92, 1.1)
    level_h, disc_h = _u(rng, 33, 38), _u(rng, 7, 10)
    disc0 = _u(rng, -level_h / 2, level_h / 2)  # z of one disc centre
    # Paraspinal and psoas muscles first: bone is painted over them.
    for side in (-1, 1):
        res = ellipsoid(cv, (side * 34 * s, yb - 52 * s, 0), (27 * s, 22 * s, math.inf), side * 10)
        if res is not None:
            sl, q = res
            cv.paint(sl, q < 1, MUSCLE)
        res = ellipsoid(cv, (side * 62 * s, yb - 30 * s, 0), (15 * s, 10 * s, math.inf), -side * 30)
        if res is not None:
            sl, q = res
            cv.paint(sl, q < 1, MUSCLE, only=(VFAT, FAT))
        # Psoas grows toward the pelvis (inferior, z < 0).
        sl = cv.box((side * 40 * s - 30, yb - 30, -1e3), (side * 40 * s + 30, yb + 30, 1e3))
        X, Y, Z = cv.coords(sl)
        rad = np.clip(12 - 0.12 * Z, 3, 22) * s
        q = ((X - side * (rx + 12 * s)) ** 2 + (Y - yb) ** 2) / rad**2
        cv.paint(sl, q < 1, MUSCLE, only=(VFAT,))
    sl = cv.box((-60, yb - 80, -1e3), (60, yb + 25, 1e3))
    X, Y, Z = cv.coords(sl)
    zz = (Z - disc0) % level_h  # 0 at a disc centre
    is_disc = (zz < disc_h / 2) | (zz > level_h - disc_h / 2)
    level_idx = np.floor((Z - disc0) / level_h).astype(np.int32)  # 0 = the level just above disc0
    qb = ((X / rx) ** 2 + ((Y - yb) / ry) ** 2).astype(np.float32)
    yc = yb - ry - 9  # spinal canal centre
    rc = np.sqrt(X**2 + ((Y - yc) * 1.1) ** 2)
    arch = (rc < 16) & (Y < yc + 4)
    pedicle = (np.abs(np.abs(X) - 11) < 4) & (Y > yc) & (Y < yb)
    spinous = (np.abs(X) < 4 + 0.1 * (Y - yc + 40).clip(0)) & (Y < yc) & (Y > yc - 38 * s)
    transverse = (
        (np.abs(Y - yc - 3) < 4) & (np.abs(X) < 45 * s) & ((zz > level_h * 0.35) & (zz < level_h * 0.75))
    )
    post = (arch | pedicle | spinous | transverse) & ~is_disc
    body = (qb < 1) & ~is_disc
    bone = body | post
    # Label every bone voxel by its level: discs take no label (as in TotalSegmentator).
    ids = np.array(
        [VERTEBRA_IDS["L3"], VERTEBRA_IDS["L2"], VERTEBRA_IDS["L1"], VERTEBRA_IDS["T12"]], np.uint8
    )
    lab = ids[np.clip(level_idx + 1, 0, 3)]
    tissue = cv.tissue[sl]
    labels = cv.labels[sl]
    tissue[(qb < 1) & is_disc] = DISC
    tissue[bone] = BONE_CORTEX
    cancellous = (body & (qb < 0.72) & (np.minimum(zz, level_h - zz) > disc_h / 2 + 1.5)) | (
        post & (rc < 12.5) & arch
    )
    tissue[cancellous] = BONE_CANCELLOUS
    labels[bone] = lab[bone]
    canal = rc < 9.5
    tissue[canal & (Y < yb - ry + 2)] = CSF
    labels[canal & (Y < yb - ry + 2)] = 0


def _vessels(cv: Canvas, rng: np.random.Generator, s: float) -> dict[str, tuple[float, float]]:
    """Aorta (left of the midline) and IVC (right), with the SMA and SMV in front of them."""
    ao = (-14 * s + _u(rng, -4, 4), -2 * s + _u(rng, -4, 4))
    ivc = (24 * s + _u(rng, -4, 6), 0 * s + _u(rng, -4, 4))
    ra = 11 * _u(rng, 0.85, 1.2)
    res = ellipsoid(cv, (*ao, 0), (ra, ra, math.inf))
    sl, q = res  # type: ignore[misc]
    cv.paint(sl, q < 1, AORTA, AORTA_ID)
    cv.paint(sl, (q >= 1) & (q < 1.15), MUSCLE, only=SOFT)  # the aortic wall
    sl, q = ellipsoid(cv, (*ivc, 0), (14 * _u(rng, 0.85, 1.2), 9 * _u(rng, 0.8, 1.2), math.inf), 15)  # type: ignore[misc]
    cv.paint(sl, q < 1, IVC, IVC_ID)
    sl, q = ellipsoid(cv, (ao[0] + 10, ao[1] + 22, -25), (4.5, 4.5, 40))  # type: ignore[misc]
    cv.paint(sl, q < 1, AORTA, only=SOFT)
    sl, q = ellipsoid(cv, (ao[0] + 24, ao[1] + 24, -25), (6, 6, 40))  # type: ignore[misc]
    cv.paint(sl, q < 1, VEIN, only=SOFT)
    return {"aorta": ao, "ivc": ivc}


def _kidney(
    cv: Canvas,
    rng: np.random.Generator,
    fields: list[np.ndarray],
    s: float,
    side: int,
    label: int,
    cyst: bool,
) -> None:
    """A kidney: cortex over medulla, a medial sinus with fat and a urine-filled pelvis."""
    cx = side * 70 * s + _u(rng, -6, 6)
    cy = -45 * s + _u(rng, -6, 6)
    cz = (-12 if side > 0 else 2) + _u(rng, -10, 10)  # the right kidney sits lower
    r = np.array([27, 19, 52]) * _u(rng, 0.85, 1.15)
    ang = side * -_u(rng, 25, 45)  # lateral pole posterior
    res = ellipsoid(cv, (cx, cy, cz), r, ang, fields[2], 0.08)
    if res is None:
        return
    sl, q = res
    cv.paint(sl, (q >= 1) & (q < 1.5), VFAT, only=(VFAT,))  # perirenal fat halo stays fat
    cv.paint(sl, q < 1, CORTEX, label)
    cv.paint(sl, q < 0.62, MEDULLA, label)
    # The sinus opens toward the hilum (anteromedial): its centre sits on the medial edge.
    hx, hy = cx - side * 0.62 * r[0], cy + 0.35 * r[1]
    res = ellipsoid(cv, (hx, hy, cz), (0.55 * r[0], 0.42 * r[1], 0.55 * r[2]), ang)
    if res is not None:
        sl2, q2 = res
        cv.paint(sl2, q2 < 1, SINUS_FAT, 0, only=(CORTEX, MEDULLA, VFAT))
        cv.paint(sl2, q2 < 0.45, URINE, label, only=(SINUS_FAT,))
    if cyst:
        pole = side * _u(rng, -0.3, 0.3)
        res = ellipsoid(
            cv, (cx + side * 0.3 * r[0], cy, cz + pole * r[2]), np.full(3, 9.0) * _u(rng, 0.7, 1.2)
        )
        if res is not None:
            sl3, q3 = res
            cv.paint(sl3, q3 < 1, CYST, 0, only=(CORTEX, MEDULLA))


def _liver(cv: Canvas, rng: np.random.Generator, fields: list[np.ndarray], s: float, cyst: bool) -> None:
    """Right lobe filling the right upper abdomen, a left lobe in the upper slices, portal branches."""
    sl = cv.box((-90, -120, -1e3), (200, 150, 1e3))
    X, Y, Z = cv.coords(sl)
    cz = _u(rng, 25, 55)
    rz = _u(rng, 95, 125)
    medial = _u(rng, -12, 8) * s
    # Right lobe: a big ellipsoid clipped by the cavity; the medial edge curves behind the IVC.
    q = ((X - 85 * s) / (110 * s)) ** 2 + ((Y - 10 * s) / (110 * s)) ** 2 + ((Z - cz) / rz) ** 2
    q = q * (1 + 0.07 * fields[3][sl])
    right = (q < 1) & (X > medial + 0.004 * (Y - 20 * s) ** 2)
    # Left lobe: anterior, crossing the midline, only high up.
    ql = ((X + 10 * s) / (70 * s)) ** 2 + ((Y - 60 * s) / (28 * s)) ** 2 + ((Z - cz - 20) / 45) ** 2
    left = ql * (1 + 0.1 * fields[4][sl]) < 1
    inside = (right | left) & np.isin(cv.tissue[sl], (VFAT,))
    cv.tissue[sl][inside] = LIVER
    cv.labels[sl][inside] = LIVER_ID
    # Portal and hepatic vein branches (contrast) inside the liver: holes in the organ's tissue only.
    for _ in range(int(rng.integers(3, 6))):
        p0 = np.array([55 * s, 10 * s, cz - 30 + _u(rng, -15, 15)])
        p1 = p0 + np.array([_u(rng, 20, 60), _u(rng, -40, 40), _u(rng, -30, 30)])
        res = tube(cv, np.linspace(p0, p1, 8), np.linspace(5, 2.5, 8), 1.0)
        if res is not None:
            sl2, q2, _ = res
            cv.paint(sl2, q2 < 1, VEIN, only=(LIVER,))
    if cyst:
        c = (_u(rng, 60, 100) * s, _u(rng, -10, 40) * s, _u(rng, -20, 30))
        res = ellipsoid(cv, c, np.array([1, 1, 0.9]) * _u(rng, 8, 15))
        if res is not None:
            sl2, q2 = res
            cv.paint(sl2, q2 < 1, CYST, 0, only=(LIVER, VEIN))


def _gallbladder(cv: Canvas, rng: np.random.Generator, s: float) -> None:
    c = (48 * s + _u(rng, -8, 8), 55 * s + _u(rng, -8, 8), _u(rng, -30, 0))
    res = ellipsoid(cv, c, np.array([15, 19, 30]) * _u(rng, 0.75, 1.2), _u(rng, -40, 10))
    if res is not None:
        sl, q = res
        cv.paint(sl, q < 1, BILE, GALLBLADDER_ID, only=(LIVER, VFAT, VEIN))


def _spleen(cv: Canvas, rng: np.random.Generator, fields: list[np.ndarray], s: float, splenule: bool) -> None:
    """A crescent in the left posterolateral corner: an ellipsoid minus a medial bite (the hilum)."""
    c = (-108 * s + _u(rng, -5, 5), -28 * s + _u(rng, -6, 6), _u(rng, 15, 40))
    r = np.array([24, 55, 55]) * _u(rng, 0.8, 1.15)
    ang = _u(rng, 10, 30)  # long axis along the posterolateral wall, anterior end more lateral
    res = ellipsoid(cv, c, r, ang, fields[5], 0.1)
    if res is None:
        return
    sl, q = res
    X, Y, _ = cv.coords(sl)
    bite = ((X - c[0] - 30 * s) / 22) ** 2 + ((Y - c[1] - 5 * s) / 30) ** 2 < 1
    cv.paint(sl, (q < 1) & ~bite, SPLEEN, SPLEEN_ID, only=(VFAT,))
    if splenule:  # an accessory spleen near the hilum: a second component in a few slices
        res = ellipsoid(cv, (c[0] + 22 * s, c[1] + 40 * s, c[2] - 30), np.full(3, 8.0) * _u(rng, 0.8, 1.3))
        if res is not None:
            sl2, q2 = res
            cv.paint(sl2, q2 < 1, SPLEEN, SPLEEN_ID, only=(VFAT,))


def _stomach(cv: Canvas, rng: np.random.Generator, s: float) -> None:
    """Fundus / body in the left upper abdomen and the antrum crossing the midline; gas rises anteriorly."""
    parts = [
        ((-55 * s + _u(rng, -8, 8), 40 * s + _u(rng, -8, 8), _u(rng, 25, 45)), np.array([45, 35, 55]), 30),
        ((-10 * s + _u(rng, -8, 8), 58 * s + _u(rng, -5, 5), _u(rng, -10, 10)), np.array([32, 17, 22]), 10),
    ]
    gas_level = _u(rng, -5, 25) * s  # y above which the stomach holds gas (supine patient)
    scale = _u(rng, 0.85, 1.15)
    for c, r, ang in parts:
        res = ellipsoid(cv, c, r * scale, ang)
        if res is None:
            continue
        sl, q = res
        _, Y, _ = cv.coords(sl)
        inside = (q < 1) & np.isin(cv.tissue[sl], (VFAT, STOMACH_WALL, STOMACH_FLUID, GAS, LIVER))
        cv.tissue[sl][inside] = STOMACH_WALL
        cv.labels[sl][inside] = STOMACH_ID
        lumen = inside & (q < 0.8)
        cv.tissue[sl][lumen] = np.where(Y[lumen] > c[1] + gas_level, GAS, STOMACH_FLUID)


def _pancreas(
    cv: Canvas, rng: np.random.Generator, s: float, vessels: dict[str, tuple[float, float]], gap: bool
) -> None:
    """The locality organ: a thin curved tube (head by the duodenum, body over the aorta, tail to the
    splenic hilum), plus the splenic vein behind it and the duodenal C-loop around the head."""
    ao, ivc = vessels["aorta"], vessels["ivc"]
    j = lambda a: _u(rng, -a, a)  # noqa: E731
    pts = np.array([
        [ivc[0] + 14 + j(5), ivc[1] + 14 + j(5), -22 + j(6)],   # head (with the uncinate below)
        [ivc[0] - 4 + j(4), ivc[1] + 28 + j(5), -8 + j(5)],      # neck, in front of the SMV
        [ao[0] - 10 + j(5), ao[1] + 30 + j(6), 2 + j(5)],         # body, anterior to the aorta
        [-60 * s + j(8), -5 * s + j(8), 12 + j(6)],              # tail toward the splenic hilum
        [-82 * s + j(6), -22 * s + j(6), 18 + j(6)],
    ])  # fmt: skip
    path = catmull_rom(pts, 48)
    radii = np.interp(np.linspace(0, 1, 48), [0, 0.2, 0.4, 1], [15, 10, 8.5, 7]) * _u(rng, 0.8, 1.2)
    res = tube(cv, path, radii, z_stretch=1.6)
    if res is None:
        return
    sl, q, arg = res
    inside = q < 1
    if gap:  # a cleft in the body: two components in the slices it crosses
        g0 = int(rng.integers(20, 34))
        inside &= ~((arg >= g0) & (arg < g0 + 4))
    cv.paint(sl, inside, PANCREAS, PANCREAS_ID, only=(VFAT, VEIN))
    # Splenic vein along the back of the body and tail.
    vpath = path[16:] + np.array([0, -radii[16:].mean() - 2, 0])
    res = tube(cv, vpath, np.full(len(vpath), 4.0))
    if res is not None:
        sl2, q2, _ = res
        cv.paint(sl2, q2 < 1, VEIN, only=(VFAT,))
    # Duodenum: a C-loop around the head.
    head = pts[0]
    dpts = np.array(
        [
            [head[0] + 8, head[1] + 12, head[2] + 35],
            [head[0] + 24, head[1] + 2, head[2] + 10],
            [head[0] + 20, head[1] - 4, head[2] - 18],
            [head[0] - 10, head[1] - 5, head[2] - 40],
        ]
    )
    res = tube(cv, catmull_rom(dpts, 24), np.full(24, 11.0 * _u(rng, 0.8, 1.2)))
    if res is not None:
        sl3, q3, _ = res
        cv.paint(sl3, q3 < 1, BOWEL_WALL, only=(VFAT,))
        cv.paint(sl3, q3 < 0.7, BOWEL_FLUID if rng.random() < 0.6 else GAS, only=(BOWEL_WALL,))


def _bowel(cv: Canvas, rng: np.random.Generator, s: float) -> None:
    """Colon flexures and small-bowel loops filling the rest of the cavity (unlabelled, as in Lad)."""
    for side, cz in ((1, _u(rng, -50, -20)), (-1, _u(rng, -10, 20))):
        pts = np.array(
            [
                [side * 100 * s, -10 * s, cz + 40],
                [side * 100 * s, 15 * s, cz],
                [side * 60 * s, 55 * s, cz - 20],
                [0, 75 * s, cz - 35],
            ]
        )
        r = 18 * _u(rng, 0.8, 1.2)
        res = tube(cv, catmull_rom(pts, 24), np.full(24, r))
        if res is None:
            continue
        sl, q, _ = res
        cv.paint(sl, q < 1, BOWEL_WALL, only=(VFAT,))
        lumen = (q < 0.82) & (cv.tissue[sl] == BOWEL_WALL)
        mottled = np.random.default_rng(rng.integers(1 << 31)).random(lumen.shape) < 0.45
        cv.tissue[sl][lumen] = np.where(mottled[lumen], STOOL, GAS)
    for _ in range(int(rng.integers(10, 22))):
        c = (_u(rng, -110, 110) * s, _u(rng, -10, 90) * s, _u(rng, -80, 30))
        r = _u(rng, 9, 16)
        res = ellipsoid(cv, c, (r, r, r * _u(rng, 1.0, 2.0)), _u(rng, 0, 180))
        if res is None:
            continue
        sl, q = res
        cv.paint(sl, q < 1, BOWEL_WALL, only=(VFAT,))
        content = GAS if rng.random() < 0.25 else BOWEL_FLUID
        cv.paint(sl, q < 0.6, content, only=(BOWEL_WALL,))


def draw_abdomen(cv: Canvas, rng: np.random.Generator, fields: list[np.ndarray]) -> dict[str, bool]:
    """Paint every structure into ``cv.tissue`` / ``cv.labels``; returns the topology variants drawn.

    Order matters: later structures only replace the tissues their ``only=`` lists, so organs keep a
    rim of fat between them instead of overlapping.
    """
    s = _u(rng, 0.85, 1.02)  # overall viscera scale
    variants = {
        "pancreas_gap": bool(rng.random() < 0.35),
        "liver_cyst": bool(rng.random() < 0.35),
        "kidney_cyst": bool(rng.random() < 0.3),
        "splenule": bool(rng.random() < 0.3),
    }
    _body(cv, rng, fields, s)
    _ribs(cv, rng, s)
    _spine(cv, rng, s)
    vessels = _vessels(cv, rng, s)
    cyst_side = 1 if rng.random() < 0.5 else -1
    _kidney(cv, rng, fields, s, 1, KIDNEY_R_ID, variants["kidney_cyst"] and cyst_side == 1)
    _kidney(cv, rng, fields, s, -1, KIDNEY_L_ID, variants["kidney_cyst"] and cyst_side == -1)
    _liver(cv, rng, fields, s, variants["liver_cyst"])
    _gallbladder(cv, rng, s)
    _spleen(cv, rng, fields, s, variants["splenule"])
    _stomach(cv, rng, s)
    _pancreas(cv, rng, s, vessels, variants["pancreas_gap"])
    _bowel(cv, rng, s)
    return variants

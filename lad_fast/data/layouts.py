"""Dataset layouts: find the (image, mask) pairs of a source folder and the label vocabulary they use.

Layouts (``discover(src, layout)``; "auto" tries them in this order):

- ``file``: ``src`` is one CT NIfTI file (no mask).
- ``totalseg``: ``src/sXXXX/ct.nii.gz`` with ``segmentations/`` (one file per organ) or ``seg.nii.gz``;
  or ``src`` is one such case folder.
- ``nnunet``: ``src/imagesTr/<case>_0000.nii.gz`` with ``src/labelsTr/<case>.nii.gz`` and a
  ``dataset.json`` whose "labels" names become a label map where they are canonical organ names.
- ``abdomenct1k``: ``Case_XXXXX_0000.nii.gz`` images anywhere under ``src``, masks ``Case_XXXXX.nii.gz``
  in a mask folder (``Mask/`` in the release).
- ``flat``: ``src/images/*.nii.gz`` with an optional ``src/masks/`` of the same names, or CT files
  directly in ``src``; an optional ``src/labels.json`` holds ``{"vocabulary": name}`` or
  ``{"map": {"<id>": "<organ>"}}``. Official Lad ``.npy`` crops are volumes too: ``<id>.npy`` or
  ``<id>_image.npy`` images with ``<id>_mask.npy`` masks (beside them or in ``masks/``), read with Lad's
  ids (1 pancreas, 2 lesion) unless ``labels.json`` says otherwise; Lad's ``<id>_topo.npy`` structure
  vectors are not volumes and are ignored.
- ``dicom``: ``src`` is one DICOM series folder (no mask).

Hidden files (names starting with ".") are ignored: atomic writers leave their temporaries that way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lad_fast.data.io import dicom_files, is_dicom_file, is_nifti, is_npy, nifti_stem
from lad_fast.data.labels import CANONICAL_ID, VOCABULARIES, parse_user_map
from lad_fast.errors import ConfigError, InputError


@dataclass(frozen=True)
class CaseSource:
    """One case of a source dataset. ``mask`` may be a file or a TotalSegmentator organ folder.

    ``label_map`` (id -> canonical organ), when set, takes precedence over ``vocabulary``; both None
    means the mask ids are unknown.
    """

    case_id: str
    image: Path
    mask: Path | None
    vocabulary: str | None
    label_map: dict[int, str] | None = None


_ABDOMENCT1K_IMAGE = re.compile(r"^(Case_\d+)_0000\.nii\.gz$")
_ABDOMENCT1K_MASK = re.compile(r"^(Case_\d+)\.nii\.gz$")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _niftis(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file() and is_nifti(p)]


# Official Lad crops: <id>.npy or <id>_image.npy images, <id>_mask.npy masks, <id>_topo.npy structure vectors.
_NPY_MASK, _NPY_IMAGE, _NPY_TOPO = "_mask.npy", "_image.npy", "_topo.npy"


def _volumes(folder: Path) -> list[Path]:
    """NIfTI files and ``.npy`` volumes (not Lad's ``_topo.npy`` vectors) directly in ``folder``."""
    return [
        p
        for p in _visible(folder)
        if p.is_file() and (is_nifti(p) or (is_npy(p) and not p.name.endswith(_NPY_TOPO)))
    ]


def _volume_id(path: Path) -> str:
    """Case id of a volume file: the NIfTI stem, or a ``.npy`` name without ``_image``/``_mask``."""
    if not is_npy(path):
        return nifti_stem(path)
    for suffix in (_NPY_MASK, _NPY_IMAGE, ".npy"):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _finish(src: Path, cases: list[CaseSource]) -> list[CaseSource]:
    from lad_fast.utils.safepaths import plain_name

    for c in cases:  # the id names cases/<id>/: an empty id or ".." would put files onto cases/ itself
        plain_name(
            c.case_id,
            "case id",
            c.image,
            "rename it so that it has a name of its own (pass a folder by its "
            "own name, not one ending in '..')",
        )
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(f"{src}: case ids {dupes} occur more than once; rename or remove the duplicates")
    return sorted(cases, key=lambda c: c.case_id)


# --- one detector per layout: [] when the layout does not apply ---------------------------------------------


def _file(src: Path) -> list[CaseSource]:
    if src.is_file() and (is_nifti(src) or is_npy(src)):
        return [CaseSource(_volume_id(src), src, None, None)]
    return []


def _dicom(src: Path) -> list[CaseSource]:
    if src.is_dir() and dicom_files(src):
        return [CaseSource(src.name, src, None, None)]
    return []


def _totalseg_case(folder: Path) -> CaseSource | None:
    ct = folder / "ct.nii.gz"
    if not ct.is_file():
        return None
    # seg.nii.gz is one file read (faster) holding the same ids as segmentations/.
    mask = next((m for m in (folder / "seg.nii.gz", folder / "segmentations") if m.exists()), None)
    return CaseSource(folder.name, ct, mask, "totalseg")


def _totalseg(src: Path) -> list[CaseSource]:
    if not src.is_dir():
        return []
    single = _totalseg_case(src)
    if single is not None:
        return [single]
    cases = (_totalseg_case(d) for d in _visible(src) if d.is_dir())
    return [c for c in cases if c is not None]


def _nnunet_label_map(dataset_json: Path) -> dict[int, str] | None:
    """dataset.json "labels" -> {id: canonical organ} for the names that are canonical organs."""
    if not dataset_json.is_file():
        return None
    try:
        labels = json.loads(dataset_json.read_text(encoding="utf-8")).get("labels", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"{dataset_json}: not a readable nnU-Net dataset.json ({exc})") from None
    pairs: list[tuple[object, object]] = list(labels.items()) if isinstance(labels, dict) else []
    out: dict[int, str] = {}
    for key, value in pairs:
        # nnU-Net v2 writes {"name": id}; v1 wrote {"id": "name"}.
        name, ident = (key, value) if isinstance(value, int) else (value, key)
        try:
            i = int(ident)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            continue  # region-based labels (lists of ids) have no single id to map
        organ = str(name).strip().lower().replace(" ", "_").replace("-", "_")
        if i > 0 and organ in CANONICAL_ID:
            out[i] = organ
    return out or None


def _nnunet(src: Path) -> list[CaseSource]:
    images, labels = src / "imagesTr", src / "labelsTr"
    if not images.is_dir():
        return []
    label_map = _nnunet_label_map(src / "dataset.json")
    cases = []
    for image in _niftis(images):
        stem = nifti_stem(image)
        if not stem.endswith("_0000"):
            continue  # other channels (_0001, ...) of a multi-modal case
        case_id = stem[: -len("_0000")]
        mask = next(
            (m for m in (labels / f"{case_id}.nii.gz", labels / f"{case_id}.nii") if m.is_file()), None
        )
        cases.append(CaseSource(case_id, image, mask, None, label_map))
    return cases


def _abdomenct1k(src: Path) -> list[CaseSource]:
    if not src.is_dir():
        return []
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in sorted(src.rglob("Case_*.nii.gz")):
        if any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        if m := _ABDOMENCT1K_IMAGE.match(path.name):
            images.setdefault(m.group(1), path)
        elif m := _ABDOMENCT1K_MASK.match(path.name):
            masks.setdefault(m.group(1), path)
    return [CaseSource(i, p, masks.get(i), "abdomenct1k") for i, p in images.items()]


def _flat_vocabulary(src: Path) -> tuple[str | None, dict[int, str] | None]:
    path = src / "labels.json"
    if not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if isinstance(obj, dict) and set(obj) == {"vocabulary"}:
        if obj["vocabulary"] not in VOCABULARIES:
            raise InputError(
                f"{path}: unknown vocabulary {obj['vocabulary']!r}; choose one of {', '.join(VOCABULARIES)}"
            )
        return obj["vocabulary"], None
    if isinstance(obj, dict) and set(obj) == {"map"}:
        return None, parse_user_map(obj["map"], str(path))
    raise InputError(f'{path}: expected {{"vocabulary": "<name>"}} or {{"map": {{"<id>": "<organ>"}}}}')


def _flat(src: Path) -> list[CaseSource]:
    if not src.is_dir():
        return []
    images_dir = src / "images" if (src / "images").is_dir() else src
    volumes = _volumes(images_dir)
    images = [p for p in volumes if not p.name.endswith(_NPY_MASK)]
    if not images:
        return []
    masks = {_volume_id(p): p for p in volumes if p.name.endswith(_NPY_MASK)}
    if (src / "masks").is_dir():
        masks.update({_volume_id(p): p for p in _volumes(src / "masks")})
    vocabulary, label_map = _flat_vocabulary(src)
    cases = []
    for image in images:
        case_id = _volume_id(image)
        mask = masks.get(case_id)
        vocab = vocabulary
        if vocab is None and label_map is None and mask is not None and is_npy(mask):
            vocab = "lad"  # an official Lad crop's mask holds Lad's pancreas ids
        cases.append(CaseSource(case_id, image, mask, vocab, label_map))
    return cases


_DETECTORS: dict[str, Callable[[Path], list[CaseSource]]] = {
    "file": _file,
    "totalseg": _totalseg,
    "nnunet": _nnunet,
    "abdomenct1k": _abdomenct1k,
    "flat": _flat,
    "dicom": _dicom,
}
LAYOUTS: tuple[str, ...] = tuple(_DETECTORS)

_EXPECTED: dict[str, str] = {
    "file": "a .nii or .nii.gz CT file (or an official Lad .npy crop)",
    "totalseg": "sXXXX/ct.nii.gz with sXXXX/segmentations/ or seg.nii.gz (or one such case folder)",
    "nnunet": "imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz",
    "abdomenct1k": "Case_XXXXX_0000.nii.gz images with Case_XXXXX.nii.gz masks in a mask folder",
    "flat": "images/*.nii.gz with an optional masks/ of the same names, or .nii.gz CT files (or Lad "
    "<id>.npy crops with <id>_mask.npy) in the folder",
    "dicom": "a folder of DICOM files of one series",
}


def discover(src: Path | str, layout: str = "auto") -> tuple[str, list[CaseSource]]:
    """Detect (or apply the forced) layout of ``src``; return its name and the cases sorted by id."""
    src = Path(src)
    if layout != "auto" and layout not in _DETECTORS:
        raise ConfigError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_dir() and not _visible(src):
        raise InputError(f"{src}: folder is empty; expected CT volumes (NIfTI or DICOM)")
    if layout != "auto":
        cases = _DETECTORS[layout](src)
        if not cases:
            raise InputError(f"{src}: does not look like the {layout} layout; expected {_EXPECTED[layout]}")
        return layout, _finish(src, cases)
    for name, detect in _DETECTORS.items():
        cases = detect(src)
        if cases:
            return name, _finish(src, cases)
    if src.is_file():
        if is_dicom_file(src):
            raise InputError(f"{src}: a single DICOM file; pass the folder that holds the whole series")
        raise InputError(
            f"{src}: unsupported file type; expected .nii, .nii.gz, an official Lad .npy crop or a DICOM "
            "series folder"
        )
    expected = "; ".join(f"{name}: {_EXPECTED[name]}" for name in LAYOUTS)
    raise InputError(f"{src}: no dataset layout matches this folder; expected one of ({expected})")

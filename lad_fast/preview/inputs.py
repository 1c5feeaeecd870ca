"""What ``lad-fast preview`` shows: the volumes behind its arguments, with their masks and organ names.

An argument is one of:

* a NIfTI file or DICOM folder (``--mask`` outlines it when it is the only one); an image inside a
  generated dataset (``OUT/images/<id>.nii.gz``) brings its mask from ``OUT/masks/``;
* a generated dataset folder (``manifest.jsonl`` or ``dataset.json`` beside ``images/``): its first
  ``n`` volumes, with their masks;
* a prepared dataset (``index.json``): the cases named by ``--case``, else its first ``n``;
* a prepared case folder ``PREPARED/cases/<id>``.

Organ names come from the data, never "label 1..11": a generated dataset's ``dataset.json`` labels, a
prepared dataset's canonical organs; for a raw label map, ``--vocabulary``, a ``labels.json``
(``{"vocabulary": ...}``) beside it, or its layout (:func:`raw_mask_vocabulary`). Names also pick the
outline colours, so one organ has one colour in a raw map, a prepared case and a generated volume.
Every title names where the volume comes from: the dataset folder and, where known, the preset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lad_fast.errors import ConfigError, InputError
from lad_fast.organs import CANONICAL_ORGANS

DEFAULT_N = 4  # volumes taken from a folder without --n

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
# Every mask lad-fast writes (prepared, generated) holds canonical ids.
CANONICAL_NAMES: dict[int, str] = dict(enumerate(CANONICAL_ORGANS))


@dataclass(frozen=True)
class PreviewItem:
    """One volume to show: ``hu`` (D, H, W) float32 HU, ``mask`` (D, H, W) ids or None, ``spacing`` mm
    along (D, H, W), ``names`` {id: organ name} for the legend and colours (None: unknown)."""

    title: str
    hu: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    names: dict[int, str] | None


def _generated_root(path: Path) -> Path | None:
    """The generated dataset ``path`` is (or whose ``images/`` or ``masks/`` it is in), else None."""
    from lad_fast.generate.writer import DATASET_JSON, IMAGES, MANIFEST

    for root in (path, path.parent):
        if (root / IMAGES).is_dir() and ((root / MANIFEST).is_file() or (root / DATASET_JSON).is_file()):
            return root
    return None


def _generated_names(root: Path) -> dict[int, str]:
    """{id: organ} from ``dataset.json`` labels ({name: id}); the canonical organs before it exists."""
    from lad_fast.generate.writer import DATASET_JSON

    try:
        labels = json.loads((root / DATASET_JSON).read_text(encoding="utf-8"))["labels"]
        names = {int(i): str(name) for name, i in labels.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return dict(CANONICAL_NAMES)  # not finalised yet (or edited): generated masks are canonical
    return names


# How a raw label map's vocabulary is named in a title.
VOCABULARY_TITLES = {
    "totalseg": "TotalSegmentator ids",
    "abdomenct1k": "AbdomenCT-1K ids",
    "lad": "Lad ids",
    "canonical": "canonical ids",
}


def _labels_json_vocabulary(mask: Path) -> str | None:
    """The vocabulary a ``labels.json`` beside the mask (or its folder) names, else None."""
    for folder in (mask.parent, mask.parent.parent):
        meta = folder / "labels.json"
        if meta.is_file():
            try:
                vocab = json.loads(meta.read_text(encoding="utf-8")).get("vocabulary")
            except (OSError, ValueError, AttributeError):
                return None
            return vocab if vocab in VOCABULARY_TITLES else None
    return None


def raw_mask_vocabulary(mask: Path, ids: np.ndarray) -> str | None:
    """The vocabulary of a raw label map, as ``prepare``'s layouts would read it: ``labels.json`` beside
    it; TotalSegmentator for an organ folder, a ``seg.nii.gz`` or a file in ``segmentations/``;
    AbdomenCT-1K for ``Case_XXXXX.nii.gz``; Lad for an official ``.npy`` crop; TotalSegmentator for any
    map holding ids above the canonical ones (only its vocabulary has them). None when it cannot tell."""
    import re

    from lad_fast.data.io import is_npy
    from lad_fast.organs import NUM_CLASSES

    named = _labels_json_vocabulary(mask)
    if named is not None:
        return named
    if mask.is_dir() or mask.name.startswith("seg.nii") or mask.parent.name == "segmentations":
        return "totalseg"
    if re.fullmatch(r"Case_\d+\.nii(\.gz)?", mask.name):
        return "abdomenct1k"
    if is_npy(mask):
        return "lad"
    if ids.size and int(ids.max()) >= NUM_CLASSES:
        return "totalseg"
    return None


def vocabulary_names(vocabulary: str) -> dict[int, str]:
    """{id: name} of a vocabulary for the legend (TotalSegmentator with its vertebral levels)."""
    from lad_fast.data.labels import VOCABULARIES

    if vocabulary == "totalseg":
        return dict(TOTALSEG_NAMES)
    if vocabulary not in VOCABULARIES:
        raise ConfigError(f"unknown vocabulary {vocabulary!r}; choose one of {', '.join(VOCABULARIES)}")
    return dict(VOCABULARIES[vocabulary])


def _source_title(path: Path) -> str:
    """``<dataset folder>/<file>``: where a raw volume sits (``<dataset>/images/<file>`` in a layout that
    keeps images in a subfolder), and its name."""
    parent = path.resolve().parent
    if parent.name in ("images", "imagesTr", "imagesTs") and parent.parent.name:
        return f"{parent.parent.name}/{parent.name}/{path.name}"
    return f"{parent.name}/{path.name}" if parent.name else path.name


def _read_volume(
    image: Path, mask: Path | None, names: dict[int, str] | None, vocabulary: str | None = None
) -> PreviewItem:
    """A raw image (and label map). ``names`` None: from ``vocabulary`` or :func:`raw_mask_vocabulary`."""
    from lad_fast.data.geometry import canonical_dhw
    from lad_fast.data.io import read_image, read_labels

    hu, affine = canonical_dhw(read_image(image))
    spacing = tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    lab = None
    title = _source_title(image)
    if mask is not None:
        lab, _ = canonical_dhw(read_labels(mask))
        if lab.shape != hu.shape:
            raise InputError(f"{mask}: mask shape {lab.shape} differs from image {image} shape {hu.shape}")
        if names is None:
            vocab = vocabulary or raw_mask_vocabulary(mask, lab)
            names = None if vocab is None else vocabulary_names(vocab)
            ids = "label ids unknown: pass --vocabulary" if vocab is None else VOCABULARY_TITLES[vocab]
            title = f"{title} + {mask.name} ({ids})"
    return PreviewItem(title, np.asarray(hu, np.float32), lab, spacing, names)  # type: ignore[arg-type]


def _generated_items(root: Path, n: int) -> list[PreviewItem]:
    from lad_fast.generate.writer import is_complete, read_manifest, volume_paths

    records = {i: r for i, r in read_manifest(root).items() if is_complete(root, r)}
    if not records:
        raise InputError(f"{root}: a generated dataset without any complete volume yet; nothing to show")
    names = _generated_names(root)
    items = []
    for i in sorted(records)[:n]:
        image, mask = volume_paths(root, records[i]["id"])
        item = _read_volume(image, mask if mask.is_file() else None, names)
        items.append(PreviewItem(_generated_title(root, records[i]), item.hu, item.mask, item.spacing, names))
    return items


def _preset_of(prepared: str | None) -> str | None:
    """The preset recorded in the ``index.json`` of the prepared dataset at ``prepared``, else None."""
    from lad_fast.data.prepared import INDEX

    try:
        preset = json.loads((Path(str(prepared)) / INDEX).read_text(encoding="utf-8")).get("preset")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return preset if isinstance(preset, str) else None


def _generated_title(root: Path, rec: dict) -> str:
    """``<dataset>/<id>: <sampler> <steps> steps, guidance <g>[, preset <p>]``; the preset is the one of
    the prepared dataset the volume's masks came from (the manifest's ``source_dataset``)."""
    title = f"{root.resolve().name}/{rec['id']}: {rec.get('sampler')} {rec.get('steps')} steps, "
    title += f"guidance {rec.get('guidance')}"
    preset = _preset_of(rec.get("source_dataset"))
    return title + (f", preset {preset}" if preset else "")


def _prepared_items(root: Path, cases: Sequence[str], n: int) -> list[PreviewItem]:
    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.data.prepared import PreparedDataset

    ds = PreparedDataset(root)
    ids = list(cases) or ds.case_ids[:n]
    spacing = tuple(float(s) for s in ds.geometry.spacing)
    items = []
    for case_id in ids:
        ds.entry(case_id)  # InputError naming the cases when there is no such case
        case = ds[ds.case_ids.index(case_id)]
        hu = unit_to_hu(np.asarray(case["image"], np.float32), ds.geometry.hu_window)
        mask = None if case["mask"] is None else np.asarray(case["mask"])
        what = "no mask" if mask is None else "canonical organs"
        title = f"{root.resolve().name}/{case_id}: prepared, preset {ds.preset} ({what})"
        items.append(PreviewItem(title, hu, mask, spacing, dict(CANONICAL_NAMES)))  # type: ignore[arg-type]
    return items


def preview_items(
    sources: Sequence[Path],
    mask: Path | None = None,
    cases: Sequence[str] = (),
    n: int | None = None,
    vocabulary: str | None = None,
) -> list[PreviewItem]:
    """The volumes to show for the arguments of ``lad-fast preview`` (see the module docstring).
    ``vocabulary`` names the ids of ``mask`` (default: :func:`raw_mask_vocabulary`)."""
    from lad_fast.data.prepared import CASES, INDEX

    if not sources:
        raise ConfigError("preview needs at least one image, folder or prepared case")
    if n is not None and n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    count = n or DEFAULT_N
    if mask is not None and len(sources) != 1:
        raise ConfigError(f"--mask outlines one image; got {len(sources)} sources (give one image with it)")
    if vocabulary is not None and mask is None:
        raise ConfigError("--vocabulary names the label ids of --mask; give the label map with --mask")
    items: list[PreviewItem] = []
    for src in sources:
        if not src.exists():
            raise InputError(f"{src}: no such file or folder")
        prepared_case = src.parent.name == CASES and (src.parent.parent / INDEX).is_file()
        is_prepared = src.is_dir() and (src / INDEX).is_file()
        if cases and not is_prepared:
            raise ConfigError(f"--case picks cases of a prepared dataset; {src} is not one (no {INDEX})")
        if mask is not None and (is_prepared or prepared_case or (src.is_dir() and _generated_root(src))):
            raise ConfigError(f"--mask outlines a NIfTI or DICOM image; {src} brings its own masks")
        if is_prepared:
            items += _prepared_items(src, cases, count)
        elif prepared_case:
            items += _prepared_items(src.parent.parent, [src.name], 1)
        elif src.is_dir() and _generated_root(src) == src:
            items += _generated_items(src, count)
        else:
            root = _generated_root(src.parent) if src.is_file() else None
            if mask is None and root is not None and src.parent.name == "images":
                paired = root / "masks" / src.name  # a generated image: outline its own mask
                items.append(_read_volume(src, paired if paired.is_file() else None, _generated_names(root)))
            else:
                items.append(_read_volume(src, mask, None, vocabulary))
    return items


def default_output(sources: Sequence[Path], items: Sequence[PreviewItem]) -> Path:
    """In the current folder: ``<name>.png`` for one source (a case id for a prepared case), else
    ``preview.png``."""
    if len(sources) != 1:
        return Path("preview.png")
    stem = sources[0].resolve().name
    for ext in (".nii.gz", ".nii"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return Path(f"{stem or 'preview'}.png")


def check_output(out: Path) -> None:
    """Refuse a PNG path inside a generated dataset's ``images/`` or ``masks/`` (its readers list those
    folders) and anything but a ``.png``."""
    from lad_fast.generate.writer import IMAGES, MASKS

    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: a preview is a PNG; give a path ending in .png")
    parent = out.resolve().parent
    if parent.name in (IMAGES, MASKS) and _generated_root(parent.parent) is not None:
        raise ConfigError(
            f"--out {out} is inside the generated dataset {parent.parent}'s {parent.name}/, which holds only "
            "its volumes; write the preview elsewhere (the current folder by default)"
        )

"""A generated dataset's folder: its layout, manifest, ``dataset.json``, atomic writes and resume.

Layout (DESIGN.md "Generated datasets")::

    out/images/<id>.nii.gz     int16 HU on the source case's prepared grid (preset spacing)
    out/masks/<id>.nii.gz      uint8 canonical ids: the augmented mask whose conditions made the image
    out/manifest.jsonl         one JSON line per volume (written after both files)
    out/dataset.json           nnU-Net v2 fields (channel_names, labels, numTraining, file_ending) and the
                               MSD-style ``training`` list of images/ + masks/ that MONAI reads

With layout ``"nnunet"`` the folder also holds nnU-Net v2's own raw-dataset view of the same volumes::

    out/imagesTr/<id>_0000.nii.gz   hard links to images/<id>.nii.gz (copies where links are refused)
    out/labelsTr/<id>.nii.gz        hard links to masks/<id>.nii.gz

so ``out`` is an nnU-Net raw dataset (name it ``$nnUNet_raw/Dataset<NNN>_<Name>``) and every lad-fast
reader (evaluation, preview, SSL) still finds images/ and masks/; hard links cost no space. The view is
(re)built by :func:`finalize` from the complete volumes, so resume and the manifest are the same in both
layouts; once a folder has the view, every later finalize keeps it in step with the manifest.

A volume's two files are written atomically and its manifest line appended afterwards, so a volume is
complete when its line exists and both files are there; a rerun with the same settings skips complete
volumes. Under ``torchrun`` rank r appends to ``manifest.rank<r>.jsonl``; :func:`finalize` merges the
shards. Readers (evaluation, for instance) use :func:`read_manifest` and :func:`volume_paths`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.errors import ConfigError, DiskFullError, InputError, LadFastError, OutputExistsError

IMAGES, MASKS = "images", "masks"
IMAGES_TR, LABELS_TR = "imagesTr", "labelsTr"  # nnU-Net v2's raw-dataset folders
LAYOUTS = ("default", "nnunet")
MANIFEST = "manifest.jsonl"
DATASET_JSON = "dataset.json"
_SHARD_RE = re.compile(r"^manifest\.rank\d+\.jsonl$")
_ID_RE = re.compile(r"lad_\d{6,}")
# Settings that make two volumes with the same id the same volume; a rerun must match them to resume.
IDENTITY = ("base_seed", "sampler", "steps", "guidance", "augment", "source_dataset", "diffusion_checkpoint")


def volume_id(i: int) -> str:
    """File stem of volume ``i`` (fixed width, so ids sort like indices and do not depend on n)."""
    return f"lad_{i:06d}"


def volume_paths(out: Path, vid: str) -> tuple[Path, Path]:
    """(image, mask) paths of volume ``vid`` in ``out``; ``vid`` comes from a manifest, so it is checked to
    be a plain volume id (``lad_`` and digits) before it becomes a path."""
    if not isinstance(vid, str) or not _ID_RE.fullmatch(vid):
        raise InputError(f"{Path(out) / MANIFEST}: {vid!r} is not a volume id; the manifest is damaged")
    return Path(out) / IMAGES / f"{vid}.nii.gz", Path(out) / MASKS / f"{vid}.nii.gz"


def nnunet_paths(out: Path, vid: str) -> tuple[Path, Path]:
    """(image, label) paths of volume ``vid`` in nnU-Net v2's view: ``imagesTr/<id>_0000.nii.gz`` (channel
    0, CT) and ``labelsTr/<id>.nii.gz``; ``vid`` is checked as in :func:`volume_paths`."""
    volume_paths(out, vid)
    return Path(out) / IMAGES_TR / f"{vid}_0000.nii.gz", Path(out) / LABELS_TR / f"{vid}.nii.gz"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}; use one of them")


def _volume_file(name: str) -> bool:
    return name.endswith(".nii.gz") and bool(_ID_RE.fullmatch(name[: -len(".nii.gz")]))


def _view_file(folder: str, name: str) -> bool:
    """Whether ``name`` in ``imagesTr/`` or ``labelsTr/`` is a file of the nnU-Net view."""
    if folder == IMAGES_TR:
        return name.endswith("_0000.nii.gz") and bool(_ID_RE.fullmatch(name[: -len("_0000.nii.gz")]))
    return _volume_file(name)


def _ownership(out: Path) -> tuple[list[str], list[str]]:
    """(entries of ``out`` generate did not write, by relative name; of those, the ones it must write
    over: a ``dataset.json`` or manifest that is not its own). Dot-files are never counted (a temporary
    of ours is cleaned, anything else left alone); a ``lad_NNNNNN.nii.gz`` under ``images/`` or
    ``masks/`` is ours (a volume whose manifest line a kill prevented), and so are the nnU-Net view's
    files under ``imagesTr/`` and ``labelsTr/``."""
    foreign, blocking = [], []
    for p in sorted(out.iterdir()):
        name = p.name
        if name.startswith("."):
            continue
        if name in (IMAGES, MASKS) and p.is_dir():
            foreign += [f"{name}/{q.name}" for q in sorted(p.iterdir()) if not q.name.startswith(".")
                        and not (_volume_file(q.name) and q.is_file())]  # fmt: skip
        elif name in (IMAGES_TR, LABELS_TR) and p.is_dir():
            foreign += [f"{name}/{q.name}" for q in sorted(p.iterdir()) if not q.name.startswith(".")
                        and not (_view_file(name, q.name) and q.is_file())]  # fmt: skip
        elif name == DATASET_JSON and p.is_file():
            try:
                ours = json.loads(p.read_text(encoding="utf-8")).get("name") == "lad-fast-generated"
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                ours = False
            if not ours:
                foreign.append(name)
                blocking.append(name)
        elif (name == MANIFEST or _SHARD_RE.match(name)) and p.is_file():
            if not all(_checked(r, p) is not None for r in _read_lines(p)):
                foreign.append(name)
                blocking.append(name)
        else:
            foreign.append(name)
    return foreign, blocking


def _remove_volumes(out: Path) -> None:
    """``--force`` with other settings: delete the volumes the manifest lists (with their nnU-Net view
    files), the manifest (and shards) and generate's own ``dataset.json``; nothing else."""
    for rec in read_manifest(out).values():
        for path in (*volume_paths(out, rec["id"]), *nnunet_paths(out, rec["id"])):
            path.unlink(missing_ok=True)
    for p in out.iterdir():
        if (p.name in (MANIFEST, DATASET_JSON) or _SHARD_RE.match(p.name)) and p.is_file():
            p.unlink()  # _ownership has refused a dataset.json or manifest that is not ours


def _clean_leftovers(out: Path) -> None:
    """Remove the hidden temporaries a killed ``generate`` left (its own names only)."""
    from lad_fast.utils.atomic import remove_temporaries

    remove_temporaries(out, lambda t: t in (MANIFEST, DATASET_JSON) or bool(_SHARD_RE.match(t)))
    for sub in (IMAGES, MASKS):
        remove_temporaries(out / sub, _volume_file)
    for sub in (IMAGES_TR, LABELS_TR):
        remove_temporaries(out / sub, lambda t, sub=sub: _view_file(sub, t))


def _read_lines(path: Path) -> list[Any]:
    """The JSON values of a manifest's lines; a line that is not JSON (torn by a kill mid-append) is
    skipped, its volume made again. InputError naming the file and line for bytes that are not UTF-8."""
    out = []
    if not path.is_file():
        return out
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path} is unreadable ({err.strerror or err}); check the file") from err
    for n, blob in enumerate(raw.splitlines(), start=1):
        try:
            line = blob.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"{path}: line {n} holds bytes that are not UTF-8; the manifest was damaged: restore it, "
                "delete that line (the volume is then generated again), or choose a new --out"
            ) from err
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill mid-append: its volume is made again
    return out


def _checked(record: Any, path: Path) -> dict[str, Any] | None:
    """A manifest line whose ``index`` is a volume index and whose ``id`` is that index's volume id, so
    the id can become a path (InputError otherwise); None for a line that is not a record at all."""
    if not isinstance(record, dict) or "index" not in record:
        return None
    i = record["index"]
    if isinstance(i, bool) or not isinstance(i, int) or i < 0 or record.get("id") != volume_id(i):
        raise InputError(
            f"{path}: the line of volume {record.get('id')!r} (index {i!r}) was edited or damaged (its id "
            "must be lad_ and the index's six digits); restore it, delete that line (the volume is then "
            "generated again), or choose a new --out"
        )
    return record


def read_manifest(out: Path) -> dict[int, dict[str, Any]]:
    """Manifest lines by volume index (merged manifest and rank shards; the last line of an id wins).

    Every line is checked (:func:`_checked`) before its id can become a path: InputError for an edited one.
    """
    out = Path(out)
    files = [out / MANIFEST]
    files += sorted(p for p in out.glob("manifest.rank*.jsonl") if _SHARD_RE.match(p.name))
    records = [(r, f) for f in files for r in _read_lines(f)]
    return {r["index"]: r for r, f in records if _checked(r, f) is not None}


def is_complete(out: Path, rec: dict[str, Any]) -> bool:
    """Whether the volume of manifest line ``rec`` has both its files (a damaged id counts as missing)."""
    try:
        return all(p.is_file() for p in volume_paths(out, rec.get("id", "")))
    except InputError:
        return False


def _drop_torn_line(path: Path) -> None:
    """Cut a last line left without its newline by a kill mid-append, so the next line starts clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def dataset_json(records: Sequence[dict[str, Any]], description: str) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json`` fields plus the MSD-style ``training`` list MONAI's
    ``load_decathlon_datalist`` reads (paths relative to the dataset folder)."""
    from lad_fast.data.labels import CANONICAL_ORGANS

    return {
        "name": "lad-fast-generated",
        "description": description,
        "tensorImageSize": "3D",
        "channel_names": {"0": "CT"},
        "modality": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(CANONICAL_ORGANS)},
        "numTraining": len(records),
        "file_ending": ".nii.gz",
        "training": [
            {"image": f"./{IMAGES}/{r['id']}.nii.gz", "label": f"./{MASKS}/{r['id']}.nii.gz"} for r in records
        ],
    }


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` already is ``b``: the same inode (a hard link), or a copy of it (size and mtime)."""
    try:
        sa, sb = a.stat(), b.stat()
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or (
        (sa.st_size, sa.st_mtime_ns) == (sb.st_size, sb.st_mtime_ns)
    )


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy with its mtime where the file system refuses
    links), atomically: made under a temporary name and renamed into place."""
    from lad_fast.utils.atomic import atomic_path

    try:
        with atomic_path(dst, suffix=".nii.gz") as tmp:  # a full disk comes out as DiskFullError
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise
                shutil.copy2(src, tmp)  # links refused (some network or FAT file systems): a copy
    except DiskFullError:
        raise
    except OSError as err:
        raise LadFastError(
            f"{dst}: cannot write nnU-Net's view of {src} ({err}); check the folder and rerun the same "
            "command (complete volumes are kept)"
        ) from err


def _sync_nnunet_view(out: Path, records: Sequence[dict[str, Any]]) -> None:
    """Make ``imagesTr/`` and ``labelsTr/`` hold exactly the complete volumes ``records`` (links to their
    images/ and masks/ files): missing ones are linked, stale ones (a volume gone from the manifest, or
    remade since) replaced or removed. Files of other names there are left alone."""
    want: dict[Path, Path] = {}
    for r in records:
        for src, dst in zip(volume_paths(out, r["id"]), nnunet_paths(out, r["id"]), strict=True):
            want[dst] = src
    for sub in (IMAGES_TR, LABELS_TR):
        (out / sub).mkdir(exist_ok=True)
        for p in (out / sub).iterdir():
            if _view_file(sub, p.name) and p not in want:
                p.unlink()
    for dst, src in want.items():
        if not _same_file(dst, src):
            _link(src, dst)


def finalize(
    out: Path, description: str = "synthetic abdominal CT generated by lad-fast", layout: str = "default"
) -> int:
    """Merge manifest shards into ``manifest.jsonl`` (one line per complete volume, by index), delete the
    shards, bring the nnU-Net view in step (layout ``"nnunet"``, or a folder that already has one), write
    ``dataset.json``; returns the number of complete volumes."""
    from lad_fast.utils.atomic import write_json, write_text

    out = Path(out)
    _check_layout(layout)
    records = [r for _, r in sorted(read_manifest(out).items()) if is_complete(out, r)]
    write_text(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in records))
    for shard in out.glob("manifest.rank*.jsonl"):
        if _SHARD_RE.match(shard.name):
            shard.unlink()
    if layout == "nnunet" or (out / IMAGES_TR).is_dir() or (out / LABELS_TR).is_dir():
        _sync_nnunet_view(out, records)
    write_json(out / DATASET_JSON, dataset_json(records, description))
    return len(records)


class VolumeWriter:
    """The output folder as one rank of one ``generate`` call writes it.

    ``settings`` are the run-wide manifest fields (at least :data:`IDENTITY`); ``sharded`` (under
    ``torchrun``) makes this rank append to its own ``manifest.rank<rank>.jsonl``; ``layout``
    ``"nnunet"`` adds nnU-Net v2's view when finalised (see the module docstring). Order of use:
    :meth:`prepare` on rank 0, a barrier, :meth:`todo`, :meth:`write` per volume, a barrier,
    :meth:`finalize` on rank 0.
    """

    def __init__(
        self,
        out: Path,
        settings: dict[str, Any],
        rank: int = 0,
        world: int = 1,
        sharded: bool = False,
        layout: str = "default",
    ):
        _check_layout(layout)
        self.out, self.layout = Path(out), layout
        self.settings = dict(settings)
        self.rank, self.world = rank, world
        self.manifest = self.out / (f"manifest.rank{rank}.jsonl" if sharded else MANIFEST)

    def prepare(self, force: bool) -> None:
        """Refuse foreign files and volumes made with other settings (unless ``force``: then the volumes
        the manifest lists are deleted, nothing else), clean a killed run's temporaries, then create the
        folders. A ``dataset.json`` or manifest generate did not write is refused even with ``force``."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out}: exists and is not a folder; choose another --out")
        if out.is_dir():
            foreign, blocking = _ownership(out)
            if blocking:
                raise OutputExistsError(
                    f"{out}: {' and '.join(blocking)} was not written by generate, which writes its own "
                    "there; move it out of the folder or choose another --out (--force never overwrites it)"
                )
            if foreign and not force:
                shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise OutputExistsError(
                    f"{out}: folder holds files generate did not write ({shown}); choose an empty or new "
                    "--out, or pass --force to write into it anyway (they are kept)"
                )
            s = self.settings
            other = next(
                (r for r in read_manifest(out).values() if any(r.get(k) != s[k] for k in IDENTITY)), None
            )
            if other is not None and not force:
                diff = [f"{k}: {other.get(k)!r} -> {s[k]!r}" for k in IDENTITY if other.get(k) != s[k]]
                raise OutputExistsError(
                    f"{out}: holds volumes generated with other settings ({'; '.join(diff)}); rerun with the "
                    "same settings to complete them, choose a new --out, or pass --force to replace them"
                )
            if other is not None:
                _remove_volumes(out)
            _clean_leftovers(out)
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        (out / MASKS).mkdir(parents=True, exist_ok=True)

    def todo(self, n: int) -> list[int]:
        """This rank's indices among ``range(n)`` (``i % world == rank``) that are not complete yet.

        Also cuts a line of this rank's manifest torn by a kill, so the next append starts clean.
        """
        done = read_manifest(self.out)
        _drop_torn_line(self.manifest)
        return [
            i
            for i in range(n)
            if i % self.world == self.rank and not (i in done and is_complete(self.out, done[i]))
        ]

    def write(
        self, i: int, hu: np.ndarray, mask: np.ndarray, affine: np.ndarray, fields: dict[str, Any]
    ) -> None:
        """Volume ``i``: image (D, H, W) HU and mask (D, H, W) canonical ids on the grid of the (4, 4)
        ``affine``, each written atomically, then its manifest line ``{id, index, **fields, rank}``.
        On failure nothing of this volume stays, and the error says how to go on."""
        from lad_fast.data.geometry import dhw_to_nifti
        from lad_fast.data.io import write_nifti
        from lad_fast.utils.atomic import append_line

        vid = volume_id(i)
        paths = volume_paths(self.out, vid)
        record = {"id": vid, "index": i, **fields, "rank": self.rank}
        try:
            write_nifti(paths[0], *dhw_to_nifti(hu, affine), kind="image")
            write_nifti(paths[1], *dhw_to_nifti(mask, affine), kind="labels")
            append_line(self.manifest, json.dumps(record))
        except OSError as err:
            for p in paths:
                p.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise LadFastError(
                    f"{self.out}: no space left on device while writing volume {vid}; free some space and "
                    "rerun the same command: complete volumes are kept and the rest is generated"
                ) from err
            raise LadFastError(
                f"{self.out}: cannot write volume {vid} ({err}); check the folder and rerun"
            ) from err

    def finalize(self) -> int:
        """Merge the shards, write ``dataset.json`` (rank 0, after every rank wrote); see :func:`finalize`."""
        return finalize(self.out, layout=self.layout)

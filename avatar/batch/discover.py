"""Finding the subjects of a dataset folder and the protocol each is evaluated with.

Discovery is shallow on purpose: it only looks at folder names and the layout marker files, never parses them, so a
subject with a broken file is still found and then fails inside its own job (recorded in its result) instead of
stopping the whole batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from avatar.data.params import METADATA_FILE
from avatar.data.protocols import get_protocol

ZJU_NAME = re.compile(r"^(?:CoreView|my)_(\d+)$")
LAYOUT_MARKERS = ("annots.npy", "cameras.npz", "camera.pkl")  # ZJU-MoCap, InstantAvatar, PeopleSnapshot raw

# Protocol names of the papers' tables -> our protocol names (``avatar.data.protocols``), per dataset.
ZJU_ALIASES = {"gauhuman": "zju_monocular", "gart": "zju_monocular", "instant_nvr": "zju_monocular",
               "monocular": "zju_monocular", "3dgs_avatar": "zju_3dgs_avatar", "neural_body": "zju_multiview",
               "multiview": "zju_multiview"}
SNAPSHOT_ALIASES = ("peoplesnapshot", "gart", "instant_avatar", "instantavatar", "3dgs_avatar")
SYNTHETIC_RULE = "synthetic"


@dataclass(frozen=True)
class Subject:
    """id: the name in the tables; folder: its dataset folder."""

    id: str
    folder: Path


def _is_subject_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any((path / m).exists() for m in LAYOUT_MARKERS)


def find_subjects(dataset: str, root: str | Path) -> list[Subject]:
    """Every subject under ``root`` (sorted by id).

    zju_mocap: ``CoreView_<n>`` or ``my_<n>`` folders with ``annots.npy``, id ``<n>`` (``my_<n>``, the refined layout
    GauHuman and Instant-NVR use, wins when both exist). peoplesnapshot: folders with ``camera.pkl`` (raw) or
    ``cameras.npz`` (InstantAvatar), id = folder name. synthetic: folders with a layout marker and
    ``body_model.json`` (written by ``avatar.data.writers``), id = folder name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset root folder")
    found: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if not _is_subject_folder(path):
            continue
        if dataset == "zju_mocap":
            m = ZJU_NAME.match(path.name)
            if m is None or not (path / "annots.npy").is_file():
                continue
            sid = m.group(1)
            if sid in found and not path.name.startswith("my_"):
                continue
            found[sid] = path
        elif dataset == "peoplesnapshot":
            if (path / "cameras.npz").exists() or (path / "camera.pkl").exists():
                found[path.name] = path
        elif dataset == "synthetic":
            if (path / METADATA_FILE).exists():
                found[path.name] = path
        else:
            raise ValueError(f"unknown dataset kind {dataset!r}; known: zju_mocap, peoplesnapshot, synthetic")
    return [Subject(k, found[k]) for k in sorted(found, key=lambda s: (len(s), s) if s.isdigit() else (0, s))]


def select_subjects(dataset: str, root: str | Path, wanted: tuple[str, ...] | list[str] = ()) -> list[Subject]:
    """The subjects named in ``wanted`` (ids or folder names, in that order), or all of them when it is empty.
    An unknown name or an empty root is a ``ValueError`` that lists what exists."""
    subjects = find_subjects(dataset, root)
    if not subjects:
        raise ValueError(f"{root}: no {dataset} subject folders found (expected "
                         + {"zju_mocap": "CoreView_<n> or my_<n> folders with annots.npy",
                            "peoplesnapshot": "folders with camera.pkl or cameras.npz",
                            "synthetic": "folders with body_model.json and annots.npy / cameras.npz"}[dataset] + ")")
    if not wanted:
        return subjects
    by_name = {s.id: s for s in subjects} | {s.folder.name: s for s in subjects}
    unknown = [w for w in wanted if str(w) not in by_name]
    if unknown:
        raise ValueError(f"{root}: unknown {dataset} subject(s) {', '.join(map(str, unknown))}; found: "
                         f"{', '.join(s.id for s in subjects)}")
    picked: list[Subject] = []
    for w in wanted:
        s = by_name[str(w)]
        if s not in picked:
            picked.append(s)
    return picked


def resolve_protocol(dataset: str, protocol: str | None, subject: Subject) -> str:
    """The protocol name a subject's job evaluates with (validated), or ``"synthetic"`` for the synthetic rule."""
    if dataset == "synthetic" and protocol in (None, SYNTHETIC_RULE):
        return SYNTHETIC_RULE
    if dataset == "peoplesnapshot" and (protocol is None or protocol.lower() in SNAPSHOT_ALIASES):
        name = f"peoplesnapshot/{subject.id}"
    elif protocol is None:
        name = "zju_monocular" if dataset == "zju_mocap" else protocol
    else:
        name = ZJU_ALIASES.get(protocol.lower(), protocol) if dataset != "peoplesnapshot" else protocol
    if name is None:
        raise ValueError(f"no protocol given for dataset {dataset!r}")
    proto = get_protocol(name)  # ValueError listing the known ones
    expected = {"zju_mocap": "zju_mocap", "peoplesnapshot": "peoplesnapshot"}.get(dataset)
    if expected is not None and proto.dataset != expected:
        raise ValueError(f"protocol {name!r} is for {proto.dataset}, not {dataset}")
    return proto.name


def synthetic_splits(num_frames: int, num_cameras: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The split rule of synthetic subjects, {split: (frames, cameras)}, like ``fit_avatar --demo``.

    The last fifth of the sequence (at least one frame) is held out as novel poses, seen from every camera; the rest
    is trained on from camera 0; novel views are the other cameras at up to 6 evenly spread training frames (a
    one-camera subject has no novel-view split).
    """
    if num_frames < 2:
        raise ValueError(f"a synthetic subject needs at least 2 frames (train + held-out pose), got {num_frames}")
    if num_cameras < 1:
        raise ValueError(f"a synthetic subject needs at least 1 camera, got {num_cameras}")
    n_test = max(1, num_frames // 5)
    n_train = num_frames - n_test
    out = {"train": (tuple(range(n_train)), (0,))}
    if num_cameras > 1:
        out["novel_view"] = (tuple(range(0, n_train, max(1, n_train // 6))), tuple(range(1, num_cameras)))
    out["novel_pose"] = (tuple(range(n_train, num_frames)), tuple(range(num_cameras)))
    return out

"""Named evaluation protocols (see /work/shared/REFERENCES.md): which frames and cameras each split uses, at which
resolution, on which background.

Cameras are 0-based indices into the dataset's camera list (ZJU: the order of ``annots.npy``; 3DGS-Avatar's camera
"1" is index 0). Frame ranges are inclusive of ``last`` as the papers state them ("0-495 step 5" = 0, 5, ..., 495).
A protocol can be fitted to a shorter subject (``Protocol.for_subject``): frames clipped to what exists, or the
ranges scaled proportionally onto the subject's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FrameRange:
    """Frames ``first, first + step, ...`` up to and including ``last``."""

    first: int
    last: int
    step: int = 1

    def __post_init__(self) -> None:
        if self.step < 1 or self.first < 0 or self.last < self.first:
            raise ValueError(f"FrameRange needs 0 <= first <= last and step >= 1, got {self}")

    def indices(self, num_frames: int | None = None) -> tuple[int, ...]:
        """The frames, clipped to ``num_frames`` when given."""
        stop = self.last + 1 if num_frames is None else min(self.last + 1, num_frames)
        return tuple(range(self.first, stop, self.step))


@dataclass(frozen=True)
class Split:
    """frames: the frames used; cameras: camera indices (``None``: every camera not in ``exclude_cameras``)."""

    frames: FrameRange
    cameras: tuple[int, ...] | None = (0,)
    exclude_cameras: tuple[int, ...] = ()

    def camera_indices(self, num_cameras: int) -> tuple[int, ...]:
        if self.cameras is None:
            return tuple(c for c in range(num_cameras) if c not in self.exclude_cameras)
        return self.cameras


@dataclass(frozen=True)
class Protocol:
    """A named protocol.

    dataset: "zju_mocap" or "peoplesnapshot". splits: (split name, Split) pairs ("train", "test", "novel_view",
    "novel_pose"). resolution: (H, W) images are resized to, or None. background: what evaluation composites the
    masked person on (the loader leaves images untouched; the caller applies it).
    """

    name: str
    dataset: str
    splits: tuple[tuple[str, Split], ...]
    resolution: tuple[int, int] | None
    background: str = "black"
    source: str = ""

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.splits)

    def split(self, name: str) -> Split:
        for n, s in self.splits:
            if n == name:
                return s
        raise ValueError(f"protocol {self.name!r} has no split {name!r}; its splits are {', '.join(self.split_names)}")

    def select(self, split: str, num_frames: int, num_cameras: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(frames, cameras) of ``split`` for a subject with ``num_frames`` frames and ``num_cameras`` cameras;
        an error if the subject lacks a frame or camera the protocol uses (see ``for_subject``)."""
        s = self.split(split)
        frames = s.frames.indices()
        cameras = s.camera_indices(num_cameras)
        if frames[-1] >= num_frames:
            raise ValueError(f"protocol {self.name!r} split {split!r} uses frame {frames[-1]}, the subject has "
                             f"{num_frames} frames; use Protocol.for_subject(...) for a shorter subject")
        bad = [c for c in cameras if not 0 <= c < num_cameras]
        if bad:
            raise ValueError(f"protocol {self.name!r} split {split!r} uses cameras {bad}, the subject has "
                             f"{num_cameras} cameras")
        return frames, cameras

    @property
    def span(self) -> int:
        """Frames the protocol covers (the last frame used + 1)."""
        return max(s.frames.last for _, s in self.splits) + 1

    def for_subject(self, num_frames: int, num_cameras: int | None = None, mode: str = "clip") -> "Protocol":
        """The same protocol on a shorter (synthetic) subject.

        mode "clip": keep the frames that exist. mode "scale": map every range proportionally onto
        ``[0, num_frames)`` (steps scaled too, at least 1), so train/test keep their relative place and sizes.
        Cameras beyond ``num_cameras`` are dropped; a split left without frames or cameras is an error.
        """
        if mode not in ("clip", "scale"):
            raise ValueError(f"mode must be 'clip' or 'scale', got {mode!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        factor = min(1.0, num_frames / self.span)
        splits = []
        for name, s in self.splits:
            fr = s.frames
            if mode == "scale":
                first = min(num_frames - 1, math.floor(fr.first * factor))
                last = min(num_frames - 1, max(first, math.floor((fr.last + 1) * factor) - 1))  # half-open, no overlap
                fr = FrameRange(first, last, max(1, round(fr.step * factor)))
            elif fr.first >= num_frames:
                raise ValueError(f"protocol {self.name!r} split {name!r} starts at frame {fr.first}, the subject has "
                                 f"{num_frames} frames; use mode='scale'")
            else:
                fr = FrameRange(fr.first, min(fr.last, num_frames - 1), fr.step)
            cams = s.cameras
            if num_cameras is not None and cams is not None:
                cams = tuple(c for c in cams if c < num_cameras)
                if not cams:
                    raise ValueError(f"protocol {self.name!r} split {name!r} uses cameras {s.cameras}, the subject "
                                     f"has {num_cameras}")
            splits.append((name, replace(s, frames=fr, cameras=cams)))
        return replace(self, name=f"{self.name}@{num_frames}{'' if mode == 'clip' else 's'}", splits=tuple(splits))


def _zju_monocular() -> Protocol:
    test = Split(FrameRange(0, 480, 30), cameras=None, exclude_cameras=(4,))
    return Protocol(
        "zju_monocular", "zju_mocap",
        (("train", Split(FrameRange(0, 495, 5), (4,))), ("test", test), ("novel_view", test)),
        resolution=(512, 512), background="black", source="GauHuman / GART / Instant-NVR",
    )


def _zju_3dgs_avatar() -> Protocol:
    # 3DGS-Avatar trains on camera "1" over the monocular training range and tests on cameras "2".."23" every 30th
    # frame of that range.
    test = Split(FrameRange(0, 495, 30), cameras=tuple(range(1, 23)))
    return Protocol(
        "zju_3dgs_avatar", "zju_mocap",
        (("train", Split(FrameRange(0, 495, 5), (0,))), ("test", test), ("novel_view", test)),
        resolution=(512, 512), background="black", source="3DGS-Avatar",
    )


def _zju_multiview() -> Protocol:
    # Neural-Body style: 4 training cameras, frames 0-299; novel views on the other cameras over the same frames,
    # novel poses on the frames after them.
    train_cams = (0, 6, 12, 18)
    return Protocol(
        "zju_multiview", "zju_mocap",
        (
            ("train", Split(FrameRange(0, 299, 1), train_cams)),
            ("test", Split(FrameRange(0, 299, 30), None, train_cams)),
            ("novel_view", Split(FrameRange(0, 299, 30), None, train_cams)),
            ("novel_pose", Split(FrameRange(300, 599, 30), None, train_cams)),
        ),
        resolution=(512, 512), background="black", source="Neural Body (4 views)",
    )


_SNAPSHOT = {  # subject: (train first, last, step), (test first, last, step)
    "female-3-casual": ((0, 445, 4), (446, 647, 4)),
    "female-4-casual": ((0, 335, 4), (335, 523, 4)),
    "male-3-casual": ((0, 455, 4), (456, 675, 4)),
    "male-4-casual": ((0, 659, 6), (660, 872, 6)),
}


def _snapshot(subject: str) -> Protocol:
    train, test = _SNAPSHOT[subject]
    t = Split(FrameRange(*test), (0,))
    return Protocol(
        f"peoplesnapshot/{subject}", "peoplesnapshot",
        (("train", Split(FrameRange(*train), (0,))), ("test", t), ("novel_pose", t)),
        resolution=(540, 540), background="black", source="InstantAvatar / GART / 3DGS-Avatar (images 2x downscaled)",
    )


PROTOCOLS: dict[str, Protocol] = {
    p.name: p for p in [_zju_monocular(), _zju_3dgs_avatar(), _zju_multiview(), *(_snapshot(s) for s in _SNAPSHOT)]
}


def get_protocol(name: str) -> Protocol:
    """A protocol by name: ``zju_monocular``, ``zju_3dgs_avatar``, ``zju_multiview``, ``peoplesnapshot/<subject>``
    (also ``peoplesnapshot`` alone is not a protocol: the splits depend on the subject)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None

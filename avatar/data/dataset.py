"""One dataset type over every supported layout: ZJU-MoCap raw / ``my_3XX``, PeopleSnapshot raw / InstantAvatar.

``AvatarDataset(root, protocol, split)`` opens and validates the folder once (file presence, camera keys and shapes,
the body model its parameters belong to) and loads each ``Frame`` lazily in ``__getitem__`` (images, masks and
per-frame parameters are read and checked per item).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from avatar.body import BodyModel
from avatar.data import peoplesnapshot as ps
from avatar.data import zju
from avatar.data.frames import Frame
from avatar.data.protocols import Protocol, get_protocol

LAYOUTS = ("zju", "peoplesnapshot")


def detect_layout(root: str | Path) -> str:
    """"zju" (raw ``CoreView_3XX`` or ``my_3XX``: ``annots.npy``) or "peoplesnapshot" (raw: ``camera.pkl`` +
    ``reconstructed_poses.hdf5``; InstantAvatar: ``cameras.npz``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    if zju.is_zju_folder(root):
        return "zju"
    if ps.is_instant_avatar(root) or ps.is_snapshot_raw(root):
        return "peoplesnapshot"
    raise FileNotFoundError(
        f"{root}: not a known dataset layout: expected annots.npy (ZJU-MoCap), camera.pkl + "
        f"reconstructed_poses.hdf5 (PeopleSnapshot) or cameras.npz (InstantAvatar PeopleSnapshot)"
    )


class AvatarDataset(Dataset):
    """Frames of one subject for one protocol split, as ``avatar.data.frames.Frame`` objects.

    root:        subject folder (layout detected).
    protocol:    a ``Protocol`` or its name (``avatar.data.protocols``), or None for every frame and camera.
    split:       "train", "test", "novel_view" or "novel_pose" (what the protocol defines).
    fit:         how a protocol meets a shorter subject: "error", "clip" (frames that exist) or "scale"
                 (ranges mapped proportionally; see ``Protocol.for_subject``).
    resolution:  (H, W) to resize to; "protocol" (default) takes the protocol's, None keeps the source size.
    body_model:  the body model the parameters belong to (built if None: anny, or SMPL from ``smpl_model_path``,
                 which datasets without ``body_model.json`` require).
    frames / cameras: explicit selections that override the protocol's.
    """

    def __init__(
        self,
        root: str | Path,
        protocol: Protocol | str | None = None,
        split: str = "train",
        *,
        fit: str = "error",
        resolution: tuple[int, int] | str | None = "protocol",
        body_model: BodyModel | None = None,
        smpl_model_path: str | Path | None = None,
        frames: tuple[int, ...] | list[int] | None = None,
        cameras: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.layout = detect_layout(self.root)
        if isinstance(protocol, str):
            protocol = get_protocol(protocol)
        if fit not in ("error", "clip", "scale"):
            raise ValueError(f"fit must be 'error', 'clip' or 'scale', got {fit!r}")
        if self.layout == "zju":
            self.subject = zju.open_zju(self.root)
            num_frames, num_cameras = self.subject.num_frames, self.subject.num_cameras
        else:
            self.subject = ps.open_snapshot(self.root)
            num_frames, num_cameras = self.subject.num_frames, 1
        if protocol is not None:
            expected = "zju_mocap" if self.layout == "zju" else "peoplesnapshot"
            if protocol.dataset != expected:
                raise ValueError(f"{self.root}: protocol {protocol.name!r} is for {protocol.dataset}, this folder is "
                                 f"{expected}")
            if fit != "error":
                protocol = protocol.for_subject(num_frames, num_cameras, mode=fit)
            sel_frames, sel_cams = protocol.select(split, num_frames, num_cameras)
        else:
            sel_frames, sel_cams = tuple(range(num_frames)), tuple(range(num_cameras))
        if frames is not None:
            sel_frames = tuple(int(f) for f in frames)
        if cameras is not None:
            sel_cams = tuple(int(c) for c in cameras)
        for f in sel_frames:
            if not 0 <= f < num_frames:
                raise ValueError(f"{self.root}: frame {f} out of range (0..{num_frames - 1})")
        for c in sel_cams:
            if not 0 <= c < num_cameras:
                raise ValueError(f"{self.root}: camera {c} out of range (0..{num_cameras - 1})")
        self.protocol = protocol
        self.split = split
        self.resolution = (protocol.resolution if protocol is not None else None) if resolution == "protocol" else resolution
        self.frames = sel_frames
        self.cameras = sel_cams
        self.items = tuple((f, c) for f in sel_frames for c in sel_cams)  # frame-major

        info = self.subject.body
        self.body_model = zju.resolve_body_model(self.root, info, body_model, smpl_model_path)
        self._root_heads = zju.RootHeads(self.body_model)
        self._poses = None
        if self.layout == "peoplesnapshot" and self.subject.layout == "instant_avatar":
            self._poses = ps.refined_poses(self.subject, split, sel_frames)

    @property
    def body_model_name(self) -> str:
        return self.subject.body.name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Frame:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        frame, camera = self.items[index]
        if self.layout == "zju":
            return zju.load_zju_frame(self.subject, frame, camera, self._root_heads, self.resolution)
        return ps.load_snapshot_frame(self.subject, frame, self._poses, self.resolution)

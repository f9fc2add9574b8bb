"""PeopleSnapshot loader: the raw release and the InstantAvatar-preprocessed layout.

Raw release (``<subject>/``)::

    camera.pkl                 pickled dict (the dataset's own format; Python 2 pickle, read with latin1):
                               camera_f [2], camera_c [2], camera_k [5] (k1 k2 p1 p2 k3), camera_rt [3] axis-angle,
                               camera_t [3] metres, width, height
    <subject>.mp4              the video (read with PyAV)
    masks.hdf5                 dataset ``masks`` [N, H, W] (foreground > 0)
    reconstructed_poses.hdf5   ``pose`` [N, 72] SMPL axis-angle, ``trans`` [N, 3], ``betas`` [S] or [1, S]

InstantAvatar layout (``<subject>/``)::

    cameras.npz                intrinsic [3, 3], extrinsic [4, 4] world-to-camera, height, width (distortion removed)
    images/image_0000.png      undistorted frames
    masks/mask_0000.npy        undistorted masks [H, W]
    poses.npz                  betas [S] / [1, S], global_orient [N, 3], body_pose [N, 3 (J - 1)], transl [N, 3]
                               (or ``thetas`` [N, 3 J] in place of global_orient + body_pose)
    poses/anim_nerf_{train,val,test}.npz   refined poses of one split only (rows = that split's frames, in order)

SMPL ``global_orient`` + ``transl`` is exactly our ``BodyPose`` convention (root rotation about the root's rest head,
then translation), so no root-head correction is needed. A folder with ``body_model.json`` holds parameters of our
body model (synthetic subjects: betas [1, 6], body_pose [N, 3 * 103]); without it they are SMPL.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar.data.frames import Frame
from avatar.data.params import BodyModelInfo, read_body_model_info
from avatar.data.zju import _distortion, make_frame, read_image
from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.types import BodyPose

RAW_FILES = ("camera.pkl", "masks.hdf5", "reconstructed_poses.hdf5")
IA_CAMERA_FILE = "cameras.npz"
IA_POSES_FILE = "poses.npz"


@dataclass(frozen=True)
class SnapshotPoses:
    """Body parameters of a sequence (or of one split's frames).

    rotations: [N, J, 3] axis-angle (row 0 = global_orient); translation: [N, 3] metres; shape: [S].
    frames:    the sequence frame of each row (``None``: row i is frame i).
    source:    the file they were read from.
    """

    rotations: np.ndarray
    translation: np.ndarray
    shape: np.ndarray
    frames: tuple[int, ...] | None
    source: Path

    def row(self, frame: int) -> int:
        if self.frames is None:
            if not 0 <= frame < len(self.rotations):
                raise ValueError(f"{self.source}: no parameters for frame {frame} (it has {len(self.rotations)} rows)")
            return frame
        try:
            return self.frames.index(frame)
        except ValueError:
            raise ValueError(f"{self.source}: holds the poses of frames {self.frames[0]}..{self.frames[-1]} "
                             f"only, not frame {frame}") from None

    def pose(self, frame: int) -> BodyPose:
        r = self.row(frame)
        return BodyPose(torch.from_numpy(self.rotations[r].copy()), torch.from_numpy(self.translation[r].copy()))


@dataclass(frozen=True)
class SnapshotSubject:
    """An opened PeopleSnapshot subject.

    layout: "raw" or "instant_avatar". K: [3, 3]; D: [5] (zeros for instant_avatar); viewmat: [4, 4] world-to-camera
    (metres); width, height: the source image size; num_frames: frames that have an image, a mask and a pose.
    poses: the sequence's parameters; body: which body model they belong to.
    """

    root: Path
    layout: str
    K: np.ndarray
    D: np.ndarray
    viewmat: np.ndarray
    width: int
    height: int
    num_frames: int
    poses: SnapshotPoses
    body: BodyModelInfo

    @property
    def name(self) -> str:
        return self.root.name

    def video_path(self) -> Path:
        return self.root / f"{self.root.name}.mp4"

    def image_path(self, frame: int) -> Path:
        return self.root / "images" / f"image_{frame:04d}.png"

    def mask_path(self, frame: int) -> Path:
        return self.root / ("masks.hdf5" if self.layout == "raw" else f"masks/mask_{frame:04d}.npy")


def is_snapshot_raw(root: Path) -> bool:
    return all((Path(root) / f).is_file() for f in ("camera.pkl", "reconstructed_poses.hdf5"))


def is_instant_avatar(root: Path) -> bool:
    return (Path(root) / IA_CAMERA_FILE).is_file()


# --- parameters -------------------------------------------------------------------------------------------------


def _array(path: Path, data, key: str) -> np.ndarray:
    if key not in data:
        raise ValueError(f"{path}: no {key!r} (found {sorted(data.keys())})")
    return np.asarray(data[key], dtype=np.float32)


def _make_poses(path: Path, info: BodyModelInfo, global_orient: np.ndarray, body_pose: np.ndarray,
                transl: np.ndarray, betas: np.ndarray, frames: tuple[int, ...] | None) -> SnapshotPoses:
    J, S = info.num_bones, info.shape_dim
    N = global_orient.shape[0] if global_orient.ndim == 2 else -1
    if global_orient.ndim != 2 or global_orient.shape[1] != 3:
        raise ValueError(f"{path}: global_orient has shape {global_orient.shape}, expected (N, 3)")
    if body_pose.shape != (N, 3 * (J - 1)):
        raise ValueError(f"{path}: body_pose has shape {body_pose.shape}, expected ({N}, {3 * (J - 1)}) for "
                         f"{info.name} ({J} bones)")
    if transl.shape != (N, 3):
        raise ValueError(f"{path}: transl has shape {transl.shape}, expected ({N}, 3)")
    if betas.ndim == 2 and betas.shape[0] >= 1 and betas.shape[1] >= S:
        betas = betas[0]
    if betas.ndim != 1 or betas.shape[0] < S:
        raise ValueError(f"{path}: betas has shape {betas.shape}, expected ({S},) or (1, {S})")
    rotations = np.concatenate([global_orient, body_pose], 1).reshape(N, J, 3)
    return SnapshotPoses(rotations, transl, betas[:S].copy(), frames, path)


def read_raw_poses(path: Path, info: BodyModelInfo) -> SnapshotPoses:
    """``reconstructed_poses.hdf5`` (pose [N, 3J], trans [N, 3], betas) -> ``SnapshotPoses``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            pose, trans, betas = (_array(path, f, k) for k in ("pose", "trans", "betas"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read it as HDF5 ({err})") from err
    if pose.ndim != 2 or pose.shape[1] != 3 * info.num_bones:
        raise ValueError(f"{path}: pose has shape {pose.shape}, expected (N, {3 * info.num_bones})")
    return _make_poses(path, info, pose[:, :3], pose[:, 3:], trans, betas, None)


def read_npz_poses(path: Path, info: BodyModelInfo, frames: tuple[int, ...] | None = None) -> SnapshotPoses:
    """InstantAvatar ``poses.npz`` / ``poses/anim_nerf_<split>.npz`` -> ``SnapshotPoses``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pose file")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it as an .npz pose file ({err})") from err
    if "thetas" in data and "global_orient" not in data:
        thetas = _array(path, data, "thetas")
        if thetas.ndim != 2 or thetas.shape[1] != 3 * info.num_bones:
            raise ValueError(f"{path}: thetas has shape {thetas.shape}, expected (N, {3 * info.num_bones})")
        data["global_orient"], data["body_pose"] = thetas[:, :3], thetas[:, 3:]
    go, bp, tr, be = (_array(path, data, k) for k in ("global_orient", "body_pose", "transl", "betas"))
    return _make_poses(path, info, go, bp, tr, be, frames)


# --- opening ----------------------------------------------------------------------------------------------------


def _read_camera_pkl(path: Path) -> dict:
    """``camera.pkl`` is a Python 2 pickle of numpy arrays (the dataset's own format), read with
    ``avatar.io.NumpyOnlyUnpickler``, which builds numpy arrays and plain containers and nothing else."""
    from avatar.io import NumpyOnlyUnpickler

    try:
        with open(path, "rb") as f:
            data = NumpyOnlyUnpickler(f, source=str(path)).load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"{path}: cannot read it as a PeopleSnapshot camera file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def open_snapshot(root: str | Path) -> SnapshotSubject:
    """Open and validate a PeopleSnapshot subject folder (raw release or InstantAvatar layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    info = read_body_model_info(root)
    if is_instant_avatar(root):
        return _open_instant_avatar(root, info)
    for name in RAW_FILES:
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name}: no such file (a raw PeopleSnapshot folder holds "
                                    f"{', '.join(RAW_FILES)} and {root.name}.mp4)")
    path = root / "camera.pkl"
    cam = _read_camera_pkl(path)
    for key in ("camera_f", "camera_c", "width", "height"):
        if key not in cam:
            raise ValueError(f"{path}: no {key!r} (found {sorted(cam)}); the intrinsics need camera_f and camera_c")
    f = np.asarray(cam["camera_f"], dtype=np.float64).reshape(-1)
    c = np.asarray(cam["camera_c"], dtype=np.float64).reshape(-1)
    if f.shape != (2,) or c.shape != (2,):
        raise ValueError(f"{path}: camera_f and camera_c must have 2 values, got {f.shape} and {c.shape}")
    K = np.array([[f[0], 0, c[0]], [0, f[1], c[1]], [0, 0, 1]])
    D = _distortion(path, "camera_k", cam.get("camera_k", np.zeros(5)))
    rt = np.asarray(cam.get("camera_rt", np.zeros(3)), dtype=np.float64).reshape(-1)
    t = np.asarray(cam.get("camera_t", np.zeros(3)), dtype=np.float64).reshape(-1)
    if rt.shape != (3,) or t.shape != (3,):
        raise ValueError(f"{path}: camera_rt and camera_t must have 3 values, got {rt.shape} and {t.shape}")
    viewmat = np.eye(4)
    viewmat[:3, :3] = axis_angle_to_matrix(torch.from_numpy(rt)).numpy()
    viewmat[:3, 3] = t
    if not root.joinpath(f"{root.name}.mp4").is_file():
        raise FileNotFoundError(f"{root / (root.name + '.mp4')}: no such video file")
    poses = read_raw_poses(root / "reconstructed_poses.hdf5", info)
    import h5py

    masks_path = root / "masks.hdf5"
    try:
        with h5py.File(masks_path, "r") as fm:
            if "masks" not in fm:
                raise ValueError(f"{masks_path}: no dataset 'masks' (found {sorted(fm.keys())})")
            num_masks = fm["masks"].shape[0]
    except OSError as err:
        raise ValueError(f"{masks_path}: cannot read it as HDF5 ({err})") from err
    num = min(num_masks, len(poses.rotations))
    return SnapshotSubject(root, "raw", K, D, viewmat, int(cam["width"]), int(cam["height"]), num, poses, info)


def _open_instant_avatar(root: Path, info: BodyModelInfo) -> SnapshotSubject:
    path = root / IA_CAMERA_FILE
    try:
        cam = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it as an .npz camera file ({err})") from err
    for key in ("intrinsic", "extrinsic", "height", "width"):
        if key not in cam:
            raise ValueError(f"{path}: no {key!r} (found {sorted(cam)}); intrinsic, extrinsic, height, width are required")
    K = np.asarray(cam["intrinsic"], dtype=np.float64)
    E = np.asarray(cam["extrinsic"], dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"{path}: intrinsic has shape {K.shape}, expected (3, 3)")
    if E.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"{path}: extrinsic has shape {E.shape}, expected (4, 4)")
    viewmat = np.eye(4)
    viewmat[:3] = E[:3]
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"{root / 'images'}: no such folder (expected images/image_0000.png, ...)")
    if not (root / "masks").is_dir():
        raise FileNotFoundError(f"{root / 'masks'}: no such folder (expected masks/mask_0000.npy, ...)")
    numbers = sorted(int(m.group(1)) for p in (root / "images").iterdir()
                     if (m := re.fullmatch(r"image_(\d+)\.png", p.name)))
    if not numbers:
        raise FileNotFoundError(f"{root / 'images'}: no image_XXXX.png files")
    poses = read_npz_poses(root / IA_POSES_FILE, info)
    num = min(numbers[-1] + 1, len(poses.rotations))
    return SnapshotSubject(root, "instant_avatar", K, np.zeros(5), viewmat, int(cam["width"]), int(cam["height"]),
                           num, poses, info)


def refined_poses(subject: SnapshotSubject, split: str, frames: tuple[int, ...]) -> SnapshotPoses | None:
    """InstantAvatar's refined poses ``poses/anim_nerf_<split>.npz`` for the split's ``frames``, if the file exists.
    Its rows are the split's frames in order; a file with a different row count is an error naming it."""
    path = subject.root / "poses" / f"anim_nerf_{split}.npz"
    if not path.is_file():
        return None
    poses = read_npz_poses(path, subject.body, tuple(frames))
    if len(poses.rotations) != len(frames):
        raise ValueError(f"{path}: has {len(poses.rotations)} poses, the {split!r} split selects {len(frames)} frames")
    return poses


# --- frames -----------------------------------------------------------------------------------------------------


def read_video_frame(path: Path, index: int) -> np.ndarray:
    """Frame ``index`` (0-based) of a video -> uint8 [H, W, 3], seeking to the nearest key frame first."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            tb = stream.time_base
            start = stream.start_time or 0
            if rate is None or tb is None:
                raise ValueError("no frame rate or time base")
            target = start + int(round(index / (rate * tb)))
            container.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                number = int(round(float((frame.pts - start) * tb * rate))) if frame.pts is not None else None
                if number is None or number > index:
                    break
                if number == index:
                    return frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: cannot decode the video ({err})") from err
    raise ValueError(f"{path}: has no frame {index}")


def load_snapshot_mask(subject: SnapshotSubject, frame: int) -> np.ndarray:
    """bool [H, W] mask of one frame."""
    path = subject.mask_path(frame)
    if subject.layout == "raw":
        import h5py

        with h5py.File(path, "r") as f:
            m = np.asarray(f["masks"][frame])
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such mask file")
        try:
            m = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read it as a .npy mask ({err})") from err
        if m.ndim == 3 and m.shape[-1] == 1:
            m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"{path}: mask of frame {frame} has shape {m.shape}, expected (H, W)")
    return m > 0.5 if np.issubdtype(m.dtype, np.floating) else m > 0


def load_snapshot_frame(subject: SnapshotSubject, frame: int, poses: SnapshotPoses | None = None,
                        resolution: tuple[int, int] | None = None) -> Frame:
    """Load one frame as a ``Frame`` (undistorted, optionally resized to ``resolution = (H, W)``, K scaled).
    ``poses`` overrides the sequence poses (e.g. ``refined_poses``)."""
    if not 0 <= frame < subject.num_frames:
        raise ValueError(f"{subject.root}: frame {frame} out of range (0..{subject.num_frames - 1})")
    image = read_video_frame(subject.video_path(), frame) if subject.layout == "raw" else read_image(subject.image_path(frame))
    src = subject.video_path() if subject.layout == "raw" else subject.image_path(frame)
    if image.shape[:2] != (subject.height, subject.width):
        raise ValueError(f"{src}: frame {frame} is {image.shape[1]}x{image.shape[0]}, the camera file says "
                         f"{subject.width}x{subject.height}")
    mask = load_snapshot_mask(subject, frame)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{subject.mask_path(frame)}: mask of frame {frame} is {mask.shape[1]}x{mask.shape[0]}, "
                         f"the image is {image.shape[1]}x{image.shape[0]}")
    poses = poses or subject.poses
    pose = poses.pose(frame)
    shape = torch.from_numpy(poses.shape.copy())
    return make_frame(image, mask, subject.K, subject.D, subject.viewmat, pose, shape, subject.body.name,
                      frame, "0", resolution)

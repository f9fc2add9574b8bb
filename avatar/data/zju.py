"""ZJU-MoCap loader: the raw release (``CoreView_3XX``) and the refined ``my_3XX`` layout used by later work.

Raw release (``CoreView_3XX/``)::

    annots.npy              pickled dict (numpy ``allow_pickle``: the dataset's own format) with
                              cams: {K: [C] 3x3, D: [C] 5 (k1 k2 p1 p2 k3), R: [C] 3x3, T: [C] 3 (millimetres)}
                              ims:  [N] {'ims': [C] image paths relative to the folder}
    Camera_B1/000000.jpg    images (313/315: ``Camera (1)/CoreView_313_Camera_(1)_0001_2019-08-23_16-08-50.592.jpg``,
                            whose frame number is 1-based)
    mask/<image>.png        foreground masks (value > 0), and/or mask_cihp/<image>.png (the union is used)
    new_params/{i}.npy      per-frame parameters (or params/), pickled dict: poses (1, 3J), Rh (1, 3), Th (1, 3),
                            shapes (1, S); i is the frame number in the image name (1-based for 313/315)
    new_vertices/{i}.npy    world vertices (or vertices/), not needed to load frames

Refined layout (``my_3XX/``, instant-nvr / GauHuman): the same ``annots.npy``, images ``images/00/000000.jpg``,
masks at the image path with ``images`` -> ``mask`` and ``.png``, parameters ``smpl_params/{i}.npy`` and vertices
``smpl_vertices/{i}.npy``.

Parameters follow EasyMocap (see ``avatar.data.params``): world = model(poses, shapes) @ R(Rh)^T + Th. A folder
with ``body_model.json`` holds parameters of *our* body model (synthetic subjects); without it they are SMPL and a
SMPL model folder is required. Cameras are returned in metres with distortion removed (images and masks are
undistorted with D, keeping K). Background handling is left to the caller.

The image helpers at the end of this file (reading, undistortion, resizing) are shared by the PeopleSnapshot loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avatar.body import SMPL_DOWNLOAD_HELP, BodyModel
from avatar.data.frames import Frame
from avatar.data.params import METADATA_FILE, BodyModelInfo, easymocap_to_pose, read_body_model_info
from avatar.types import BodyPose, Cameras

ANNOTS_FILE = "annots.npy"
PARAM_DIRS = ("new_params", "params", "smpl_params")  # first one present wins
VERTEX_DIRS = ("new_vertices", "vertices", "smpl_vertices")
RAW_MASK_DIRS = ("mask", "mask_cihp")


# --- subject (validated at open time) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ZJUCamera:
    """One calibrated camera of ``annots.npy`` (numpy, float64).

    K: [3, 3] pixels; D: [5] (k1, k2, p1, p2, k3); R: [3, 3] world-to-camera rotation; T: [3] metres.
    name: the image folder of the camera (``Camera_B1``, ``Camera (1)``, ``00``).
    """

    K: np.ndarray
    D: np.ndarray
    R: np.ndarray
    T: np.ndarray
    name: str

    def viewmat(self) -> np.ndarray:
        """World-to-camera ``[4, 4]``."""
        M = np.eye(4)
        M[:3, :3] = self.R
        M[:3, 3] = self.T
        return M


@dataclass(frozen=True)
class ZJUSubject:
    """An opened ZJU-MoCap subject folder.

    layout:   "raw" (``CoreView_3XX``) or "refined" (``my_3XX``).
    cameras:  one ``ZJUCamera`` per camera index of ``annots.npy``.
    images:   [N][C] image paths relative to ``root`` (frame-major, as in ``annots['ims']``).
    param_dir: the per-frame parameter folder; body: which body model the parameters belong to.
    """

    root: Path
    layout: str
    cameras: tuple[ZJUCamera, ...]
    images: tuple[tuple[str, ...], ...]
    param_dir: Path
    body: BodyModelInfo

    @property
    def num_frames(self) -> int:
        return len(self.images)

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    def param_index(self, frame: int) -> int:
        """The number ``i`` of ``<param_dir>/{i}.npy`` for sequence frame ``frame`` (from the image name)."""
        return frame_number(self.images[frame][0])

    def param_path(self, frame: int) -> Path:
        return self.param_dir / f"{self.param_index(frame)}.npy"

    def image_path(self, frame: int, camera: int) -> Path:
        return self.root / self.images[frame][camera]

    def mask_paths(self, frame: int, camera: int) -> list[Path]:
        """Candidate mask files of one image (the existing ones are united)."""
        rel = Path(self.images[frame][camera]).with_suffix(".png")
        if self.layout == "refined":
            parts = ["mask" if p == "images" else p for p in rel.parts]
            return [self.root / Path(*parts)]
        return [self.root / d / rel for d in RAW_MASK_DIRS]


def is_zju_folder(root: Path) -> bool:
    return (Path(root) / ANNOTS_FILE).is_file()


def frame_number(image_rel: str) -> int:
    """Frame number of a ZJU image name: ``000012.jpg`` -> 12; ``CoreView_313_Camera_(1)_0013_<time>.jpg`` -> 13."""
    stem = Path(image_rel.replace("\\", "/")).stem
    if stem.isdigit():
        return int(stem)
    match = re.search(r"Camera_\(\d+\)_(\d+)", stem) or re.search(r"(\d+)$", stem)
    if match is None:
        raise ValueError(f"cannot read a frame number from the image name {image_rel!r}")
    return int(match.group(1))


def read_annots(path: Path) -> dict:
    """Load ``annots.npy`` (a pickled dict inside an ``.npy``: the dataset's own format, hence ``allow_pickle``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a ZJU-MoCap subject folder holds annots.npy)")
    try:
        data = np.load(path, allow_pickle=True)
        data = data.item() if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0 else data
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: cannot read it as a ZJU-MoCap annotation file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with 'cams' and 'ims', got {type(data).__name__}")
    return data


def _camera_array(path: Path, cams: dict, key: str, index: int, shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    try:
        value = np.asarray(cams[key][index], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: cams[{key!r}][{index}] is not numeric ({err})") from err
    if value.shape not in shapes:
        raise ValueError(f"{path}: cams[{key!r}][{index}] has shape {value.shape}, expected one of {list(shapes)}")
    return value


def open_zju(root: str | Path) -> ZJUSubject:
    """Open and validate a ZJU-MoCap subject folder (raw or ``my_3XX``): annotation keys and shapes, camera count,
    image lists, and the parameter folder. Per-frame files are checked when a frame is loaded."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    path = root / ANNOTS_FILE
    annots = read_annots(path)
    for key in ("cams", "ims"):
        if key not in annots:
            raise ValueError(f"{path}: no {key!r} entry (found {sorted(annots)})")
    cams = annots["cams"]
    if not isinstance(cams, dict):
        raise ValueError(f"{path}: 'cams' must be a dict of K, D, R, T lists, got {type(cams).__name__}")
    for key in ("K", "R", "T"):
        if key not in cams:
            raise ValueError(f"{path}: 'cams' has no {key!r} (found {sorted(cams)}); K, R, T (and D) are required")
    num_cams = len(cams["K"])
    for key in ("R", "T", "D"):
        if key in cams and len(cams[key]) != num_cams:
            raise ValueError(f"{path}: cams[{key!r}] has {len(cams[key])} cameras, cams['K'] has {num_cams}")
    ims = annots["ims"]
    if len(ims) == 0:
        raise ValueError(f"{path}: 'ims' is empty")
    images = []
    for n, entry in enumerate(ims):
        names = entry.get("ims") if isinstance(entry, dict) else None
        if names is None:
            raise ValueError(f"{path}: ims[{n}] must be a dict with an 'ims' list of image paths")
        names = tuple(str(x).replace("\\", "/") for x in names)
        if len(names) != num_cams:
            raise ValueError(f"{path}: ims[{n}] lists {len(names)} images, the file has {num_cams} cameras")
        images.append(names)

    cameras = []
    for c in range(num_cams):
        K = _camera_array(path, cams, "K", c, ((3, 3),))
        R = _camera_array(path, cams, "R", c, ((3, 3),))
        T = _camera_array(path, cams, "T", c, ((3,), (3, 1), (1, 3))).reshape(3) / 1000.0  # millimetres -> metres
        D = np.zeros(5) if "D" not in cams else _distortion(path, f"cams['D'][{c}]", cams["D"][c])
        name = Path(images[0][c]).parent.as_posix()
        cameras.append(ZJUCamera(K, D, R, T, name))

    refined = any(Path(n).parts[:1] == ("images",) for n in images[0])
    param_dir = next((root / d for d in PARAM_DIRS if (root / d).is_dir()), None)
    if param_dir is None:
        raise FileNotFoundError(f"{root}: no parameter folder; expected one of {', '.join(PARAM_DIRS)}")
    body = read_body_model_info(root)
    return ZJUSubject(root, "refined" if refined else "raw", tuple(cameras), tuple(images), param_dir, body)


# --- per-frame parameters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameParams:
    """One frame's EasyMocap parameters: poses [3J] (root part ignored), Rh [3], Th [3] metres, shapes [S]."""

    poses: Tensor
    Rh: Tensor
    Th: Tensor
    shapes: Tensor


def _param_field(path: Path, data: dict, key: str, width: int) -> Tensor:
    if key not in data:
        raise ValueError(f"{path}: no {key!r} (found {sorted(data)})")
    value = np.asarray(data[key], dtype=np.float32)
    if value.size != width or value.ndim > 2 or (value.ndim == 2 and value.shape[0] != 1):
        raise ValueError(f"{path}: {key!r} has shape {value.shape}, expected (1, {width})")
    return torch.from_numpy(value.reshape(width).copy())


def load_zju_params(path: Path, info: BodyModelInfo) -> FrameParams:
    """Read and validate one ``{i}.npy`` parameter file (a pickled dict: the dataset's own format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such parameter file")
    try:
        data = np.load(path, allow_pickle=True)
        data = data.item() if data.dtype == object and data.ndim == 0 else data
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: cannot read it as a parameter file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with poses, Rh, Th, shapes, got {type(data).__name__}")
    return FrameParams(
        poses=_param_field(path, data, "poses", 3 * info.num_bones),
        Rh=_param_field(path, data, "Rh", 3),
        Th=_param_field(path, data, "Th", 3),
        shapes=_param_field(path, data, "shapes", info.shape_dim),
    )


def resolve_body_model(root: Path, info: BodyModelInfo, body_model: BodyModel | None,
                       smpl_model_path: str | Path | None) -> BodyModel:
    """The body model that a dataset's parameters belong to: ``body_model`` if given (checked against ``info``),
    anny built on demand, or SMPL / SMPL-X from ``smpl_model_path`` (required for the real datasets)."""
    if body_model is None:
        if info.name == "anny":
            from avatar.body import AnnyBody

            body_model = AnnyBody()
        elif info.name in ("smpl", "smplx"):
            if smpl_model_path is None:
                raise ValueError(
                    f"{root}: this dataset holds {info.name.upper()} parameters (it has no {METADATA_FILE}), so a "
                    f"SMPL model folder is required: pass smpl_model_path=<folder with smpl/SMPL_NEUTRAL.pkl>.\n"
                    f"{SMPL_DOWNLOAD_HELP}"
                )
            from avatar.body import SMPLBody

            body_model = SMPLBody(smpl_model_path, model_type=info.name)
        else:
            raise ValueError(f"{root / METADATA_FILE}: unknown body model {info.name!r}")
    if body_model.name != info.name or body_model.num_bones != info.num_bones or body_model.shape_dim < 1:
        raise ValueError(
            f"{root}: the parameters belong to {info.name} ({info.num_bones} bones, {info.shape_dim} shape values), "
            f"the given body model is {body_model.name} ({body_model.num_bones} bones)"
        )
    return body_model


class RootHeads:
    """Rest-pose root bone head ``[3]`` per shape, cached (a sequence usually has one shape)."""

    def __init__(self, body: BodyModel) -> None:
        self.body = body
        self._cache: dict[bytes, Tensor] = {}

    def __call__(self, shape: Tensor) -> Tensor:  # shape [S] -> [3]
        key = shape.detach().cpu().numpy().tobytes()
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.body.rest(shape.to(self.body.dtype)).bone_heads[0, 0].float().cpu()
        return self._cache[key]


def params_to_pose(params: FrameParams, root_head: Tensor) -> BodyPose:
    """EasyMocap parameters -> ``BodyPose`` (rotations [J, 3], translation [3]) for the rest root head [3]."""
    return easymocap_to_pose(params.poses, params.Rh, params.Th, root_head.to(params.poses.dtype))


# --- frames -----------------------------------------------------------------------------------------------------


def load_zju_mask(subject: ZJUSubject, frame: int, camera: int) -> np.ndarray:
    """Union of the existing mask files of one image -> bool [H, W]."""
    paths = subject.mask_paths(frame, camera)
    found = [p for p in paths if p.is_file()]
    if not found:
        raise FileNotFoundError(f"{paths[0]}: no mask file for image {subject.images[frame][camera]} "
                                f"(looked for {', '.join(str(p) for p in paths)})")
    mask = None
    for p in found:
        m = read_mask(p)
        if mask is not None and m.shape != mask.shape:
            raise ValueError(f"{p}: mask is {m.shape[1]}x{m.shape[0]}, the other mask is {mask.shape[1]}x{mask.shape[0]}")
        mask = m if mask is None else (mask | m)
    return mask


def load_zju_frame(subject: ZJUSubject, frame: int, camera: int, root_heads: RootHeads,
                   resolution: tuple[int, int] | None = None) -> Frame:
    """Load one (frame, camera) image of an opened subject as a ``Frame``: undistorted image and mask, camera in
    metres without distortion, optionally resized to ``resolution = (H, W)`` (K scaled), and the body pose."""
    if not 0 <= frame < subject.num_frames:
        raise ValueError(f"{subject.root / ANNOTS_FILE}: frame {frame} out of range (0..{subject.num_frames - 1})")
    if not 0 <= camera < subject.num_cameras:
        raise ValueError(f"{subject.root / ANNOTS_FILE}: camera {camera} out of range (0..{subject.num_cameras - 1})")
    cam = subject.cameras[camera]
    image_path = subject.image_path(frame, camera)
    image = read_image(image_path)  # [H, W, 3] uint8
    mask = load_zju_mask(subject, frame, camera)
    H, W = image.shape[:2]
    if mask.shape != (H, W):
        raise ValueError(f"{subject.mask_paths(frame, camera)[0]}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                         f"the image {image_path.name} is {W}x{H}")
    params = load_zju_params(subject.param_path(frame), subject.body)
    pose = params_to_pose(params, root_heads(params.shapes))
    return make_frame(image, mask, cam.K, cam.D, cam.viewmat(), pose, params.shapes, subject.body.name,
                      frame, cam.name, resolution)


def make_frame(image: np.ndarray, mask: np.ndarray, K: np.ndarray, D: np.ndarray, viewmat: np.ndarray,
               pose: BodyPose, shape: Tensor, body_model: str, frame_id: int, camera_id: str,
               resolution: tuple[int, int] | None) -> Frame:
    """uint8 image [H, W, 3], bool mask [H, W], K [3, 3], D [5], viewmat [4, 4] -> undistorted, resized ``Frame``."""
    img = torch.from_numpy(np.array(image, copy=True)).float() / 255.0
    msk = torch.from_numpy(np.array(mask, copy=True)).float()
    Kt = torch.as_tensor(K, dtype=torch.float32)
    if np.any(D != 0):
        img = undistort_image(img, Kt, torch.as_tensor(D, dtype=torch.float32))
        msk = undistort_image(msk[..., None], Kt, torch.as_tensor(D, dtype=torch.float32), mode="nearest")[..., 0]
    H, W = img.shape[:2]
    if resolution is not None and tuple(resolution) != (H, W):
        img, Kt = resize_image(img, Kt, resolution)
        msk = (resize_image(msk[..., None], None, resolution)[0][..., 0] > 0.5).float()
        H, W = resolution
    camera = Cameras(torch.as_tensor(viewmat, dtype=torch.float32), Kt, width=int(W), height=int(H))
    pose = BodyPose(pose.rotations.float(), pose.translation.float())
    return Frame(img.clamp(0, 1), msk, camera, pose, shape.float(), body_model, int(frame_id), str(camera_id))


# --- image helpers (shared with the PeopleSnapshot loader) ------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """RGB image file -> uint8 [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read it as an image ({err})") from err


def read_mask(path: Path) -> np.ndarray:
    """Mask image file -> bool [H, W] (foreground = any channel > 0)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            m = np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read it as a mask image ({err})") from err
    return (m > 0).any(-1) if m.ndim == 3 else m > 0


def _distortion(path: Path, field: str, value) -> np.ndarray:
    """Distortion coefficients of any layout ([5], [5, 1], [1, 5], [4], [8] with zero rational terms) -> [5]."""
    D = np.asarray(value, dtype=np.float64).reshape(-1)
    if D.size < 4:
        raise ValueError(f"{path}: {field} has {D.size} distortion coefficients, expected 4, 5 or more (OpenCV order)")
    if D.size > 5 and np.any(D[5:] != 0):
        raise ValueError(f"{path}: {field} uses the rational/thin-prism distortion model (non-zero coefficients "
                         f"beyond k3), which is not supported")
    return np.concatenate([D[:5], np.zeros(max(0, 5 - D.size))])


def distort_normalized(xy: Tensor, D: Tensor) -> Tensor:
    """OpenCV radial-tangential model: undistorted normalized coords [..., 2] -> distorted [..., 2]; D [5]."""
    k1, k2, p1, p2, k3 = D.unbind(-1)
    x, y = xy.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return torch.stack([xd, yd], -1)


def undistort_normalized(xy_d: Tensor, D: Tensor, iterations: int = 20) -> Tensor:
    """Inverse of ``distort_normalized`` by fixed-point iteration (as OpenCV's ``undistortPoints``): [..., 2]."""
    k1, k2, p1, p2, k3 = D.unbind(-1)
    xy = xy_d
    for _ in range(iterations):
        x, y = xy.unbind(-1)
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        xy = torch.stack([(xy_d[..., 0] - dx) / radial, (xy_d[..., 1] - dy) / radial], -1)
    return xy


def undistort_image(image: Tensor, K: Tensor, D: Tensor, mode: str = "bilinear") -> Tensor:
    """Remove lens distortion, keeping the intrinsics (as ``cv2.undistort(image, K, D)``).

    image: [H, W, C] float; K: [3, 3] pixels (pixel centres at integers, OpenCV); D: [5] (k1, k2, p1, p2, k3).
    mode: "bilinear" for images, "nearest" for masks. Pixels that map outside the source are 0.
    """
    H, W = image.shape[:2]
    K = K.to(torch.float64)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    xy = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]], -1)  # [H, W, 2]
    xy_d = distort_normalized(xy, D.to(torch.float64))
    ud = xy_d[..., 0] * K[0, 0] + K[0, 2]
    vd = xy_d[..., 1] * K[1, 1] + K[1, 2]
    grid = torch.stack([2 * ud / (W - 1) - 1, 2 * vd / (H - 1) - 1], -1).to(image.dtype)  # [H, W, 2]
    out = F.grid_sample(image.permute(2, 0, 1)[None], grid[None], mode=mode, padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0)


def resize_image(image: Tensor, K: Tensor | None, resolution: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Resize image [H, W, C] to ``resolution = (H', W')`` (area average when shrinking, bilinear otherwise) and
    scale K [3, 3] rows by W'/W and H'/H (exact for pixel centres at i + 0.5, the rasterizer's convention; the
    convention of the published ZJU / PeopleSnapshot protocols)."""
    H, W = image.shape[:2]
    h, w = int(resolution[0]), int(resolution[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution must be positive (H, W), got {resolution}")
    x = image.permute(2, 0, 1)[None]
    if h <= H and w <= W:
        x = F.interpolate(x, size=(h, w), mode="area")
    else:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    out = x[0].permute(1, 2, 0)
    if K is None:
        return out, None
    K = K.clone()
    K[0] *= w / W
    K[1] *= h / H
    K[2] = torch.tensor([0.0, 0.0, 1.0], dtype=K.dtype)
    return out, K

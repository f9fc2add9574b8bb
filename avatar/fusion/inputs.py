"""Reading the sparse-view inputs of ``fit_avatar --images ... --cameras cams.json``: images, masks, cameras, pose.

The cameras file (documented with an example in ``avatar/fusion/design.md``)::

    {
      "body_model": "anny",                       # optional, default "anny"
      "shape": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],    # the body model's shape values (anny: 6 phenotype values)
      "pose": {"rotations": [[0, 0, 0], ...],     # [J, 3] axis-angle per bone (avatar.types.BodyPose)
               "translation": [0, 0, 0]},         # [3] metres
      "views": [                                  # one per image, in the order of --images
        {"K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
         "viewmat": [[...], [...], [...], [0, 0, 0, 1]],   # world -> camera, OpenCV axes, metres
         "width": 512, "height": 512,
         "pose": {...}}                           # optional: this view's own body pose (default: the top-level one)
      ]
    }

Every failure names the file and what was wrong (ValueError), as the project's contract for user files requires.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.types import BodyPose, Cameras


@dataclass(frozen=True)
class SparseViews:
    """Loaded sparse-view inputs.

    images:    [V, H, W, 3] float32 in [0, 1].
    masks:     [V, H, W] bool.
    cameras:   ``Cameras`` with viewmats [V, 4, 4], Ks [V, 3, 3].
    poses:     ``BodyPose`` with rotations [V, J, 3], translation [V, 3] (each view's body pose).
    shape:     [S] body shape values.
    body_model: name of the body model ("anny").
    image_paths: the image files, in view order.
    """

    images: Tensor
    masks: Tensor
    cameras: Cameras
    poses: BodyPose
    shape: Tensor
    body_model: str
    image_paths: tuple[Path, ...]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I"):
                im = im.convert("RGBA")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode == "LA":
                im = im.convert("RGBA")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: unreadable image file ({err})") from None
    return arr


def _read_mask(path: Path) -> np.ndarray:
    arr = _read_image(path)
    if arr.ndim == 3:
        arr = arr[..., 3] if arr.shape[-1] == 4 else arr[..., 0]
    return arr.astype(np.float64) > (np.iinfo(arr.dtype).max / 2 if np.issubdtype(arr.dtype, np.integer) else 0.5)


def _matrix(value, shape: tuple[int, int], path: Path, field: str) -> Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field {field} must be a {shape[0]}x{shape[1]} list of numbers, got {value!r}") from None
    if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{path}: field {field} must be a finite {shape[0]}x{shape[1]} matrix, got shape {tuple(t.shape)}")
    return t


def _pose(value, num_bones: int | None, path: Path, field: str) -> BodyPose:
    if not isinstance(value, dict) or "rotations" not in value or "translation" not in value:
        raise ValueError(f"{path}: field {field} must be an object with 'rotations' [J, 3] and 'translation' [3]")
    try:
        rot = torch.tensor(value["rotations"], dtype=torch.float64)
        tr = torch.tensor(value["translation"], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field {field} must hold lists of numbers") from None
    if rot.ndim != 2 or rot.shape[1] != 3 or (num_bones is not None and rot.shape[0] != num_bones):
        want = f"[{num_bones}, 3]" if num_bones is not None else "[J, 3]"
        raise ValueError(f"{path}: field {field}.rotations must be {want} axis-angle, got shape {tuple(rot.shape)}")
    if tuple(tr.shape) != (3,):
        raise ValueError(f"{path}: field {field}.translation must be [3], got shape {tuple(tr.shape)}")
    if not (torch.isfinite(rot).all() and torch.isfinite(tr).all()):
        raise ValueError(f"{path}: field {field} has NaN or infinite values")
    return BodyPose(rot.float(), tr.float())


def read_cameras_json(path: str | Path, num_bones: int | None = None, shape_dim: int | None = None) -> dict:
    """Parse and validate a cameras file -> ``{"body_model", "shape" [S], "views": [{"K", "viewmat", "width",
    "height", "pose"}]}`` with tensors (float32 K, viewmat; ``BodyPose`` per view)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: cameras file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object with 'views', 'shape' and 'pose'")
    body_model = data.get("body_model", "anny")
    if not isinstance(body_model, str):
        raise ValueError(f"{path}: field body_model must be a string, got {body_model!r}")
    if "shape" not in data:
        raise ValueError(f"{path}: missing field 'shape' (the body model's shape values)")
    try:
        shape = torch.tensor(data["shape"], dtype=torch.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field shape must be a list of numbers") from None
    if shape.ndim != 1 or (shape_dim is not None and shape.shape[0] != shape_dim) or not bool(torch.isfinite(shape).all()):
        raise ValueError(f"{path}: field shape must be {shape_dim or 'S'} finite numbers, got shape {tuple(shape.shape)}")
    views = data.get("views")
    if not isinstance(views, list) or not views:
        raise ValueError(f"{path}: field views must be a non-empty list (one per image)")
    top_pose = _pose(data["pose"], num_bones, path, "pose") if "pose" in data else None
    out = []
    for i, v in enumerate(views):
        if not isinstance(v, dict):
            raise ValueError(f"{path}: views[{i}] must be an object")
        for key in ("K", "viewmat", "width", "height"):
            if key not in v:
                raise ValueError(f"{path}: views[{i}] is missing field '{key}'")
        K = _matrix(v["K"], (3, 3), path, f"views[{i}].K")
        vm = _matrix(v["viewmat"], (4, 4), path, f"views[{i}].viewmat")
        if not torch.allclose(vm[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)):
            raise ValueError(f"{path}: views[{i}].viewmat last row must be [0, 0, 0, 1]")
        R = vm[:3, :3]
        if not torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-4) or float(torch.det(R)) < 0:
            raise ValueError(f"{path}: views[{i}].viewmat must be a rigid world-to-camera transform (rotation + translation)")
        if not (K[0, 0] > 0 and K[1, 1] > 0):
            raise ValueError(f"{path}: views[{i}].K must have positive focal lengths")
        for key in ("width", "height"):
            if not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] <= 0:
                raise ValueError(f"{path}: views[{i}].{key} must be a positive integer, got {v[key]!r}")
        if "pose" in v:
            pose = _pose(v["pose"], num_bones, path, f"views[{i}].pose")
        elif top_pose is not None:
            pose = top_pose
        else:
            raise ValueError(f"{path}: no body pose for views[{i}]: give a top-level 'pose' or one per view")
        out.append({"K": K.float(), "viewmat": vm.float(), "width": v["width"], "height": v["height"], "pose": pose})
    return {"body_model": body_model, "shape": shape, "views": out}


def load_sparse_views(image_paths, mask_paths, cameras_path, num_bones: int | None = None,
                      shape_dim: int | None = None) -> SparseViews:
    """Load ``image_paths`` (PNG/JPEG; RGBA images carry their mask in alpha), optional ``mask_paths`` (one per
    image; white = person) and the cameras file. Errors name the file: unreadable files, images of different sizes,
    an image whose size differs from its camera's, a missing mask ("no mask"), a camera count that differs from
    the image count."""
    image_paths = tuple(Path(p) for p in image_paths)
    mask_paths = tuple(Path(p) for p in (mask_paths or ()))
    if not image_paths:
        raise ValueError("--images: give at least one image")
    if mask_paths and len(mask_paths) != len(image_paths):
        raise ValueError(f"--masks: {len(mask_paths)} masks for {len(image_paths)} images; give one per image or none "
                         "(then masks come from the images' alpha channel)")
    cams = read_cameras_json(cameras_path, num_bones, shape_dim)
    if len(cams["views"]) != len(image_paths):
        raise ValueError(f"{cameras_path}: {len(cams['views'])} camera views for {len(image_paths)} images "
                         "(camera count mismatch: one view per image, in the same order)")
    images, masks = [], []
    size = None
    for i, p in enumerate(image_paths):
        arr = _read_image(p)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, -1)
        h, w = arr.shape[:2]
        if size is None:
            size = (h, w, p)
        elif (h, w) != size[:2]:
            raise ValueError(f"{p}: image is {w}x{h} but {size[2]} is {size[1]}x{size[0]}; all images must have the same size")
        view = cams["views"][i]
        if (view["width"], view["height"]) != (w, h):
            raise ValueError(f"{p}: image is {w}x{h} but views[{i}] of {cameras_path} says {view['width']}x{view['height']}")
        scale = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else 1.0
        rgb = torch.from_numpy(arr[..., :3].astype(np.float32) / scale)
        if mask_paths:
            m = _read_mask(mask_paths[i])
            if m.shape != (h, w):
                raise ValueError(f"{mask_paths[i]}: mask is {m.shape[1]}x{m.shape[0]} but its image {p} is {w}x{h}")
        elif arr.shape[-1] == 4:
            m = arr[..., 3].astype(np.float64) / scale > 0.5
        else:
            raise ValueError(f"{p}: no mask: the image has no alpha channel and no --masks were given")
        if not m.any():
            raise ValueError(f"{mask_paths[i] if mask_paths else p}: the mask is empty (no person pixel)")
        images.append(rgb)
        masks.append(torch.from_numpy(np.ascontiguousarray(m)))
    views = cams["views"]
    cameras = Cameras(torch.stack([v["viewmat"] for v in views]), torch.stack([v["K"] for v in views]),
                      size[1], size[0])
    poses = BodyPose(torch.stack([v["pose"].rotations for v in views]), torch.stack([v["pose"].translation for v in views]))
    return SparseViews(images=torch.stack(images), masks=torch.stack(masks), cameras=cameras, poses=poses,
                       shape=cams["shape"], body_model=cams["body_model"], image_paths=image_paths)


def cameras_json(cameras: Cameras, shape: Tensor, pose: BodyPose, body_model: str = "anny") -> dict:
    """The cameras-file object for ``cameras`` [V], one shared ``pose`` (rotations [J, 3], translation [3]) and
    ``shape [S]`` (the inverse of :func:`read_cameras_json`, e.g. to write the file for a synthetic subject)."""
    def rnd(t):
        return [[float(x) if math.isfinite(float(x)) else 0.0 for x in r] for r in t.tolist()]

    views = [{"K": rnd(cameras.Ks[i]), "viewmat": rnd(cameras.viewmats[i]), "width": cameras.width,
              "height": cameras.height} for i in range(cameras.viewmats.shape[0])]
    return {"body_model": body_model, "shape": [float(x) for x in shape.tolist()],
            "pose": {"rotations": rnd(pose.rotations), "translation": [float(x) for x in pose.translation.tolist()]},
            "views": views}

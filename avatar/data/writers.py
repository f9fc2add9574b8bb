"""Write a synthetic subject in the on-disk layouts of the real datasets (so the same loaders serve both).

ZJU-MoCap (``write_zju``), subject folder e.g. ``CoreView_900``::

    annots.npy              np.save of {'cams': {'K': [C x (3,3)], 'D': [C x (5,1)], 'R': [C x (3,3)],
                            'T': [C x (3,1)] millimetres}, 'ims': [{'ims': ['Camera_B1/000000.jpg', ...]} per frame]}
                            (world -> camera: x_cam = R x + T / 1000)
    Camera_B{c}/{f:06d}.jpg images (JPEG quality 95); camera c of ``annots`` is folder Camera_B{c+1}
    mask/Camera_B{c}/{f:06d}.png  masks, uint8 values 0/1
    params/{f}.npy          np.save of {'poses': (1, 3J) zero root part, 'Rh': (1, 3), 'Th': (1, 3), 'shapes': (1, S)}
                            (EasyMocap convention, ``avatar.data.params``)
    vertices/{f}.npy        (V, 3) float32 ground-truth posed CLOTHED vertices, world
    body_model.json, canonical_mesh.ply (clothed rest mesh), texture.png, synthetic.json (resolved config)

PeopleSnapshot as preprocessed by InstantAvatar (``write_peoplesnapshot``), e.g. ``female-9-casual``::

    cameras.npz             intrinsic (3,3), extrinsic (4,4) world->camera, height, width [, dist_coeffs (5,)]
    images/image_{i:04d}.png, masks/mask_{i:04d}.npy (H, W) uint8 0/1
    poses.npz               betas (1, S), global_orient (N, 3), body_pose (N, 3(J-1)), transl (N, 3)
    vertices/{i:04d}.npy, body_model.json, canonical_mesh.ply, texture.png, synthetic.json, {subject}.mp4

Both are written atomically: the subject is built in a hidden temporary sibling folder and renamed into place at
the end; on an exception the temporary folder is removed. (A killed process can leave a hidden ``.{name}.partial-*``
folder, never a partial subject; the next write of the same subject removes such leftovers of dead processes.)
The dict-valued ``.npy`` files are pickles because the real datasets are (``np.load(..., allow_pickle=True)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from avatar.io import atomic_dir
from avatar.data.params import BodyModelInfo, pose_to_easymocap, write_body_model_info
from avatar.data.synthetic import SyntheticSubject, config_to_dict, render_frame

__all__ = ["write_zju", "write_peoplesnapshot", "atomic_subject_dir", "zju_camera_folder"]


def zju_camera_folder(index: int) -> str:
    """Folder of the ``index``-th camera of ``annots`` (0-based): ``Camera_B{index + 1}``."""
    return f"Camera_B{index + 1}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_subject_dir(parent: Path, name: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``parent/name``; on success rename it to ``parent/name``, on any exception
    remove it. An existing ``parent/name`` raises ``FileExistsError`` unless ``overwrite``."""
    parent = Path(parent)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"subject name must be a plain folder name, got {name!r}")
    target = parent / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{name}.partial-"
    for stale in parent.glob(prefix + "*"):  # leftovers of killed runs: ".{name}.partial-{pid}-{random}"
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(target, overwrite=overwrite, prefix=f"{prefix}{os.getpid()}-") as tmp:
        yield tmp


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _write_common(folder: Path, subject: SyntheticSubject, body, layout: str, name: str) -> None:
    import trimesh
    from PIL import Image

    write_body_model_info(folder, BodyModelInfo(body.name, body.num_bones, body.shape_dim))
    mesh = trimesh.Trimesh(subject.canonical_vertices.detach().cpu().numpy().astype(np.float64),
                           subject.faces.cpu().numpy(), process=False)
    mesh.export(folder / "canonical_mesh.ply")
    Image.fromarray(_to_uint8(subject.texture)).save(folder / "texture.png")
    meta = {
        "layout": layout,
        "subject": name,
        "config": config_to_dict(subject.config),
        "body_model": body.name,
        "shape": subject.shape.cpu().tolist(),
        "shape_names": list(body.shape_names),
        "camera_ids": list(subject.camera_ids),
        "texture_convention": "avatar.render.mesh.texture_sample: u = column, v = row, row 0 at v = 0",
        "vertices": "posed clothed mesh (canonical_mesh.ply skinned with the body model's weights), world, metres",
    }
    (folder / "synthetic.json").write_text(json.dumps(meta, indent=2))


def _frames(subject: SyntheticSubject, body, progress: bool, desc: str):
    from tqdm import tqdm

    for i in tqdm(range(subject.num_frames), desc=desc, unit="frame", disable=not progress):
        yield i, render_frame(subject, body, i)


def write_zju(subject: SyntheticSubject, body, out_dir: Path, name: str = "CoreView_900", overwrite: bool = False,
              progress: bool = True) -> Path:
    """Write ``subject`` in the ZJU-MoCap layout as ``out_dir/name``; returns that folder."""
    from PIL import Image

    C = len(subject.camera_ids)
    view = subject.cameras.viewmats.detach().cpu().double().numpy()
    dist = np.zeros(5) if subject.distortion is None else subject.distortion.cpu().double().numpy()
    cams = {
        "K": [subject.cameras.Ks[c].detach().cpu().double().numpy() for c in range(C)],
        "D": [dist.reshape(5, 1).copy() for _ in range(C)],
        "R": [view[c, :3, :3].copy() for c in range(C)],
        "T": [(view[c, :3, 3] * 1000.0).reshape(3, 1) for c in range(C)],
    }
    ims = [{"ims": [f"{zju_camera_folder(c)}/{f:06d}.jpg" for c in range(C)]} for f in range(subject.num_frames)]
    poses, Rh, Th = pose_to_easymocap(subject.motion, subject.root_head.to(subject.motion.translation.dtype))
    shapes = subject.shape.detach().cpu().numpy().astype(np.float32)[None]
    with atomic_subject_dir(Path(out_dir), name, overwrite) as tmp:
        np.save(tmp / "annots.npy", {"cams": cams, "ims": ims}, allow_pickle=True)
        for sub in ("params", "vertices"):
            (tmp / sub).mkdir()
        for c in range(C):
            (tmp / zju_camera_folder(c)).mkdir()
            (tmp / "mask" / zju_camera_folder(c)).mkdir(parents=True)
        _write_common(tmp, subject, body, "zju", name)
        for f, frame in _frames(subject, body, progress, f"zju {name}"):
            for c in range(C):
                Image.fromarray(_to_uint8(frame.images[c])).save(tmp / ims[f]["ims"][c], quality=95)
                Image.fromarray(frame.masks[c].round().to(torch.uint8).cpu().numpy()).save(
                    tmp / "mask" / zju_camera_folder(c) / f"{f:06d}.png")
            params = {
                "poses": poses[f : f + 1].detach().cpu().numpy().astype(np.float32),
                "Rh": Rh[f : f + 1].detach().cpu().numpy().astype(np.float32),
                "Th": Th[f : f + 1].detach().cpu().numpy().astype(np.float32),
                "shapes": shapes,
            }
            np.save(tmp / "params" / f"{f}.npy", params, allow_pickle=True)
            np.save(tmp / "vertices" / f"{f}.npy", frame.vertices.detach().cpu().numpy().astype(np.float32))
    return Path(out_dir) / name


def write_peoplesnapshot(subject: SyntheticSubject, body, out_dir: Path, name: str = "female-9-casual",
                         overwrite: bool = False, progress: bool = True, video: bool = True, fps: int = 25) -> Path:
    """Write a monocular ``subject`` in InstantAvatar's PeopleSnapshot layout as ``out_dir/name`` (plus an mp4 of
    the view when ``video``); returns that folder."""
    from PIL import Image

    if len(subject.camera_ids) != 1:
        raise ValueError(f"write_peoplesnapshot: the PeopleSnapshot layout is monocular, the subject has cameras {subject.camera_ids}")
    cam = subject.cameras
    arrays = {
        "intrinsic": cam.Ks[0].detach().cpu().numpy().astype(np.float32),
        "extrinsic": cam.viewmats[0].detach().cpu().numpy().astype(np.float32),
        "height": np.array(cam.height),
        "width": np.array(cam.width),
    }
    if subject.distortion is not None:
        arrays["dist_coeffs"] = subject.distortion.cpu().numpy().astype(np.float32)
    rot = subject.motion.rotations.detach().cpu().numpy().astype(np.float32)  # [N, J, 3]
    N = rot.shape[0]
    poses = {
        "betas": subject.shape.detach().cpu().numpy().astype(np.float32)[None],
        "global_orient": rot[:, 0],
        "body_pose": rot[:, 1:].reshape(N, -1),
        "transl": subject.motion.translation.detach().cpu().numpy().astype(np.float32),
    }
    with atomic_subject_dir(Path(out_dir), name, overwrite) as tmp:
        np.savez(tmp / "cameras.npz", **arrays)
        np.savez(tmp / "poses.npz", **poses)
        for sub in ("images", "masks", "vertices"):
            (tmp / sub).mkdir()
        _write_common(tmp, subject, body, "peoplesnapshot", name)
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(_VideoWriter(tmp / f"{name}.mp4", cam.width, cam.height, fps)) if video else None
            for i, frame in _frames(subject, body, progress, f"peoplesnapshot {name}"):
                rgb = _to_uint8(frame.images[0])
                Image.fromarray(rgb).save(tmp / "images" / f"image_{i:04d}.png")
                np.save(tmp / "masks" / f"mask_{i:04d}.npy", frame.masks[0].round().to(torch.uint8).cpu().numpy())
                np.save(tmp / "vertices" / f"{i:04d}.npy", frame.vertices.detach().cpu().numpy().astype(np.float32))
                if writer is not None:
                    writer.write(rgb)
    return Path(out_dir) / name


class _VideoWriter:
    """mp4 writer (PyAV): h264 / yuv420p, or mpeg4 where this ffmpeg build has no h264 encoder."""

    def __init__(self, path: Path, width: int, height: int, fps: int) -> None:
        self.path, self.width, self.height, self.fps = path, width, height, fps

    def __enter__(self) -> "_VideoWriter":
        try:
            import av
        except ImportError as err:
            raise ImportError("writing the mp4 needs PyAV: pip install av (extra 'video')") from err
        self._av = av
        self._container = av.open(str(self.path), mode="w")
        for codec in ("libx264", "h264", "mpeg4"):
            try:
                self._stream = self._container.add_stream(codec, rate=self.fps)
                break
            except Exception:  # codec not in this ffmpeg build: try the next one
                continue
        else:
            raise RuntimeError(f"{self.path}: no h264 or mpeg4 encoder available in PyAV")
        self._stream.width = self.width + self.width % 2
        self._stream.height = self.height + self.height % 2
        self._stream.pix_fmt = "yuv420p"
        return self

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[0] % 2 or rgb.shape[1] % 2:  # yuv420p needs even sizes
            rgb = np.pad(rgb, ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0)))
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()

"""Tiny on-disk datasets in each supported layout, built from a body model, for the loader tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from avatar.data.params import BodyModelInfo, pose_to_easymocap, write_body_model_info
from avatar.geometry import axis_angle_to_matrix
from avatar.types import BodyPose

H, W = 24, 32
K = np.array([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]])


def color(frame: int, camera: int) -> np.ndarray:
    return np.array([20 + 10 * frame, 40 + 20 * camera, 200], dtype=np.uint8)


def mask_box(frame: int) -> np.ndarray:  # bool [H, W]
    m = np.zeros((H, W), bool)
    m[4 + frame % 3: 18, 6:20] = True
    return m


def random_poses(body, n: int, seed: int = 0) -> tuple[BodyPose, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rot = 0.2 * torch.randn(n, body.num_bones, 3, generator=g)
    trans = torch.randn(n, 3, generator=g) * 0.3
    shape = body.default_shape().clone() if body.name == "anny" else 0.5 * torch.randn(body.shape_dim, generator=g)
    return BodyPose(rot, trans), shape.float()


def write_zju(root: Path, body, num_frames: int = 3, num_cameras: int = 2, naming: str = "raw",
              D: np.ndarray | None = None, seed: int = 0) -> dict:
    """naming: "raw" (Camera_B*/000000.jpg, new_params), "313" (Camera (1)/CoreView_313_..., params, 1-based) or
    "refined" (my_3XX: images/00/000000.jpg, mask/, smpl_params). Returns what was written."""
    root.mkdir(parents=True)
    if body.name == "anny":
        write_body_model_info(root, BodyModelInfo("anny", body.num_bones, body.shape_dim))
    pose, shape = random_poses(body, num_frames, seed)
    h0 = body.rest(shape).bone_heads[0, 0]
    poses, Rh, Th = pose_to_easymocap(pose, h0)
    param_dir, vert_dir = {"raw": ("new_params", "new_vertices"), "313": ("params", "vertices"),
                           "refined": ("smpl_params", "smpl_vertices")}[naming]
    (root / param_dir).mkdir()
    (root / vert_dir).mkdir()
    Rs, Ts = [], []
    for c in range(num_cameras):
        Rs.append(axis_angle_to_matrix(torch.tensor([0.1 * c, 0.2, 0.0], dtype=torch.float64)).numpy())
        Ts.append(np.array([[100.0 * c], [-200.0], [3000.0]]))  # millimetres, (3, 1) as in the release
    cams = {"K": [K.copy() for _ in range(num_cameras)], "R": Rs, "T": Ts,
            "D": [(np.zeros((5, 1)) if D is None else D.reshape(5, 1)) for _ in range(num_cameras)]}
    ims, world = [], []
    for f in range(num_frames):
        number = f + 1 if naming == "313" else f
        names = []
        for c in range(num_cameras):
            if naming == "raw":
                rel = f"Camera_B{c + 1}/{number:06d}.jpg"
            elif naming == "313":
                rel = f"Camera ({c + 1})/CoreView_313_Camera_({c + 1})_{number:04d}_2019-08-23_16-08-50.592.jpg"
            else:
                rel = f"images/{c:02d}/{number:06d}.jpg"
            names.append(rel)
            img = np.broadcast_to(color(f, c), (H, W, 3))
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img)).save(root / rel, quality=95)
            mask_rel = Path(rel).with_suffix(".png")
            mask_file = root / ("mask" / mask_rel if naming != "refined" else Path("mask", *mask_rel.parts[1:]))
            mask_file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask_box(f).astype(np.uint8) * 255).save(mask_file)
        ims.append({"ims": names})
        params = {"poses": poses[f:f + 1].numpy(), "Rh": Rh[f:f + 1].numpy(), "Th": Th[f:f + 1].numpy(),
                  "shapes": shape[None].numpy()}
        np.save(root / param_dir / f"{number}.npy", params, allow_pickle=True)
        with torch.no_grad():
            local = body(BodyPose(poses[f].unflatten(-1, (-1, 3)), torch.zeros(3)), shape).vertices[0]
        verts = (local @ axis_angle_to_matrix(Rh[f]).T + Th[f]).numpy()
        np.save(root / vert_dir / f"{number}.npy", verts)
        world.append(verts)
    np.save(root / "annots.npy", {"cams": cams, "ims": ims}, allow_pickle=True)
    return {"pose": pose, "shape": shape, "world": world, "cams": cams, "ims": ims}


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "1", "g": "4"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_snapshot_raw(root: Path, body, num_frames: int = 8, seed: int = 0) -> dict:
    """Raw PeopleSnapshot layout with SMPL params (body: a SMPL body model)."""
    import h5py

    root.mkdir(parents=True)
    pose, shape = random_poses(body, num_frames, seed)
    cam = {"camera_f": np.array([30.0, 30.0]), "camera_c": np.array([16.0, 12.0]), "camera_k": np.zeros(5),
           "camera_rt": np.zeros(3), "camera_t": np.zeros(3), "width": W, "height": W}
    with open(root / "camera.pkl", "wb") as f:
        pickle.dump(cam, f, protocol=2)
    frames = [np.ascontiguousarray(np.broadcast_to(np.array([16 * i + 40, 128, 64], np.uint8), (W, W, 3)))
              for i in range(num_frames)]
    write_video(root / f"{root.name}.mp4", frames)
    masks = np.zeros((num_frames, W, W), np.uint8)
    masks[:, 5:20, 8:24] = 1
    with h5py.File(root / "masks.hdf5", "w") as f:
        f["masks"] = masks
    with h5py.File(root / "reconstructed_poses.hdf5", "w") as f:
        f["pose"] = pose.rotations.flatten(1).numpy()
        f["trans"] = pose.translation.numpy()
        f["betas"] = shape.numpy()
    return {"pose": pose, "shape": shape, "frames": frames, "masks": masks}


def write_instant_avatar(root: Path, body, num_frames: int = 6, seed: int = 0) -> dict:
    """InstantAvatar layout; anny parameters (with body_model.json) when ``body`` is anny."""
    root.mkdir(parents=True)
    if body.name == "anny":
        write_body_model_info(root, BodyModelInfo("anny", body.num_bones, body.shape_dim))
    pose, shape = random_poses(body, num_frames, seed)
    E = np.eye(4)
    E[:3, 3] = [0.1, 0.2, 3.0]
    np.savez(root / "cameras.npz", intrinsic=K, extrinsic=E, height=H, width=W)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(num_frames):
        Image.fromarray(np.ascontiguousarray(np.broadcast_to(color(i, 0), (H, W, 3)))).save(root / "images" / f"image_{i:04d}.png")
        np.save(root / "masks" / f"mask_{i:04d}.npy", mask_box(i).astype(np.float32))
    rot = pose.rotations.numpy()
    np.savez(root / "poses.npz", betas=shape[None].numpy(), global_orient=rot[:, 0], body_pose=rot[:, 1:].reshape(num_frames, -1),
             transl=pose.translation.numpy())
    return {"pose": pose, "shape": shape, "E": E}

"""The bundled default job until the fitting job lands: pose the anny body model through a short motion and
render it. Writes PNG frames, a contact sheet, the canonical and posed meshes (.ply) and the resolved config.

    avatar-demo --out out/demo --frames 8 --size 512
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import tyro
from PIL import Image

from avatar.io import atomic_file, atomic_write_bytes


@dataclasses.dataclass
class DemoConfig:
    out: Path = Path("out/demo")
    """Output folder (created; files in it are replaced)."""
    frames: int = 8
    """Frames of the motion to pose and render."""
    size: int = 512
    """Image width and height in pixels."""
    seed: int = 0
    """Seed of the body shape (anny phenotype)."""


def walk_pose(body, phase: float, front: torch.Tensor):
    """A walking-and-waving pose of the anny rig at ``phase`` in [0, 1); ``front`` is the direction the body faces
    (horizontal unit vector), so swings happen about the body's own lateral axis."""
    from avatar.types import BodyPose

    up = torch.tensor([0.0, 0.0, 1.0])
    lateral = torch.linalg.cross(up, front)
    rot = torch.zeros(body.num_bones, 3)
    s = math.sin(2 * math.pi * phase)
    for side, sign in (("L", 1.0), ("R", -1.0)):
        rot[body.bone_index(f"upperleg01.{side}")] = -0.45 * sign * s * lateral
        rot[body.bone_index(f"lowerleg01.{side}")] = 0.6 * max(0.0, sign * s) * lateral
        rot[body.bone_index(f"upperarm01.{side}")] = 0.35 * sign * s * lateral
    rot[body.bone_index("upperarm01.R")] += -1.0 * front  # raise the right arm sideways
    rot[body.bone_index("lowerarm01.R")] = -(0.5 + 0.4 * s) * front
    rot[0] = 0.4 * s * up  # turn the whole body about the vertical axis
    return BodyPose(rot, torch.zeros(3))


def run(cfg: DemoConfig) -> dict:
    from avatar.body import AnnyBody
    from avatar.geometry import intrinsics_from_fov, look_at
    from avatar.render import render_mesh_preview
    import trimesh

    if cfg.frames < 1 or cfg.size < 16:
        raise ValueError(f"frames must be >= 1 and size >= 16, got frames={cfg.frames}, size={cfg.size}")
    start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    body = AnnyBody()
    g = torch.Generator().manual_seed(cfg.seed)
    shape = torch.rand(body.shape_dim, generator=g) * 0.6 + 0.2
    rest = body.rest(shape)
    center = rest.vertices[0].mean(0)
    nose = body.keypoints(rest.vertices)[0, body.keypoint_names.index("nose")]
    front = nose - center
    front[2] = 0.0
    front = front / front.norm()
    eye = center + 3.2 * front
    viewmat = look_at(eye, center, torch.tensor([0.0, 0.0, 1.0]))
    K = intrinsics_from_fov(40.0, cfg.size, cfg.size)

    frames = []
    for i in range(cfg.frames):
        out = body(walk_pose(body, (i + 0.5) / cfg.frames, front), shape)
        img = render_mesh_preview(out.vertices[0], body.faces, viewmat, K, cfg.size, cfg.size)
        path = cfg.out / f"frame_{i:03d}.png"
        with atomic_file(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        frames.append(img)
        if i == 0:
            posed = trimesh.Trimesh(out.vertices[0].numpy(), body.faces.numpy(), process=False)
            atomic_write_bytes(cfg.out / "posed_000.ply", posed.export(file_type="ply"))
        print(f"[avatar-demo] frame {i + 1}/{cfg.frames}", flush=True)
    canonical = trimesh.Trimesh(rest.vertices[0].numpy(), body.faces.numpy(), process=False)
    atomic_write_bytes(cfg.out / "canonical.ply", canonical.export(file_type="ply"))
    cols = min(4, len(frames))
    rows = math.ceil(len(frames) / cols)
    sheet = np.full((rows * cfg.size, cols * cfg.size, 3), 255, np.uint8)
    for i, img in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * cfg.size:(r + 1) * cfg.size, c * cfg.size:(c + 1) * cfg.size] = img
    with atomic_file(cfg.out / "contact_sheet.png") as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "body_model": body.name,
        "shape": dict(zip(body.shape_names, [round(float(x), 4) for x in shape])),
        "vertices": body.num_vertices,
        "faces": int(body.faces.shape[0]),
        "bones": body.num_bones,
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_bytes(cfg.out / "summary.json", json.dumps(summary, indent=2).encode())
    print(f"[avatar-demo] wrote {cfg.frames} frames, contact_sheet.png, canonical.ply, posed_000.ply to {cfg.out} "
          f"in {summary['seconds']} s", flush=True)
    return summary


def main() -> None:
    run(tyro.cli(DemoConfig))


if __name__ == "__main__":
    main()

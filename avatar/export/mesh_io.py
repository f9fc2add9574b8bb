"""Plain triangle meshes as OBJ or PLY (canonical and posed), written atomically through trimesh.

trimesh does the encoding (both formats are text/binary layouts it writes and reads well); this module adds input
checks with clear errors, vertex colours, atomic writes (``avatar.io``) and the posed variant (forward LBS of the
canonical mesh for a set of bone transforms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.io import atomic_write_bytes
from avatar.skinning.lbs import lbs_points

__all__ = ["MESH_FORMATS", "read_mesh", "write_mesh", "write_posed_mesh"]

MESH_FORMATS = (".obj", ".ply")


def _np(x, dtype) -> np.ndarray:
    return x.detach().cpu().numpy().astype(dtype) if isinstance(x, Tensor) else np.asarray(x, dtype)


def write_mesh(path: str | Path, vertices: Tensor | np.ndarray, faces: Tensor | np.ndarray,
               colors: Tensor | np.ndarray | None = None) -> Path:
    """Write ``vertices [V, 3]`` (metres), ``faces [F, 3]`` and optional per-vertex ``colors [V, 3]`` (RGB in [0, 1],
    stored as 8-bit) to ``path`` (``.obj`` or ``.ply``, binary PLY) atomically."""
    import trimesh

    path = Path(path)
    fmt = path.suffix.lower()
    if fmt not in MESH_FORMATS:
        raise ValueError(f"write_mesh({path}): the file must end in .obj or .ply, got {path.suffix!r}")
    v = _np(vertices, np.float64)
    f = _np(faces, np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or not np.isfinite(v).all():
        raise ValueError(f"write_mesh({path}): vertices must be a finite [V, 3] array, got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and (f.min() < 0 or f.max() >= len(v))):
        raise ValueError(f"write_mesh({path}): faces must be [F, 3] indexing [0, {len(v)}), got {f.shape}")
    kwargs = {}
    if colors is not None:
        c = _np(colors, np.float64)
        if c.shape != (len(v), 3) or not np.isfinite(c).all():
            raise ValueError(f"write_mesh({path}): colors must be finite [{len(v)}, 3], got {c.shape}")
        rgb = (np.clip(c, 0, 1) * 255).round().astype(np.uint8)
        kwargs["vertex_colors"] = np.concatenate([rgb, np.full((len(v), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(v, f, process=False, **kwargs)
    if fmt == ".obj":
        data = trimesh.exchange.obj.export_obj(mesh, include_color=colors is not None, include_normals=False,
                                               include_texture=False).encode("utf-8")
    else:
        data = trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=False)
    return atomic_write_bytes(path, data)


def write_posed_mesh(path: str | Path, vertices: Tensor, faces: Tensor, skin_weights: Tensor, transforms: Tensor,
                     colors: Tensor | None = None) -> Path:
    """Forward-skin canonical ``vertices [V, 3]`` with dense ``skin_weights [V, J]`` by ``transforms [J, 4, 4]``
    (canonical -> posed, ``BodyOutput.bone_transforms``) and write the posed mesh (see :func:`write_mesh`)."""
    if transforms.ndim != 3 or transforms.shape[1:] != (4, 4):
        raise ValueError(f"write_posed_mesh({path}): transforms must be [J, 4, 4], got {tuple(transforms.shape)}")
    with torch.no_grad():
        posed = lbs_points(vertices, skin_weights.to(vertices), transforms.to(vertices))
    return write_mesh(path, posed, faces, colors)


def read_mesh(path: str | Path) -> tuple[Tensor, Tensor, Tensor | None]:
    """Read an ``.obj`` / ``.ply`` triangle mesh -> ``(vertices [V, 3] float32, faces [F, 3] int64, colors [V, 3]
    float32 in [0, 1] or None)``, vertex order kept."""
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in MESH_FORMATS:
        raise ValueError(f"read_mesh({path}): the file must end in .obj or .ply, got {path.suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"read_mesh: {path} does not exist")
    try:
        mesh = trimesh.load(str(path), process=False, maintain_order=True, force="mesh")
    except Exception as err:  # trimesh raises many types for malformed files
        raise ValueError(f"read_mesh({path}): not a readable mesh ({type(err).__name__}: {err})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"read_mesh({path}): no triangle faces in the file")
    colors = None
    if mesh.visual.kind == "vertex":
        colors = torch.from_numpy(np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.float32) / 255.0)
    return (torch.from_numpy(np.asarray(mesh.vertices, np.float32)), torch.from_numpy(np.asarray(mesh.faces, np.int64)),
            colors)

"""Gaussians bound to the faces of a triangle mesh (the Gaussian-mesh hybrid of DreamMesh4D / GaMeS).

Each Gaussian belongs to one face and keeps, for good, its barycentric coordinates there (``k`` per face). Given the
mesh's vertices (canonical or posed), a Gaussian's

- position is the barycentric combination of its face's vertices (plus an optional offset along the face normal,
  in units of the face size),
- rotation is the face frame ``[t, b, n]`` (columns: the unit first edge, ``n x t`` and the unit normal) times an
  optional fixed rotation in that frame,
- scales are relative scales times the face size ``sqrt(area / k)`` (the spacing of the face's ``k`` Gaussians):
  stretching or shrinking the face stretches its Gaussians.

So the mesh and the Gaussians share one geometry: skin (or refine) the mesh and the Gaussians follow exactly; under
a rigid motion of the mesh they move rigidly. :func:`mesh_gaussians` turns a mesh into a ``GaussianSet``;
:func:`avatar_from_mesh` starts a ``GaussianAvatar`` (the free Gaussians that ``avatar.fit`` trains) from a refined
canonical mesh instead of the naked body model (``avatar.fit.job.build_avatar(..., init_mesh=...)``).

Written here: no installable package provides mesh-bound Gaussians for torch on CPU; the maths is a few lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar.geometry.rotations import matrix_to_quat, quat_to_matrix
from avatar.types import GaussianSet

__all__ = ["MeshBinding", "avatar_from_mesh", "bind_to_faces", "face_frames", "mesh_gaussians"]


@dataclass(frozen=True)
class MeshBinding:
    """Fixed attachment of N = F * k Gaussians to the faces of a mesh.

    face_ids:     [N] int64 face of each Gaussian (k consecutive Gaussians per face).
    bary:         [N, 3] barycentric coordinates in the vertex order of ``faces[face_ids]`` (rows sum to 1).
    rel_scales:   [N, 3] scales along (t, b, n) in units of the face size ``sqrt(area / k)``.
    local_quats:  [N, 4] wxyz rotation inside the face frame (identity: axes along t, b, n).
    normal_offset: [N] offset along the face normal, in units of the face size (0: on the face).
    per_face:     k.
    """

    face_ids: Tensor
    bary: Tensor
    rel_scales: Tensor
    local_quats: Tensor
    normal_offset: Tensor
    per_face: int

    def __len__(self) -> int:
        return int(self.face_ids.shape[0])


def _barycentric_pattern(k: int, generator: torch.Generator | None) -> Tensor:
    """``[k, 3]`` barycentrics spread over a triangle: centroid (k=1), the three sub-triangle centroids around the
    centroid (k=3, 4), otherwise seeded uniform samples (``generator`` required)."""
    c = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    three = torch.tensor([[2 / 3, 1 / 6, 1 / 6], [1 / 6, 2 / 3, 1 / 6], [1 / 6, 1 / 6, 2 / 3]], dtype=torch.float64)
    if k == 1:
        return c
    if k == 3:
        return three
    if k == 4:
        return torch.cat([c, three])
    if generator is None:
        raise ValueError(f"bind_to_faces: k={k} needs a generator for random barycentrics (k in 1, 3, 4 do not)")
    u = torch.rand(k, 2, generator=generator, dtype=torch.float64)
    u = torch.where((u.sum(-1) > 1)[:, None], 1 - u, u)
    return torch.stack([1 - u[:, 0] - u[:, 1], u[:, 0], u[:, 1]], -1)


def bind_to_faces(num_faces: int, k: int = 1, rel_scale: tuple[float, float, float] = (0.6, 0.6, 0.05),
                  generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> MeshBinding:
    """``k`` Gaussians per face for a mesh of ``num_faces`` faces, all faces with the same barycentric pattern (see
    :func:`_barycentric_pattern`), ``rel_scale`` along (t, b, n), identity local rotations, no normal offset."""
    if num_faces < 1 or k < 1:
        raise ValueError(f"bind_to_faces: num_faces and k must be >= 1, got {num_faces} and {k}")
    if len(rel_scale) != 3 or not all(s > 0 for s in rel_scale):
        raise ValueError(f"bind_to_faces: rel_scale must be 3 positive floats, got {rel_scale}")
    pattern = _barycentric_pattern(k, generator).to(dtype)  # [k, 3]
    face_ids = torch.arange(num_faces, device=device).repeat_interleave(k)
    bary = pattern.to(device).repeat(num_faces, 1)
    n = face_ids.shape[0]
    quats = torch.zeros(n, 4, dtype=dtype, device=device)
    quats[:, 0] = 1
    return MeshBinding(face_ids, bary, torch.tensor(rel_scale, dtype=dtype, device=device).expand(n, 3).clone(), quats,
                       torch.zeros(n, dtype=dtype, device=device), k)


def face_frames(vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal face frames ``[..., F, 3, 3]`` (columns t, b, n; det +1) and face areas ``[..., F]`` of
    ``vertices [..., V, 3]`` with ``faces [F, 3]`` (counter-clockwise = outward normal)."""
    tri = vertices[..., faces, :]  # [..., F, 3, 3]
    e1 = tri[..., 1, :] - tri[..., 0, :]
    e2 = tri[..., 2, :] - tri[..., 0, :]
    cross = torch.linalg.cross(e1, e2)
    area = 0.5 * cross.norm(dim=-1)
    n = cross / cross.norm(dim=-1, keepdim=True).clamp(min=1e-20)
    t = e1 / e1.norm(dim=-1, keepdim=True).clamp(min=1e-20)
    b = torch.linalg.cross(n, t)
    return torch.stack([t, b, n], -1), area


def mesh_gaussians(
    vertices: Tensor,  # [V, 3] canonical or posed mesh
    faces: Tensor,  # [F, 3] int64
    binding: MeshBinding,
    colors: Tensor,  # [V, 3] vertex colours (interpolated) or [N, 3] per Gaussian, in [0, 1]
    opacities: Tensor | float = 0.9,  # [N] or one value
    skin_weights: Tensor | None = None,  # [V, J] dense vertex weights (interpolated), or None
    min_scale: float = 1e-5,
) -> GaussianSet:
    """The ``GaussianSet`` of ``binding`` on the mesh (see the module docstring); differentiable w.r.t. the
    vertices, colours and opacities."""
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"mesh_gaussians: vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"mesh_gaussians: faces must be [F, 3], got {tuple(faces.shape)}")
    if len(binding) and int(binding.face_ids.max()) >= faces.shape[0]:
        raise ValueError(f"mesh_gaussians: the binding refers to face {int(binding.face_ids.max())} but the mesh has "
                         f"{faces.shape[0]} faces")
    n = len(binding)
    frames, area = face_frames(vertices, faces)
    fid = binding.face_ids
    tri = vertices[faces[fid]]  # [N, 3, 3]
    R = frames[fid]  # [N, 3, 3]
    size = (area[fid] / binding.per_face).clamp(min=0).sqrt()  # [N]
    means = (binding.bary.to(vertices)[..., None] * tri).sum(1) + (binding.normal_offset.to(vertices) * size)[:, None] * R[..., 2]
    rot = R @ quat_to_matrix(binding.local_quats.to(vertices))
    quats = matrix_to_quat(rot)
    scales = (binding.rel_scales.to(vertices) * size[:, None]).clamp(min=min_scale)
    if colors.shape == (vertices.shape[0], 3):
        col = (binding.bary.to(colors)[..., None] * colors[faces[fid]]).sum(1)
    elif colors.shape == (n, 3):
        col = colors
    else:
        raise ValueError(f"mesh_gaussians: colors must be [V={vertices.shape[0]}, 3] or [N={n}, 3], got "
                         f"{tuple(colors.shape)}")
    op = opacities if isinstance(opacities, Tensor) else vertices.new_full((n,), float(opacities))
    if op.shape != (n,):
        raise ValueError(f"mesh_gaussians: opacities must be [N={n}], got {tuple(op.shape)}")
    weights = None
    if skin_weights is not None:
        if skin_weights.ndim != 2 or skin_weights.shape[0] != vertices.shape[0]:
            raise ValueError(f"mesh_gaussians: skin_weights must be [V={vertices.shape[0]}, J], got "
                             f"{tuple(skin_weights.shape)}")
        weights = (binding.bary.to(skin_weights)[..., None] * skin_weights[faces[fid]]).sum(1)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    return GaussianSet(means, quats, scales, op, col.clamp(0, 1), weights)


def avatar_from_mesh(
    vertices: Tensor,  # [V, 3] canonical (refined) mesh
    faces: Tensor,  # [F, 3]
    skin_weights: Tensor,  # [V, J] dense
    colors: Tensor | None,  # [V, 3] in [0, 1], or None (grey)
    num_gaussians: int,
    body_vertices: Tensor,  # [Vb, 3] canonical body surface (for the avatar's off-body pruning)
    generator: torch.Generator,
    opacity: float = 0.3,
    weight_field: bool = True,
    field_hidden: int = 64,
    field_freqs: int = 4,
):
    """A ``GaussianAvatar`` whose initial Gaussians are the mesh-bound Gaussians of the canonical mesh: ``k =
    max(1, round(num_gaussians / F))`` per face, positions, face-frame rotations and face-relative scales from the
    mesh, colours and skinning weights interpolated from its vertices. From there the Gaussians are free (the
    avatar's usual parameters)."""
    from avatar.represent.avatar import GaussianAvatar, _logit
    from avatar.skinning.weights import ResidualWeightField

    if not 0.0 < opacity < 1.0:
        raise ValueError(f"avatar_from_mesh: opacity must be in (0, 1), got {opacity}")
    if num_gaussians < 1:
        raise ValueError(f"avatar_from_mesh: num_gaussians must be >= 1, got {num_gaussians}")
    F = faces.shape[0]
    k = max(1, round(num_gaussians / F))
    binding = bind_to_faces(F, k, generator=generator, dtype=vertices.dtype, device=vertices.device)
    col = colors if colors is not None else vertices.new_full((vertices.shape[0], 3), 0.5)
    g = mesh_gaussians(vertices, faces.to(torch.int64), binding, col, opacity, skin_weights.to(vertices))
    lo, hi = vertices.min(0).values, vertices.max(0).values
    field = None
    if weight_field:
        field = ResidualWeightField(g.skin_weights.shape[1], hidden=field_hidden, num_freqs=field_freqs,
                                    scale=float((hi - lo).max()), generator=generator).to(vertices)
    n = len(g)
    return GaussianAvatar(g.means, g.quats, g.scales.log(), vertices.new_full((n,), math.log(opacity / (1 - opacity))),
                          _logit(g.colors), g.skin_weights, body_vertices, field)

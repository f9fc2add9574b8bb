"""Mesh-to-mesh quality: symmetric Chamfer distance and normal consistency of two triangle meshes.

Both meshes are sampled uniformly by area (seeded). The distance of a sample to the other mesh is the exact
point-to-triangle distance to the faces of its ``k`` nearest samples on that mesh (scipy ``cKDTree`` to find them,
Ericson's closest-point-on-triangle for the distance): nearest-sample distances alone would add the sampling gap
(about 4 mm between two copies of one body mesh at 20k samples). Chamfer = mean of the two directed mean distances
(millimetres); normal consistency = mean of the two directed means of ``|n_a . n_b|`` with ``n_b`` the normal of the
closest face (1 is perfect, orientation-agnostic as in Occupancy Networks' evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class MeshQuality:
    """chamfer_mm: symmetric mean distance (mm); accuracy_mm: pred -> gt mean; completeness_mm: gt -> pred mean;
    normal_consistency: in [0, 1]; num_samples: samples per mesh."""

    chamfer_mm: float
    accuracy_mm: float
    completeness_mm: float
    normal_consistency: float
    num_samples: int


def closest_point_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points ``[..., 3]`` on triangles ``(a, b, c)`` to points ``p`` (all ``[..., 3]``; Ericson, Real-Time
    Collision Detection 5.1.5, vectorized over the Voronoi regions)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        v = np.where(denom != 0, vb / denom, 0.0)
        w = np.where(denom != 0, vc / denom, 0.0)
        out = a + ab * v[..., None] + ac * w[..., None]  # inside the face
        # edges
        t_ab = np.where(d1 - d3 != 0, d1 / (d1 - d3), 0.0)
        t_ac = np.where(d2 - d6 != 0, d2 / (d2 - d6), 0.0)
        t_bc = np.where((d4 - d3) + (d5 - d6) != 0, (d4 - d3) / ((d4 - d3) + (d5 - d6)), 0.0)
    e_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    out = np.where(e_bc[..., None], b + (c - b) * t_bc[..., None], out)
    e_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    out = np.where(e_ac[..., None], a + ac * t_ac[..., None], out)
    e_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    out = np.where(e_ab[..., None], a + ab * t_ab[..., None], out)
    # vertices
    out = np.where(((d6 >= 0) & (d5 <= d6))[..., None], c, out)
    out = np.where(((d3 >= 0) & (d4 <= d3))[..., None], b, out)
    out = np.where(((d1 <= 0) & (d2 <= 0))[..., None], a, out)
    return out


def _to_surface(points: np.ndarray, samples: np.ndarray, sample_faces: np.ndarray, vertices: np.ndarray,
                faces: np.ndarray, normals: np.ndarray, k: int = 8, chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point to the mesh (over the faces of its k nearest samples) and that face's unit normal."""
    from scipy.spatial import cKDTree

    tree = cKDTree(samples)
    dist, nrm = [], []
    for s in range(0, len(points), chunk):
        p = points[s:s + chunk]
        _, idx = tree.query(p, k=k)
        f = sample_faces[idx]  # [q, k]
        tri = vertices[faces[f]]  # [q, k, 3, 3]
        q = closest_point_on_triangles(p[:, None, :], tri[..., 0, :], tri[..., 1, :], tri[..., 2, :])
        d = np.linalg.norm(q - p[:, None, :], axis=-1)  # [q, k]
        j = d.argmin(1)
        rows = np.arange(len(p))
        dist.append(d[rows, j])
        nrm.append(normals[f[rows, j]])
    return np.concatenate(dist), np.concatenate(nrm)


def _sample(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    cr = np.cross(b - a, c - a)
    area = np.linalg.norm(cr, axis=1)
    if not area.sum() > 0:
        raise ValueError("mesh_quality: a mesh has zero surface area")
    f = rng.choice(len(faces), size=n, p=area / area.sum())
    r = rng.random((n, 2))
    s = np.sqrt(r[:, 0])
    w = np.stack([1 - s, s * (1 - r[:, 1]), s * r[:, 1]], 1)
    p = w[:, :1] * a[f] + w[:, 1:2] * b[f] + w[:, 2:] * c[f]
    return p, f, cr / np.maximum(area[:, None], 1e-300)


def mesh_quality(pred_vertices: Tensor, pred_faces: Tensor, gt_vertices: Tensor, gt_faces: Tensor,
                 num_samples: int = 50_000, seed: int = 0) -> MeshQuality:
    """Chamfer distance and normal consistency of a predicted mesh against a ground-truth mesh (metres in)."""
    for name, v, f in (("pred", pred_vertices, pred_faces), ("gt", gt_vertices, gt_faces)):
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
            raise ValueError(f"mesh_quality: {name} mesh must be vertices [V, 3] and non-empty faces [F, 3], "
                             f"got {tuple(v.shape)} and {tuple(f.shape)}")
    rng = np.random.default_rng(seed)
    va, fa = pred_vertices.detach().double().cpu().numpy(), pred_faces.cpu().numpy().astype(np.int64)
    vb, fb = gt_vertices.detach().double().cpu().numpy(), gt_faces.cpu().numpy().astype(np.int64)
    pa, sfa, nfa = _sample(va, fa, num_samples, rng)
    pb, sfb, nfb = _sample(vb, fb, num_samples, rng)
    d_ab, n_ab = _to_surface(pa, pb, sfb, vb, fb, nfb)
    d_ba, n_ba = _to_surface(pb, pa, sfa, va, fa, nfa)
    nc_ab = np.abs((nfa[sfa] * n_ab).sum(1)).mean()
    nc_ba = np.abs((nfb[sfb] * n_ba).sum(1)).mean()
    acc, comp = float(d_ab.mean() * 1000), float(d_ba.mean() * 1000)
    return MeshQuality(chamfer_mm=(acc + comp) / 2, accuracy_mm=acc, completeness_mm=comp,
                       normal_consistency=float((nc_ab + nc_ba) / 2), num_samples=num_samples)

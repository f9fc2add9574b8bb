"""Posing an avatar bundle for the viewer: pose -> bone transforms -> skinned splats packed for the browser.

The pipeline, in order (each step a pure function; :class:`AvatarPoser` only caches what does not change per pose)::

    BodyPose --AvatarPoser.transforms (the body model's kinematics, rest state cached)--> transforms [J, 4, 4]
            --(canonical deformer: offsets [N, 3], e.g. issue 8's control points; None today)-->
            --pose_splats--> SplatArrays (centers f32, covariances f32, rgbs u8, opacities u8: what viser takes)
            --pack_viser_buffer--> [N, 8] uint32 (viser's client buffer: one websocket message per pose)

A deformer is inserted by passing ``offsets`` (canonical-space displacements of the means, applied before
skinning) to :func:`pose_splats`; the fast kernel and the reference both take it, so a control-point deformer
(issue 8) only has to produce offsets for the pose.

Why a hand-written kernel: the straightforward path (``avatar.skinning.skin_gaussians`` in torch float32, then
quaternion -> covariance and numpy packing) takes about 60-70 ms for 50k Gaussians on the 2-core CPU, because a
dense ``[N, 104]`` blend, four Newton polar iterations and the quaternion round trip each sweep memory with many
small torch kernels. The numba kernel here does, per Gaussian and in registers: a sparse blend over the few bones
with non-negligible weight, the polar rotation by the reference's Newton iteration ``X <- (g X + X^-T / g) / 2``
with the determinant scaling ``g = |det X|^(-1/3)``, computed by ``pow`` on the first step and wherever
``|det X - 1| > 0.05``, else by its second-order Taylor expansion (the scaling only speeds convergence, any positive
``g`` keeps the fixed point; ``pow`` was half the kernel's time), and
``Sigma' = R Sigma_c R^T`` with the canonical covariance ``Sigma_c`` precomputed once per bundle. It is checked
against :func:`pose_splats_reference` (the reference built on ``skin_gaussians``) in tests/viewer/test_posing.py.

Sparse weights: bones whose weight is below ``PosingConfig.weight_threshold`` (default 1e-6) are dropped and the
row renormalized; a fitted avatar's residual weight field leaves ~1e-9 on every bone, which would otherwise make the
blend dense. The dropped mass is below ``J * threshold`` (1e-4 for 104 bones), so positions move by less than
that fraction of the bones' relative displacement (at most 0.2 mm for bones moved 2 m apart; measured ~0.2 um on
fitted avatars).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.types import BodyPose, GaussianSet

# viser's client buffer per Gaussian: 8 uint32 = centers (3 f32), reserved, covariance upper triangle (6 f16), RGBA u8
VISER_BUFFER_WIDTH = 8
_TRIU = np.array([0, 1, 2, 4, 5, 8])


@dataclass(frozen=True)
class PosingConfig:
    """How the fast posing path sparsifies skinning weights and orthogonalizes blended transforms."""

    weight_threshold: float = 1e-6
    """Bones with a smaller weight are dropped (row renormalized); 0 keeps every non-zero weight (exact)."""
    polar_iterations: int = 4
    """Newton iterations of the polar decomposition (``avatar.skinning.lbs.polar_rotation`` uses 4)."""


@dataclass(frozen=True)
class PreparedSplats:
    """Canonical Gaussians laid out for :func:`pose_splats` (computed once per bundle).

    means:        [N, 3] float32 canonical centres, metres.
    cov_canonical:[N, 6] float64 canonical covariance upper triangle (xx, xy, xz, yy, yz, zz), m^2.
    bone_ids:     [N, K] int32 bones with weight >= threshold (padded with 0).
    bone_weights: [N, K] float32 renormalized weights (padding 0).
    rgbs:         [N, 3] uint8; opacities: [N, 1] uint8 (viser's ``colors_to_uint8``: clip(x * 255), truncated).
    num_bones:    J, the rig's bone count (columns of the skin weights).
    """

    means: np.ndarray
    cov_canonical: np.ndarray
    bone_ids: np.ndarray
    bone_weights: np.ndarray
    rgbs: np.ndarray
    opacities: np.ndarray
    num_bones: int

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def num_bones_per_gaussian(self) -> int:
        return int(self.bone_ids.shape[1])


@dataclass(frozen=True)
class SplatArrays:
    """Posed splats as ``viser.scene.add_gaussian_splats`` takes them.

    centers [N, 3] float32, covariances [N, 3, 3] float32, rgbs [N, 3] uint8, opacities [N, 1] uint8.
    """

    centers: np.ndarray
    covariances: np.ndarray
    rgbs: np.ndarray
    opacities: np.ndarray


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 exactly as viser does (``clip(x * 255, 0, 255).astype(uint8)``)."""
    return np.clip(np.asarray(x, dtype=np.float32) * 255.0, 0, 255).astype(np.uint8)


def _check_gaussians(gaussians: GaussianSet, what: str) -> None:
    if not isinstance(gaussians, GaussianSet):
        raise TypeError(f"{what}: gaussians must be a GaussianSet, got {type(gaussians).__name__}")
    if gaussians.skin_weights is None:
        raise ValueError(f"{what}: the Gaussians have no skin_weights [N, J]; a posable avatar needs them")


def canonical_covariances(scales: Tensor, quats: Tensor) -> Tensor:
    """``R diag(s^2) R^T`` ``[N, 3, 3]`` for ``scales [N, 3]`` (std devs) and ``quats [N, 4]`` (wxyz)."""
    from avatar.geometry.rotations import quat_to_matrix

    M = quat_to_matrix(quats) * scales.unsqueeze(-2)  # [N, 3, 3] = R diag(s)
    return M @ M.transpose(-1, -2)


def prepare_splats(gaussians: GaussianSet, config: PosingConfig = PosingConfig()) -> PreparedSplats:
    """Sparsify weights and precompute canonical covariances and uint8 colours for :func:`pose_splats`."""
    _check_gaussians(gaussians, "prepare_splats")
    if not 0.0 <= config.weight_threshold < 1.0:
        raise ValueError(f"prepare_splats: weight_threshold must be in [0, 1), got {config.weight_threshold}")
    with torch.no_grad():
        w = gaussians.skin_weights.detach().to("cpu", torch.float64)  # [N, J]
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("prepare_splats: skin_weights must be finite and non-negative")
        keep = (w >= config.weight_threshold) & (w > 0)
        counts = keep.sum(1)
        if bool((counts == 0).any()):
            raise ValueError(f"prepare_splats: {int((counts == 0).sum())} Gaussians have no bone with weight >= "
                             f"{config.weight_threshold}")
        K = int(counts.max())
        wk = torch.where(keep, w, torch.zeros_like(w))
        vals, ids = torch.topk(wk, K, dim=1)  # [N, K], zero-weight padding sorted last
        vals = vals / vals.sum(1, keepdim=True)
        ids = torch.where(vals > 0, ids, torch.zeros_like(ids))
        cov = canonical_covariances(gaussians.scales.detach().cpu().double(), gaussians.quats.detach().cpu().double())
        cov6 = cov.reshape(-1, 9)[:, _TRIU]
    return PreparedSplats(
        means=np.ascontiguousarray(gaussians.means.detach().cpu().numpy(), dtype=np.float32),
        cov_canonical=np.ascontiguousarray(cov6.numpy(), dtype=np.float64),
        bone_ids=np.ascontiguousarray(ids.numpy(), dtype=np.int32),
        bone_weights=np.ascontiguousarray(vals.numpy(), dtype=np.float32),
        rgbs=to_uint8(gaussians.colors.detach().cpu().numpy()),
        opacities=to_uint8(gaussians.opacities.detach().cpu().numpy()[:, None]),
        num_bones=int(w.shape[1]),
    )


_KERNEL = None


def _kernel():
    """Compile (once, cached on disk by numba) the per-Gaussian posing kernel; numba is imported lazily."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import numba
    from numba import prange

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def pose_kernel(means, offsets, has_offsets, cov6, ids, wts, T, iters, centers_out, cov_out):  # pragma: no cover
        N, K = ids.shape
        for i in prange(N):
            a00 = 0.0; a01 = 0.0; a02 = 0.0; a03 = 0.0  # noqa: E702
            a10 = 0.0; a11 = 0.0; a12 = 0.0; a13 = 0.0  # noqa: E702
            a20 = 0.0; a21 = 0.0; a22 = 0.0; a23 = 0.0  # noqa: E702
            for k in range(K):
                w = wts[i, k]
                if w == 0.0:
                    continue
                b = ids[i, k]
                a00 += w * T[b, 0, 0]; a01 += w * T[b, 0, 1]; a02 += w * T[b, 0, 2]; a03 += w * T[b, 0, 3]  # noqa: E702
                a10 += w * T[b, 1, 0]; a11 += w * T[b, 1, 1]; a12 += w * T[b, 1, 2]; a13 += w * T[b, 1, 3]  # noqa: E702
                a20 += w * T[b, 2, 0]; a21 += w * T[b, 2, 1]; a22 += w * T[b, 2, 2]; a23 += w * T[b, 2, 3]  # noqa: E702
            x0 = means[i, 0]
            x1 = means[i, 1]
            x2 = means[i, 2]
            if has_offsets:
                x0 += offsets[i, 0]
                x1 += offsets[i, 1]
                x2 += offsets[i, 2]
            centers_out[i, 0] = a00 * x0 + a01 * x1 + a02 * x2 + a03
            centers_out[i, 1] = a10 * x0 + a11 * x1 + a12 * x2 + a13
            centers_out[i, 2] = a20 * x0 + a21 * x1 + a22 * x2 + a23
            # polar rotation of the linear part by scaled Newton iterations (as avatar.skinning.lbs.polar_rotation)
            m00 = a00; m01 = a01; m02 = a02  # noqa: E702
            m10 = a10; m11 = a11; m12 = a12  # noqa: E702
            m20 = a20; m21 = a21; m22 = a22  # noqa: E702
            for it in range(iters):
                # cofactor rows: c0 = r1 x r2, c1 = r2 x r0, c2 = r0 x r1; det = r0 . c0
                c00 = m11 * m22 - m12 * m21; c01 = m12 * m20 - m10 * m22; c02 = m10 * m21 - m11 * m20  # noqa: E702
                c10 = m21 * m02 - m22 * m01; c11 = m22 * m00 - m20 * m02; c12 = m20 * m01 - m21 * m00  # noqa: E702
                c20 = m01 * m12 - m02 * m11; c21 = m02 * m10 - m00 * m12; c22 = m00 * m11 - m01 * m10  # noqa: E702
                det = m00 * c00 + m01 * c01 + m02 * c02
                ad = abs(det)
                if ad < 1e-12:
                    ad = 1e-12
                e = ad - 1.0
                if it == 0 or abs(e) > 0.05:
                    g = ad ** (-1.0 / 3.0)
                else:  # near-orthogonal: second-order Taylor of |det|^(-1/3), relative error < 3e-5
                    g = 1.0 - e / 3.0 + 2.0 * e * e / 9.0
                h = 1.0 / (det * g)
                m00 = 0.5 * (g * m00 + h * c00); m01 = 0.5 * (g * m01 + h * c01); m02 = 0.5 * (g * m02 + h * c02)  # noqa: E702,E501
                m10 = 0.5 * (g * m10 + h * c10); m11 = 0.5 * (g * m11 + h * c11); m12 = 0.5 * (g * m12 + h * c12)  # noqa: E702,E501
                m20 = 0.5 * (g * m20 + h * c20); m21 = 0.5 * (g * m21 + h * c21); m22 = 0.5 * (g * m22 + h * c22)  # noqa: E702,E501
            sxx = cov6[i, 0]; sxy = cov6[i, 1]; sxz = cov6[i, 2]  # noqa: E702
            syy = cov6[i, 3]; syz = cov6[i, 4]; szz = cov6[i, 5]  # noqa: E702
            # B = R Sigma_c (rows), then Sigma' = B R^T
            b00 = m00 * sxx + m01 * sxy + m02 * sxz
            b01 = m00 * sxy + m01 * syy + m02 * syz
            b02 = m00 * sxz + m01 * syz + m02 * szz
            b10 = m10 * sxx + m11 * sxy + m12 * sxz
            b11 = m10 * sxy + m11 * syy + m12 * syz
            b12 = m10 * sxz + m11 * syz + m12 * szz
            b20 = m20 * sxx + m21 * sxy + m22 * sxz
            b21 = m20 * sxy + m21 * syy + m22 * syz
            b22 = m20 * sxz + m21 * syz + m22 * szz
            p00 = b00 * m00 + b01 * m01 + b02 * m02
            p01 = b00 * m10 + b01 * m11 + b02 * m12
            p02 = b00 * m20 + b01 * m21 + b02 * m22
            p11 = b10 * m10 + b11 * m11 + b12 * m12
            p12 = b10 * m20 + b11 * m21 + b12 * m22
            p22 = b20 * m20 + b21 * m21 + b22 * m22
            cov_out[i, 0, 0] = p00; cov_out[i, 0, 1] = p01; cov_out[i, 0, 2] = p02  # noqa: E702
            cov_out[i, 1, 0] = p01; cov_out[i, 1, 1] = p11; cov_out[i, 1, 2] = p12  # noqa: E702
            cov_out[i, 2, 0] = p02; cov_out[i, 2, 1] = p12; cov_out[i, 2, 2] = p22  # noqa: E702

    @numba.njit(cache=True)
    def pack_kernel(center_bits, cov_bits, rgba, out):  # pragma: no cover
        # cov_bits [N, 9] float32 bits; the upper triangle (0, 1, 2, 4, 5, 8) becomes 6 float16 in words 4..6.
        # Serial on purpose: ~1.5 ms for 50k, and a parallel launch costs more than that when cores are contended.
        n = out.shape[0]
        for i in range(n):
            out[i, 0] = center_bits[i, 0]
            out[i, 1] = center_bits[i, 1]
            out[i, 2] = center_bits[i, 2]
            out[i, 3] = 0
            out[i, 7] = rgba[i]
            for w in range(3):
                word = 0
                for half in range(2):
                    k = 2 * w + half
                    src = k if k < 3 else (k + 1 if k < 5 else 8)
                    f = np.int64(cov_bits[i, src])
                    # float32 bits -> float16 bits, round to nearest even (numpy's npy_floatbits_to_halfbits)
                    h_sgn = (f >> 16) & 0x8000
                    f_exp = f & 0x7F800000
                    if f_exp >= 0x47800000:  # overflow, inf or nan
                        if f_exp == 0x7F800000 and (f & 0x007FFFFF) != 0:
                            h = h_sgn | 0x7E00
                        else:
                            h = h_sgn | 0x7C00
                    elif f_exp <= 0x38000000:  # half subnormal or zero
                        if f_exp < 0x33000000:
                            h = h_sgn
                        else:
                            f_sig = (0x00800000 + (f & 0x007FFFFF)) >> (113 - (f_exp >> 23))
                            if (f_sig & 0x00003FFF) != 0x00001000 or (f & 0x000007FF) != 0:  # shifted-out bits
                                f_sig += 0x00001000
                            h = h_sgn + (f_sig >> 13)
                    else:
                        f_sig = f & 0x007FFFFF
                        if (f_sig & 0x00003FFF) != 0x00001000:
                            f_sig += 0x00001000
                        h = h_sgn + ((f_exp - 0x38000000) >> 13) + (f_sig >> 13)
                    word |= (h & 0xFFFF) << (16 * half)  # little endian: the first float16 is the low half
                out[i, 4 + w] = np.uint32(word)

    _KERNEL = (pose_kernel, pack_kernel)
    return _KERNEL


def pose_splats(
    prepared: PreparedSplats,
    transforms,  # [J, 4, 4] canonical -> posed bone transforms (Tensor or ndarray)
    offsets: np.ndarray | None = None,  # [N, 3] canonical displacements from a deformer, or None
    config: PosingConfig = PosingConfig(),
) -> SplatArrays:
    """Fast path: forward-skin the prepared Gaussians (sparse LBS, polar rotation, ``R Sigma_c R^T``)."""
    if not isinstance(prepared, PreparedSplats):
        raise TypeError(f"pose_splats: prepared must be a PreparedSplats, got {type(prepared).__name__}")
    n = len(prepared)
    T = transforms.detach().cpu().numpy() if isinstance(transforms, Tensor) else np.asarray(transforms)
    if T.shape != (prepared.num_bones, 4, 4):
        raise ValueError(f"pose_splats: transforms must be [J, 4, 4] with J = {prepared.num_bones}, got "
                         f"{tuple(T.shape)}")
    T = np.ascontiguousarray(T, dtype=np.float64)
    if offsets is not None:
        offsets = np.ascontiguousarray(offsets, dtype=np.float32)
        if offsets.shape != (n, 3):
            raise ValueError(f"pose_splats: offsets must be [{n}, 3], got {tuple(offsets.shape)}")
    centers = np.empty((n, 3), dtype=np.float32)
    cov = np.empty((n, 3, 3), dtype=np.float32)
    _kernel()[0](prepared.means, offsets if offsets is not None else prepared.means, offsets is not None,
              prepared.cov_canonical, prepared.bone_ids, prepared.bone_weights, T, int(config.polar_iterations),
              centers, cov)
    return SplatArrays(centers, cov, prepared.rgbs, prepared.opacities)


def posed_gaussians(gaussians: GaussianSet, transforms: Tensor, offsets: Tensor | None = None) -> GaussianSet:
    """Reference posing with ``avatar.skinning.skin_gaussians`` (dense weights): a posed ``GaussianSet``."""
    from avatar.skinning.lbs import skin_gaussians

    _check_gaussians(gaussians, "posed_gaussians")
    J = gaussians.skin_weights.shape[1]
    if not isinstance(transforms, Tensor) or transforms.shape != (J, 4, 4):
        raise ValueError(f"posed_gaussians: transforms must be a [{J}, 4, 4] tensor, got "
                         f"{getattr(transforms, 'shape', type(transforms).__name__)}")
    means = gaussians.means if offsets is None else gaussians.means + offsets
    with torch.no_grad():
        m, q = skin_gaussians(means, gaussians.quats, gaussians.skin_weights, transforms.to(means))
    return GaussianSet(m, q, gaussians.scales, gaussians.opacities, gaussians.colors)


def pose_splats_reference(gaussians: GaussianSet, transforms: Tensor, offsets: Tensor | None = None) -> SplatArrays:
    """The straightforward torch float32 path (the benchmark's baseline and the tests' reference):
    ``skin_gaussians`` with dense weights, covariance from the posed quaternion and scales, numpy conversion."""
    posed = posed_gaussians(gaussians, transforms, offsets)
    with torch.no_grad():
        cov = canonical_covariances(posed.scales, posed.quats)
    return SplatArrays(
        centers=np.ascontiguousarray(posed.means.cpu().numpy(), dtype=np.float32),
        covariances=np.ascontiguousarray(cov.cpu().numpy(), dtype=np.float32),
        rgbs=to_uint8(posed.colors.cpu().numpy()),
        opacities=to_uint8(posed.opacities.cpu().numpy()[:, None]),
    )


def pack_viser_buffer(splats: SplatArrays) -> np.ndarray:
    """viser's Gaussian buffer ``[N, 8] uint32`` (see ``viser.GaussianSplatHandle``): centers as float32, a reserved
    word, the covariance upper triangle as 6 float16, RGBA as 4 uint8. Assigning it to ``handle.buffer`` sends one
    message, the same bytes ``add_gaussian_splats`` would build."""
    n = splats.centers.shape[0]
    for name, a, shape, dtype in (("centers", splats.centers, (n, 3), np.float32),
                                  ("covariances", splats.covariances, (n, 3, 3), np.float32),
                                  ("rgbs", splats.rgbs, (n, 3), np.uint8), ("opacities", splats.opacities, (n, 1), np.uint8)):
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(f"pack_viser_buffer: {name} must be {np.dtype(dtype).name} {list(shape)}, got "
                             f"{a.dtype} {list(a.shape)}")
    buf = np.empty((n, VISER_BUFFER_WIDTH), dtype=np.uint32)
    rgba = np.ascontiguousarray(np.concatenate([splats.rgbs, splats.opacities], axis=1)).view(np.uint32)[:, 0]
    _kernel()[1](np.ascontiguousarray(splats.centers).view(np.uint32),
                 np.ascontiguousarray(splats.covariances).reshape(n, 9).view(np.uint32), rgba, buf)
    return buf


def skeleton_segments(rest_heads: Tensor, parents, transforms: Tensor) -> np.ndarray:
    """Posed bone segments ``[S, 2, 3]`` float32 (parent head -> child head, one per non-root bone) from
    ``rest_heads [J, 3]`` and ``transforms [J, 4, 4]`` (a head moves rigidly with its own bone)."""
    J = len(parents)
    if rest_heads.shape != (J, 3) or transforms.shape != (J, 4, 4):
        raise ValueError(f"skeleton_segments: rest_heads must be [{J}, 3] and transforms [{J}, 4, 4], got "
                         f"{tuple(rest_heads.shape)} and {tuple(transforms.shape)}")
    h = rest_heads.to(transforms)
    posed = (transforms[:, :3, :3] @ h.unsqueeze(-1)).squeeze(-1) + transforms[:, :3, 3]  # [J, 3]
    child = [j for j in range(J) if parents[j] >= 0]
    par = [parents[j] for j in child]
    seg = torch.stack([posed[par], posed[child]], dim=1)
    return np.ascontiguousarray(seg.detach().cpu().numpy(), dtype=np.float32)


class AvatarPoser:
    """A bundle's avatar on its body model: caches the rest state for the bundle's shape and the prepared splats.

    bundle: ``avatar.export.bundle.Bundle`` (skin weights required); body: the matching ``BodyModel`` (same name and
    bone names as the bundle).
    """

    def __init__(self, bundle, body, config: PosingConfig = PosingConfig()) -> None:
        _check_gaussians(bundle.gaussians, "AvatarPoser")
        if body.name != bundle.body_model_name or tuple(body.bone_names) != tuple(bundle.bone_names):
            raise ValueError(f"AvatarPoser: the bundle was fitted on {bundle.body_model_name!r} with "
                             f"{len(bundle.bone_names)} bones, the body model is {body.name!r} with "
                             f"{body.num_bones} bones (names must match)")
        self.bundle, self.body, self.config = bundle, body, config
        self.gaussians = bundle.gaussians
        self.shape = bundle.shape.to(body.dtype)
        with torch.no_grad():
            self.rest = body.rest(self.shape)
        self.parents = tuple(int(p) for p in body.bone_parents)
        self.prepared = prepare_splats(self.gaussians, config)

    @property
    def num_bones(self) -> int:
        return self.body.num_bones

    def transforms(self, pose: BodyPose) -> Tensor:
        """Bone transforms ``[J, 4, 4]`` for ``pose`` (rotations [J, 3], translation [3]) on the cached rest state.

        Uses the body model's ``_bone_transforms`` with the cached rest: ``bone_transforms(pose, shape)`` rebuilds
        the rest state (anny's blend shapes) on every call, which costs 3-10 ms per pose here."""
        with torch.no_grad():
            p = self.body._batched_pose(pose)
            T, _ = self.body._bone_transforms(p, self.rest)
        return T[0].float()

    def splats(self, transforms: Tensor, offsets: np.ndarray | None = None) -> SplatArrays:
        return pose_splats(self.prepared, transforms, offsets, self.config)

    def skeleton(self, transforms: Tensor) -> np.ndarray:
        return skeleton_segments(self.rest.bone_heads[0].float(), self.parents, transforms)

    def mesh(self, transforms: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The body model's mesh for the bundle's shape, posed: ``(vertices [V, 3] float32, faces [F, 3] int32)``."""
        from avatar.skinning.lbs import lbs_points

        with torch.no_grad():
            v = lbs_points(self.rest.vertices[0].float(), self.body.skin_weights.float(), transforms,
                           self.body.skin_indices)
        return (np.ascontiguousarray(v.numpy(), dtype=np.float32),
                np.ascontiguousarray(self.body.faces.cpu().numpy(), dtype=np.int32))

    def export_ply(self, path: str | Path, transforms: Tensor) -> Path:
        """The posed Gaussians (reference posing) as a 3DGS ``.ply``, written atomically."""
        from avatar.export.ply import write_splat_ply

        return write_splat_ply(path, posed_gaussians(self.gaussians, transforms))

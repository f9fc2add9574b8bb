"""Linear blend skinning of points and 3D Gaussians, its inverse, and dual-quaternion skinning.

Pure functions on tensors. Skinning weights come in one of two layouts:

- dense:  ``weights [..., N, J]`` with ``indices=None``;
- sparse: ``weights [..., N, K]`` with ``indices [N, K]`` (int64 bone ids; the body models' native layout, K=9 for
  anny, K=J for SMPL). Sparse rows may contain zero weights for padding.

``transforms [..., J, 4, 4]`` are the bones' canonical -> posed rigid transforms (``BodyOutput.bone_transforms``).
Batch dimensions ``...`` broadcast between weights, points and transforms.

Written here rather than taken from a library: smplx's ``lbs()`` is tied to SMPL's parameters and anny's skinning
to its own buffers; neither skins Gaussians (rotations / covariances), inverts LBS or blends dual quaternions on
arbitrary point sets. roma provides the quaternion conversions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avatar.geometry.rotations import matrix_to_quat, quat_multiply, quat_to_matrix


def _check_skinning_inputs(points_like: Tensor, weights: Tensor, transforms: Tensor, indices: Tensor | None, what: str) -> None:
    if transforms.ndim < 3 or transforms.shape[-2:] != (4, 4):
        raise ValueError(f"{what}: transforms must be [..., J, 4, 4], got {tuple(transforms.shape)}")
    if weights.ndim < 2:
        raise ValueError(f"{what}: weights must be [..., N, J] (dense) or [..., N, K] with indices, got {tuple(weights.shape)}")
    num_bones = transforms.shape[-3]
    if indices is None:
        if weights.shape[-1] != num_bones:
            raise ValueError(
                f"{what}: dense weights have {weights.shape[-1]} bones but transforms have {num_bones}; "
                f"weights {tuple(weights.shape)}, transforms {tuple(transforms.shape)}"
            )
    else:
        if indices.ndim != 2 or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what}: indices must be an integer tensor [N, K], got {tuple(indices.shape)} {indices.dtype}")
        if indices.shape != weights.shape[-2:]:
            raise ValueError(f"{what}: indices {tuple(indices.shape)} do not match weights {tuple(weights.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_bones):
            raise ValueError(f"{what}: indices must lie in [0, {num_bones}), got [{int(indices.min())}, {int(indices.max())}]")
    if points_like.shape[-2] != weights.shape[-2]:
        raise ValueError(
            f"{what}: {points_like.shape[-2]} points but weights for {weights.shape[-2]}; "
            f"points {tuple(points_like.shape)}, weights {tuple(weights.shape)}"
        )


def _check_points(points: Tensor, what: str, name: str = "points") -> None:
    if points.ndim < 2 or points.shape[-1] != 3:
        raise ValueError(f"{what}: {name} must be [..., N, 3], got {tuple(points.shape)}")


def _blend(weights: Tensor, transforms: Tensor, indices: Tensor | None) -> Tensor:
    T = transforms[..., :3, :].flatten(-2)  # [..., J, 12]
    if indices is not None:
        # scattering into a dense [N, J] matrix and one matmul is ~8x faster on CPU than gathering [N, K, 12]
        weights = _densify(weights, indices, T.shape[-2])
    return (weights @ T).unflatten(-1, (3, 4))  # [..., N, 3, 4]


def _densify(weights: Tensor, indices: Tensor, num_bones: int) -> Tensor:
    dense = weights.new_zeros(*weights.shape[:-1], num_bones)
    return dense.scatter_add(-1, indices.expand_as(weights), weights)


def blend_transforms(weights: Tensor, transforms: Tensor, indices: Tensor | None = None) -> Tensor:
    """Per-point blended transforms ``[..., N, 3, 4]`` (linear part and translation) ``sum_j w_j T_j``."""
    _check_skinning_inputs(weights, weights, transforms, indices, "blend_transforms")
    return _blend(weights, transforms, indices)


def _apply(A: Tensor, points: Tensor) -> Tensor:
    # A [..., N, 3, 4], points [..., N, 3] -> [..., N, 3]
    return (A[..., :3] * points.unsqueeze(-2)).sum(-1) + A[..., 3]


def lbs_points(points: Tensor, weights: Tensor, transforms: Tensor, indices: Tensor | None = None) -> Tensor:
    """Forward LBS: canonical ``points [..., N, 3]`` -> posed ``[..., N, 3]``."""
    _check_points(points, "lbs_points")
    _check_skinning_inputs(points, weights, transforms, indices, "lbs_points")
    return _apply(_blend(weights, transforms, indices), points)


def _cofactor(M: Tensor) -> tuple[Tensor, Tensor]:
    """Cofactor matrices and determinants of ``[..., 3, 3]`` matrices, so that ``M^-T = C / det``."""
    r0, r1, r2 = M[..., 0, :], M[..., 1, :], M[..., 2, :]
    c0 = torch.linalg.cross(r1, r2)
    c1 = torch.linalg.cross(r2, r0)
    c2 = torch.linalg.cross(r0, r1)
    return torch.stack([c0, c1, c2], dim=-2), (r0 * c0).sum(-1)


def _inverse_3x3(M: Tensor) -> Tensor:
    """Closed-form inverse of ``[..., 3, 3]`` matrices via the cofactor matrix (batched, differentiable)."""
    C, det = _cofactor(M)
    return C.transpose(-1, -2) / det[..., None, None]


def inverse_lbs_points(posed: Tensor, weights: Tensor, transforms: Tensor, indices: Tensor | None = None) -> Tensor:
    """Inverse LBS: posed ``points [..., N, 3]`` -> canonical ``[..., N, 3]`` with the points' canonical weights.

    Exact inverse of :func:`lbs_points` for the same weights (the blended transform is inverted per point).
    """
    _check_points(posed, "inverse_lbs_points")
    _check_skinning_inputs(posed, weights, transforms, indices, "inverse_lbs_points")
    A = _blend(weights, transforms, indices)
    inv = _inverse_3x3(A[..., :3])
    return (inv * (posed - A[..., 3]).unsqueeze(-2)).sum(-1)


def polar_rotation(M: Tensor, iterations: int = 4) -> Tensor:
    """Rotation factor of the polar decomposition of ``M [..., 3, 3]`` (det > 0), by Newton iterations
    ``X <- (X + X^-T) / 2``: quadratic convergence for the near-rotations that blending produces, cheaper than a
    batched SVD and differentiable."""
    X = M
    for _ in range(iterations):
        C, det = _cofactor(X)
        # determinant scaling (Higham): gamma = |det X|^(-1/3) balances X and X^-T, fewer iterations needed
        gamma = det.abs().clamp_min(1e-12).pow(-1.0 / 3.0)[..., None, None]
        X = 0.5 * (gamma * X + C / (det[..., None, None] * gamma))
    return X


def skin_gaussians(
    means: Tensor,
    quats: Tensor,
    weights: Tensor,
    transforms: Tensor,
    indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward LBS of 3D Gaussians: ``means [..., N, 3]``, rotations ``quats [..., N, 4]`` (wxyz).

    Means move by the blended transform; rotations by the rotation factor of its linear part (the polar
    decomposition), so scales stay the Gaussian's own. Returns posed ``(means, quats)``; quats are unit, w >= 0.
    Use :func:`skin_covariances` to apply the full blended linear map to covariances instead.
    """
    _check_points(means, "skin_gaussians", "means")
    if quats.shape[-1] != 4 or quats.shape[:-1] != means.shape[:-1]:
        raise ValueError(f"skin_gaussians: quats must be [..., N, 4] matching means {tuple(means.shape)}, got {tuple(quats.shape)}")
    _check_skinning_inputs(means, weights, transforms, indices, "skin_gaussians")
    A = _blend(weights, transforms, indices)
    R = polar_rotation(A[..., :3])
    posed_quats = quat_multiply(matrix_to_quat(R), quats / quats.norm(dim=-1, keepdim=True))
    posed_quats = torch.where(posed_quats[..., :1] < 0, -posed_quats, posed_quats)
    return _apply(A, means), posed_quats


def skin_covariances(
    means: Tensor,
    covariances: Tensor,
    weights: Tensor,
    transforms: Tensor,
    indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward LBS of Gaussians given as ``means [..., N, 3]`` and ``covariances [..., N, 3, 3]``:
    ``mu' = A mu + a``, ``Sigma' = A Sigma A^T`` with the blended transform ``[A | a]`` (exact for the linear map)."""
    _check_points(means, "skin_covariances", "means")
    if covariances.shape[-2:] != (3, 3) or covariances.shape[:-2] != means.shape[:-1]:
        raise ValueError(
            f"skin_covariances: covariances must be [..., N, 3, 3] matching means {tuple(means.shape)}, got {tuple(covariances.shape)}"
        )
    _check_skinning_inputs(means, weights, transforms, indices, "skin_covariances")
    A = _blend(weights, transforms, indices)
    L = A[..., :3]
    return _apply(A, means), L @ covariances @ L.transpose(-1, -2)


def dqs_points(points: Tensor, weights: Tensor, transforms: Tensor, indices: Tensor | None = None) -> Tensor:
    """Dual-quaternion skinning of canonical ``points [..., N, 3]`` (Kavan et al. 2007): bone transforms become unit
    dual quaternions, are blended with signs aligned to each point's most-weighted bone, normalized and applied.
    Avoids LBS's candy-wrapper collapse at twisting joints; the transforms must be rigid."""
    _check_points(points, "dqs_points")
    _check_skinning_inputs(points, weights, transforms, indices, "dqs_points")
    q = matrix_to_quat(transforms[..., :3, :3])  # [..., J, 4]
    t = transforms[..., :3, 3]
    t_quat = torch.cat([torch.zeros_like(t[..., :1]), t], dim=-1)
    d = 0.5 * quat_multiply(t_quat, q)  # dual part [..., J, 4]
    if indices is None:
        batch = torch.broadcast_shapes(weights.shape[:-2], q.shape[:-2])
        qb = q.expand(*batch, *q.shape[-2:])
        pivot = weights.expand(*batch, *weights.shape[-2:]).argmax(dim=-1)  # [..., N]
        qp = torch.gather(qb, -2, pivot.unsqueeze(-1).expand(*pivot.shape, 4))  # [..., N, 4]
        sign = torch.sign(qp @ qb.transpose(-1, -2))  # [..., N, J]
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        w = weights * sign
        b0 = w @ q
        be = w @ d
    else:
        qg = q.index_select(-2, indices.reshape(-1)).unflatten(-2, indices.shape)  # [..., N, K, 4]
        dg = d.index_select(-2, indices.reshape(-1)).unflatten(-2, indices.shape)
        batch = torch.broadcast_shapes(weights.shape[:-2], qg.shape[:-3])
        qg = qg.expand(*batch, *qg.shape[-3:])
        dg = dg.expand(*batch, *dg.shape[-3:])
        pivot = weights.expand(*batch, *weights.shape[-2:]).argmax(dim=-1, keepdim=True)  # [..., N, 1]
        qp = torch.gather(qg, -2, pivot.unsqueeze(-1).expand(*pivot.shape, 4))  # [..., N, 1, 4]
        sign = torch.sign((qg * qp).sum(-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        w = (weights * sign).unsqueeze(-1)
        b0 = (w * qg).sum(-2)
        be = (w * dg).sum(-2)
    norm = b0.norm(dim=-1, keepdim=True)
    b0 = b0 / norm
    be = be / norm
    conj = b0 * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=b0.dtype, device=b0.device)
    trans = 2.0 * quat_multiply(be, conj)[..., 1:]
    R = quat_to_matrix(b0)
    return (R * points.unsqueeze(-2)).sum(-1) + trans

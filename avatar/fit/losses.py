"""Losses of the per-subject fit: pure functions with shape checks, and their weights (``LossConfig``).

Images are ``[..., H, W, 3]`` in [0, 1], masks and alphas ``[..., H, W]`` (ARCHITECTURE.md). LPIPS is not here:
its backbone weights are not available offline (see ARCHITECTURE.md); it is reported by ``avatar.eval`` where it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_images(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.ndim < 3 or pred.shape[-1] != 3:
        raise ValueError(f"{name}: pred must be [..., H, W, 3], got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error of images ``[..., H, W, 3]``."""
    _check_images("l1_loss", pred, target)
    return (pred - target).abs().mean()


def ssim(pred: Tensor, target: Tensor, window: int = 11) -> Tensor:
    """Mean SSIM (kornia, Gaussian window ``window``, sigma 1.5) of images ``[..., H, W, 3]``."""
    _check_images("ssim", pred, target)
    import kornia

    p = pred.reshape(-1, *pred.shape[-3:]).permute(0, 3, 1, 2)
    t = target.reshape(-1, *target.shape[-3:]).permute(0, 3, 1, 2)
    return kornia.metrics.ssim(p, t, window, max_val=1.0, padding="same").mean()


def ssim_loss(pred: Tensor, target: Tensor, window: int = 11) -> Tensor:
    """``1 - SSIM``."""
    return 1.0 - ssim(pred, target, window)


def mask_loss(alpha: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error between rendered ``alpha [..., H, W]`` and ``mask [..., H, W]``."""
    if alpha.ndim < 2 or alpha.shape != mask.shape:
        raise ValueError(f"mask_loss: alpha {tuple(alpha.shape)} and mask {tuple(mask.shape)} must be the same [..., H, W]")
    return (alpha - mask).square().mean()


def scale_loss(scales: Tensor, limit: float) -> Tensor:
    """Mean over Gaussians of ``relu(max axis scale - limit)`` for linear ``scales [N, 3]`` (metres): discourages
    needle-like or huge Gaussians that smear under new poses."""
    if scales.ndim != 2 or scales.shape[1] != 3:
        raise ValueError(f"scale_loss: scales must be [N, 3], got {tuple(scales.shape)}")
    if scales.shape[0] == 0:
        return scales.sum()
    return F.relu(scales.max(dim=1).values - limit).mean()


def aiap_loss(canonical: Tensor, posed: Tensor, neighbours: Tensor) -> Tensor:
    """As-isometric-as-possible: mean ``| |x_i - x_j| - |y_i - y_j| |`` over each point i and its neighbours j
    (``neighbours [N, K]`` found in canonical space), for canonical ``x [N, 3]`` and posed ``y [N, 3]`` means."""
    if canonical.ndim != 2 or canonical.shape[1] != 3 or posed.shape != canonical.shape:
        raise ValueError(f"aiap_loss: canonical and posed must both be [N, 3], got {tuple(canonical.shape)}, "
                         f"{tuple(posed.shape)}")
    if neighbours.ndim != 2 or neighbours.shape[0] != canonical.shape[0] or neighbours.dtype != torch.int64:
        raise ValueError(f"aiap_loss: neighbours must be int64 [{canonical.shape[0]}, K], got "
                         f"{neighbours.dtype} {tuple(neighbours.shape)}")
    flat = neighbours.reshape(-1)
    # index_select (backward: index_add) rather than advanced indexing, whose CPU backward (index_put_ with
    # accumulate) is not deterministic
    dc = (canonical[:, None] - canonical.index_select(0, flat).view(*neighbours.shape, 3)).norm(dim=-1)
    dp = (posed[:, None] - posed.index_select(0, flat).view(*neighbours.shape, 3)).norm(dim=-1)
    return (dc - dp).abs().mean()


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] (over all elements)."""
    _check_images("psnr", pred, target)
    return -10.0 * torch.log10((pred - target).square().mean().clamp_min(1e-10))


def mask_bbox(mask: Tensor, margin: int = 4) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the pixels where ``mask [H, W] > 0.5`` grown by ``margin``; the whole image if empty."""
    if mask.ndim != 2:
        raise ValueError(f"mask_bbox: mask must be [H, W], got {tuple(mask.shape)}")
    H, W = mask.shape
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if ys.numel() == 0:
        return 0, H, 0, W
    return (max(int(ys.min()) - margin, 0), min(int(ys.max()) + 1 + margin, H),
            max(int(xs.min()) - margin, 0), min(int(xs.max()) + 1 + margin, W))


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (0 switches a term off)."""

    l1: float = 1.0
    """L1 on the composited image."""
    ssim: float = 0.2
    """``1 - SSIM`` on the composited image (inside the mask's box when ``crop_to_mask``)."""
    mask: float = 0.1
    """L2 between rendered alpha and the mask."""
    aiap: float = 0.05
    """As-isometric-as-possible on the means' K nearest canonical neighbours."""
    aiap_neighbours: int = 5
    """K for the AIAP term (3DGS-Avatar: 5)."""
    scale: float = 1.0
    """Penalty on scales above ``scale_limit``."""
    scale_limit: float = 0.02
    """Metres; the largest axis a Gaussian may have without penalty."""
    pose_prior: float = 1.0
    """L2 prior on the per-frame pose corrections (if pose refinement is on)."""
    crop_to_mask: bool = True
    """Compute L1 and SSIM inside the mask's bounding box (GauHuman computes its losses inside the body's 2D box)."""


@dataclass(frozen=True)
class LossTerms:
    """The weighted total and each (unweighted) term, as tensors (0-dim)."""

    total: Tensor
    l1: Tensor
    ssim: Tensor
    mask: Tensor
    aiap: Tensor
    scale: Tensor
    pose_prior: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "l1", "ssim", "mask", "aiap", "scale", "pose_prior")}


def total_loss(
    cfg: LossConfig,
    pred: Tensor,  # [H, W, 3] rendered (composited over the background)
    target: Tensor,  # [H, W, 3] ground truth composited over the same background
    alpha: Tensor,  # [H, W]
    mask: Tensor,  # [H, W]
    scales: Tensor,  # [N, 3] linear
    canonical_means: Tensor | None = None,  # [N, 3]
    posed_means: Tensor | None = None,  # [N, 3]
    neighbours: Tensor | None = None,  # [N, K]
    pose_prior_value: Tensor | None = None,  # 0-dim
) -> LossTerms:
    """The weighted sum of the terms of ``cfg`` (terms with weight 0 or missing inputs are 0 and not computed)."""
    _check_images("total_loss", pred, target)
    zero = pred.new_zeros(())
    if cfg.crop_to_mask:
        y0, y1, x0, x1 = mask_bbox(mask)
        pc, tc = pred[y0:y1, x0:x1], target[y0:y1, x0:x1]
    else:
        pc, tc = pred, target
    l1 = l1_loss(pc, tc) if cfg.l1 else zero
    ss = ssim_loss(pc, tc) if cfg.ssim else zero
    mk = mask_loss(alpha, mask) if cfg.mask else zero
    sc = scale_loss(scales, cfg.scale_limit) if cfg.scale else zero
    ai = zero
    if cfg.aiap and neighbours is not None and canonical_means is not None and posed_means is not None:
        ai = aiap_loss(canonical_means, posed_means, neighbours)
    pp = pose_prior_value if (cfg.pose_prior and pose_prior_value is not None) else zero
    total = cfg.l1 * l1 + cfg.ssim * ss + cfg.mask * mk + cfg.scale * sc + cfg.aiap * ai + cfg.pose_prior * pp
    return LossTerms(total, l1, ss, mk, ai, sc, pp)

"""Differentiable 3D Gaussian splatting: one public function, three backends.

``rasterize_gaussians`` renders colour, alpha and expected-depth images of 3D Gaussians for a batch of pinhole
cameras, with gsplat's (v1.5) conventions (see ``gaussians_torch`` for the exact list):

* ``"gsplat"``: ``gsplat.rasterization`` (CUDA tensors only; imported lazily);
* ``"cpu"``: the compiled numba tile rasterizer of ``gaussians_cpu`` with a hand-written backward (no installable
  library is fast with gradients on CPU, and gsplat's per-pixel step is CUDA only);
* ``"torch"``: the slow readable reference of ``gaussians_torch`` (autograd, also gives camera gradients);
* ``"auto"``: gsplat for CUDA tensors, else cpu; the choice is logged once.

Depth: ``depths`` is the *accumulated* camera z, ``sum_i w_i z_i`` (gsplat's ``"RGB+D"`` mode), not normalized by
alpha; the expected depth of the visible surface is ``depths / alphas.clamp_min(eps)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()

BACKENDS = ("auto", "cpu", "torch", "gsplat")


@dataclass(frozen=True)
class GaussianRender:
    colors: Tensor  # [C, H, W, D] composited colour (+ T_final * background)
    alphas: Tensor  # [C, H, W] accumulated opacity 1 - T_final
    depths: Tensor  # [C, H, W] accumulated camera z, sum_i w_i z_i (divide by alphas for the expected depth)
    means2d: Tensor  # [C, N, 2] projected centres in pixels; call .retain_grad() before backward for densification
    radii: Tensor  # [C, N, 2] int32 screen-space half box per axis, 0 where culled


def _check(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"means must be [N, 3], got {tuple(means.shape)}")
    N = means.shape[0]
    for name, t, shape in (("quats", quats, (N, 4)), ("scales", scales, (N, 3)), ("opacities", opacities, (N,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for N={N} Gaussians, got {tuple(t.shape)}")
    if colors.ndim != 2 or colors.shape[0] != N or colors.shape[1] < 1:
        raise ValueError(f"colors must be [N, D] with N={N}, got {tuple(colors.shape)}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats must be [C, 4, 4], got {tuple(viewmats.shape)}")
    if Ks.ndim != 3 or Ks.shape[1:] != (3, 3) or Ks.shape[0] != viewmats.shape[0]:
        raise ValueError(f"Ks must be [C, 3, 3] with C={viewmats.shape[0]}, got {tuple(Ks.shape)}")
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if background is not None and tuple(background.shape) != (colors.shape[1],):
        raise ValueError(f"background must be [D] with D={colors.shape[1]}, got {tuple(background.shape)}")
    tensors = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats,
                   Ks=Ks)
    if background is not None:
        tensors["background"] = background
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {t.dtype}")
        if not bool(_host(t, np.isfinite).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if N and bool(_host(quats, _has_zero_row)):
        raise ValueError("quats contains zero quaternions (cannot be normalized)")
    if N and bool(_host(scales, lambda s: s.min() < 0)):
        raise ValueError("scales must be non-negative (linear, metres)")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _has_zero_row(q) -> bool:
    """Any all-zero row in ``q [N, 4]`` (numpy or torch): the row sums of ``|q|`` as a mat-vec product, ~3x faster
    than ``(q == 0).all(-1).any()`` or a sum over the short axis at 50k rows (exact: sums of non-negatives)."""
    ones = np.ones(q.shape[-1], q.dtype) if isinstance(q, np.ndarray) else q.new_ones(q.shape[-1])
    return bool((abs(q) @ ones).min() == 0)


def _host(t: Tensor, fn):
    """``fn`` of a CPU float32/float64 tensor evaluated by numpy on this thread: a torch op on more than ~32k elements
    runs on OpenMP threads whose spin-waiting competes with the numba kernels for the cores (see ``gaussians_cpu``).
    Other tensors (CUDA, half precision) go through torch."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return fn(t.detach().numpy())
    return fn(t.detach())


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def rasterize_gaussians(
    means: Tensor,  # [N, 3] world positions
    quats: Tensor,  # [N, 4] wxyz rotations (normalized inside)
    scales: Tensor,  # [N, 3] linear standard deviations, metres
    opacities: Tensor,  # [N] in (0, 1)
    colors: Tensor,  # [N, D] any number of channels
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, OpenCV (x right, y down, z forward)
    Ks: Tensor,  # [C, 3, 3] pinhole intrinsics in pixels
    width: int,
    height: int,
    background: Tensor | None = None,  # [D] composited as T_final * background
    backend: str = "auto",
) -> GaussianRender:
    """Render N Gaussians into C cameras; differentiable with respect to means, quats, scales, opacities, colors and
    background (the torch and gsplat backends also to the cameras). Raises ValueError on malformed or non-finite
    input. See the module docstring for the depth convention."""
    _check(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background, backend)
    width, height = int(width), int(height)
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "cpu"
        _log_once(f"rasterize_gaussians: backend 'auto' picked '{backend}' for {means.device} tensors")
    if backend == "gsplat":
        return _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background)
    if means.is_cuda:
        raise ValueError(f"backend {backend!r} runs on CPU tensors; use backend='gsplat' (or 'auto') for CUDA")

    C, N, D = viewmats.shape[0], means.shape[0], colors.shape[1]
    if N == 0:
        zeros = colors.new_zeros(C, height, width, D)
        bg = zeros if background is None else zeros + background
        return GaussianRender(bg, colors.new_zeros(C, height, width), colors.new_zeros(C, height, width),
                              means.new_zeros(C, 0, 2), torch.zeros(C, 0, 2, dtype=torch.int32))
    if backend == "cpu":
        from avatar.render import gaussians_cpu

        return GaussianRender(*gaussians_cpu.rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width,
                                                       height, background))
    from avatar.render import gaussians_torch as impl

    proj = impl.project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height)
    means2d, conics, depths, radii = proj[:4]
    feats = torch.cat([colors.expand(C, N, D), depths[..., None]], dim=-1)  # [C, N, D + 1]: depth as a channel
    out, alphas = impl.rasterize_projected(means2d, conics, opacities.expand(C, N), feats, radii, depths,
                                           width, height)
    rgb, depth = out[..., :D], out[..., D]
    if background is not None:
        rgb = rgb + (1.0 - alphas)[..., None] * background
    return GaussianRender(rgb, alphas, depth, means2d, radii)


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background):
    if not means.is_cuda:
        raise ValueError("backend 'gsplat' needs CUDA tensors (gsplat's rasterizer is CUDA only); "
                         "use backend='cpu' or 'auto' for CPU tensors")
    try:
        import gsplat
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("backend 'gsplat' needs the gsplat package (pip install gsplat)") from e
    C, D = viewmats.shape[0], colors.shape[1]
    bg = None
    if background is not None:
        bg = torch.cat([background, background.new_zeros(1)]).expand(C, D + 1)
    img, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, render_mode="RGB+D",
        backgrounds=bg, packed=False, rasterize_mode="classic", near_plane=0.01, far_plane=1e10, eps2d=0.3)
    means2d = meta["means2d"]
    radii = meta["radii"]
    if radii.ndim == 2:  # older gsplat: one radius for both axes
        radii = radii[..., None].expand(-1, -1, 2)
    return GaussianRender(img[..., :D], alphas[..., 0], img[..., D], means2d, radii.to(torch.int32))


def render_gaussian_set(
    gaussians,  # avatar.types.GaussianSet (posed, world space)
    cameras,  # avatar.types.Cameras with viewmats [C, 4, 4], Ks [C, 3, 3]
    background: Tensor | None = None,  # [3]
    backend: str = "auto",
) -> GaussianRender:
    """Render a ``GaussianSet`` for a batch of ``Cameras`` (a thin wrapper over :func:`rasterize_gaussians`)."""
    viewmats, Ks = cameras.viewmats, cameras.Ks
    if viewmats.ndim == 2:
        viewmats, Ks = viewmats[None], Ks[None]
    return rasterize_gaussians(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities,
                               gaussians.colors, viewmats, Ks, cameras.width, cameras.height, background=background,
                               backend=backend)

"""Image and geometry metrics (pure functions; device and dtype follow the inputs).

Images follow ARCHITECTURE.md: float ``[H, W, 3]`` or ``[B, H, W, 3]`` in [0, 1] (data range 1). Every image metric
returns one value per image (``[B]``; a scalar tensor for an unbatched input). ``crop_mask`` (``[H, W]`` or
``[B, H, W]``) evaluates inside the 2D bounding box of the mask's foreground (``> 0.5``), as GauHuman does with the
body's box; without it the whole image counts.

LPIPS is never faked: :func:`lpips_metric` gives a callable only when the ``lpips`` package, torchvision and the
backbone weights are all present locally (checked without network access), otherwise ``None`` and the reason.
Geometry distances are in metres in and millimetres out.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

SSIM_WINDOW = 11  # Gaussian window 11x11, sigma 1.5 (3DGS / GauHuman / skimage gaussian_weights=True)

# torchvision backbone checkpoints that ``lpips.LPIPS(net=...)`` loads through the torch hub cache.
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


# ----------------------------------------------------------------------------------------------- image helpers
def _as_batch(name: str, image: Tensor) -> tuple[Tensor, bool]:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image, single = image[None], True
    elif image.ndim == 4:
        single = False
    else:
        raise ValueError(f"{name} must be [H, W, 3] or [B, H, W, 3], got {tuple(image.shape)}")
    if image.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 channels last ([..., H, W, 3]), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a float image in [0, 1], got dtype {image.dtype}")
    return image, single


def _check_pair(pred: Tensor, gt: Tensor, crop_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    pred, single = _as_batch("pred", pred)
    gt, _ = _as_batch("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if crop_mask is not None:
        if crop_mask.ndim == 2:
            crop_mask = crop_mask[None]
        if crop_mask.shape != pred.shape[:3]:
            raise ValueError(f"crop_mask must be [H, W] or [B, H, W] matching {tuple(pred.shape[:3])}, "
                             f"got {tuple(crop_mask.shape)}")
    return pred, gt, crop_mask, single


def mask_bbox(mask: Tensor, margin: int = 0) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive, of the foreground (``> 0.5``) of ``mask [H, W]``, grown by ``margin`` px and
    clipped to the image; the whole image when the mask is empty."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got {tuple(mask.shape)}")
    H, W = mask.shape
    fg = mask > 0.5
    if not bool(fg.any()):
        return 0, H, 0, W
    ys = torch.nonzero(fg.any(dim=1)).flatten()
    xs = torch.nonzero(fg.any(dim=0)).flatten()
    y0, y1 = int(ys[0]) - margin, int(ys[-1]) + 1 + margin
    x0, x1 = int(xs[0]) - margin, int(xs[-1]) + 1 + margin
    return max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)


def _crops(pred: Tensor, gt: Tensor, crop_mask: Tensor | None):
    """Yield (pred [H', W', 3], gt [H', W', 3]) per image, cropped to the mask's box when given."""
    for b in range(pred.shape[0]):
        if crop_mask is None:
            yield pred[b], gt[b]
        else:
            y0, y1, x0, x1 = mask_bbox(crop_mask[b])
            yield pred[b, y0:y1, x0:x1], gt[b, y0:y1, x0:x1]


def _finish(values: list[Tensor], single: bool) -> Tensor:
    out = torch.stack(values)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------- image metrics
def psnr(pred: Tensor, gt: Tensor, crop_mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB with data range 1: ``10 log10(1 / MSE)`` per image (inf when equal).

    pred, gt:  [H, W, 3] or [B, H, W, 3] in [0, 1].
    crop_mask: [H, W] or [B, H, W]; evaluate inside its foreground bounding box.
    Returns [] or [B].
    """
    pred, gt, crop_mask, single = _check_pair(pred, gt, crop_mask)
    vals = []
    for p, g in _crops(pred, gt, crop_mask):
        mse = torch.mean((p - g) ** 2)
        vals.append(-10.0 * torch.log10(mse))
    return _finish(vals, single)


def ssim(pred: Tensor, gt: Tensor, crop_mask: Tensor | None = None, padding: str = "same") -> Tensor:
    """Structural similarity with an 11x11 Gaussian window (sigma 1.5), data range 1, mean over pixels and channels.

    padding: "same" (zero padding, what the 3DGS / GauHuman evaluation code computes) or "valid" (only windows
             inside the image; equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
             sigma=1.5, use_sample_covariance=False, data_range=1)``).
    Returns [] or [B].
    """
    import kornia

    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    pred, gt, crop_mask, single = _check_pair(pred, gt, crop_mask)
    vals = []
    for p, g in _crops(pred, gt, crop_mask):
        if min(p.shape[0], p.shape[1]) < SSIM_WINDOW:
            raise ValueError(f"SSIM needs images (or crops) of at least {SSIM_WINDOW}x{SSIM_WINDOW}, "
                             f"got {p.shape[0]}x{p.shape[1]}")
        m = kornia.metrics.ssim(p.permute(2, 0, 1)[None], g.permute(2, 0, 1)[None], SSIM_WINDOW,
                                max_val=1.0, padding=padding)
        vals.append(m.mean())
    return _finish(vals, single)


@dataclass(frozen=True)
class LpipsStatus:
    """Whether LPIPS can be computed here: ``fn`` is None exactly when ``reason`` says why not."""

    fn: Callable[..., Tensor] | None
    reason: str

    @property
    def available(self) -> bool:
        return self.fn is not None


def lpips_metric(net: str = "alex", hub_dir: str | Path | None = None) -> LpipsStatus:
    """An LPIPS callable ``fn(pred, gt, crop_mask=None) -> [] or [B]`` if it can run offline, else a reason.

    Checks, without any network access: the ``lpips`` and ``torchvision`` packages are importable, lpips' own
    linear-layer weights ship inside the package, and the torchvision backbone checkpoint of ``net`` is in the torch
    hub cache (``hub_dir`` or ``torch.hub.get_dir()``, ``checkpoints/<file>``). The model runs on the inputs'
    device and dtype float32; multiply by 1000 for the papers' tables.
    """
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    for pkg in ("lpips", "torchvision"):
        if importlib.util.find_spec(pkg) is None:
            return LpipsStatus(None, f"the '{pkg}' package is not installed")
    spec = importlib.util.find_spec("lpips")
    pkg_dir = Path(spec.origin).parent if spec and spec.origin else None
    lin = pkg_dir / "weights" / "v0.1" / f"{net}.pth" if pkg_dir else None
    if lin is None or not lin.is_file():
        return LpipsStatus(None, f"lpips linear-layer weights not found ({lin})")
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    backbone = hub / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    if not backbone.is_file():
        return LpipsStatus(None, f"backbone weights for '{net}' not in the local torch hub cache ({backbone}); "
                                 "nothing is downloaded at run time")
    previous = torch.hub.get_dir()
    try:
        torch.hub.set_dir(str(hub))  # torchvision reads the backbone from <hub>/checkpoints; restored below
        import lpips  # noqa: PLC0415 (optional, heavy)

        model = lpips.LPIPS(net=net, verbose=False).eval()
    except Exception as e:  # a broken optional install must not break evaluation: report why
        return LpipsStatus(None, f"lpips failed to load: {type(e).__name__}: {e}")
    finally:
        torch.hub.set_dir(previous)
    for p in model.parameters():
        p.requires_grad_(False)

    def fn(pred: Tensor, gt: Tensor, crop_mask: Tensor | None = None) -> Tensor:
        pred, gt, crop_mask, single = _check_pair(pred, gt, crop_mask)
        m = model.to(pred.device)
        vals = []
        with torch.no_grad():
            for p, g in _crops(pred, gt, crop_mask):
                x = p.permute(2, 0, 1)[None].float() * 2 - 1
                y = g.permute(2, 0, 1)[None].float() * 2 - 1
                vals.append(m(x, y).flatten()[0])
        return _finish(vals, single)

    return LpipsStatus(fn, f"lpips ({net}) from {backbone}")


# -------------------------------------------------------------------------------------------- geometry metrics
def _check_mesh(vertices: Tensor, faces: Tensor) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype in (torch.float16, torch.float32, torch.float64):
        raise ValueError(f"faces must be integer [F, 3], got {tuple(faces.shape)} {faces.dtype}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise ValueError(f"faces index outside [0, {vertices.shape[0]})")


_EXACT = "donot_use_mm_for_euclid_dist"  # cdist's matmul form loses ~1e-4 m in float32; the bound test needs exact


def _pair_distance2(p: Tensor, a: Tensor, b: Tensor, c: Tensor, n: Tensor, degenerate: Tensor) -> Tensor:
    """Squared distance of points p [K, 3] to triangles (a, b, c) [K, 3] with unit normals n [K, 3]: [K]."""
    h = ((p - a) * n).sum(-1)  # signed plane distance
    q = p - h[:, None] * n  # projection onto the plane
    inside = ~degenerate
    for u, w in ((a, b), (b, c), (c, a)):
        inside = inside & ((torch.linalg.cross(w - u, q - u) * n).sum(-1) >= 0)
    d2 = torch.where(inside, h * h, torch.full_like(h, math.inf))
    for u, w in ((a, b), (b, c), (c, a)):
        e = w - u
        t = (((p - u) * e).sum(-1) / (e * e).sum(-1).clamp_min(1e-30)).clamp(0, 1)
        d2 = torch.minimum(d2, ((p - u - t[:, None] * e) ** 2).sum(-1))
    return d2


def point_to_mesh_distance(
    points: Tensor,  # [N, 3] metres
    vertices: Tensor,  # [V, 3] metres
    faces: Tensor,  # [F, 3] int
    chunk: int = 1024,
) -> Tensor:  # [N] unsigned distance to the nearest point of the surface, metres
    """Exact point-to-triangle distance (no spatial index, no extra dependency).

    Per triangle: the distance to its plane where the projection falls inside, else to its nearest edge.
    Pruning keeps it fast on body meshes: the nearest vertex gives an upper bound ``u`` per point, and only faces
    whose bounding sphere (centroid, radius) comes within ``u`` are evaluated exactly (a face the point is nearest
    to always passes). Degenerate (zero-area) faces count through their edges.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    _check_mesh(vertices, faces)
    if faces.shape[0] == 0:
        raise ValueError("the mesh has no faces")
    v = vertices.to(points.device, points.dtype)
    faces = faces.to(points.device).long()
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]  # [F, 3]
    n = torch.linalg.cross(b - a, c - a)
    nn = n.norm(dim=-1, keepdim=True)
    degenerate = nn[:, 0] <= 1e-20
    n = n / nn.clamp_min(1e-30)
    centroid = (a + b + c) / 3
    radius = torch.stack([(x - centroid).norm(dim=-1) for x in (a, b, c)], -1).amax(-1)  # [F]
    used = torch.unique(faces)
    out = []
    for s in range(0, points.shape[0], chunk):
        p = points[s:s + chunk]  # [P, 3]
        upper = torch.cdist(p, v[used], compute_mode=_EXACT).amin(dim=1)  # [P] to the nearest vertex
        slack = 1e-6 * (1 + upper)  # round-off margin of the bound test
        cand = torch.cdist(p, centroid, compute_mode=_EXACT) - radius <= (upper + slack)[:, None]  # [P, F]
        pi, fi = torch.nonzero(cand, as_tuple=True)
        best = (upper * upper).clone()
        for t in range(0, pi.shape[0], 1_000_000):
            i, f = pi[t:t + 1_000_000], fi[t:t + 1_000_000]
            d2 = _pair_distance2(p[i], a[f], b[f], c[f], n[f], degenerate[f])
            best = best.scatter_reduce(0, i, d2, reduce="amin")
        out.append(best.clamp_min(0).sqrt())
    return torch.cat(out)


def sample_mesh_surface(
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:  # [num_samples, 3] uniform by area
    """Uniform samples on a triangle mesh's surface (faces by area, then uniform barycentrics)."""
    _check_mesh(vertices, faces)
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1)
    if not bool(area.sum() > 0):
        raise ValueError("the mesh has zero surface area")
    dev = generator.device if generator is not None else torch.device("cpu")
    idx = torch.multinomial(area.to(dev, torch.float64), num_samples, replacement=True, generator=generator)
    r = torch.rand(num_samples, 2, generator=generator, device=dev, dtype=torch.float64)
    s = r[:, 0].sqrt()
    w = torch.stack([1 - s, s * (1 - r[:, 1]), s * r[:, 1]], dim=-1).to(vertices.device, vertices.dtype)
    idx = idx.to(vertices.device)
    return w[:, :1] * a[idx] + w[:, 1:2] * b[idx] + w[:, 2:] * c[idx]


def nearest_point_distance(
    queries: Tensor,  # [M, 3]
    points: Tensor,  # [N, 3]
    chunk: int = 4096,
) -> Tensor:  # [M] distance from each query to its nearest point
    if queries.ndim != 2 or queries.shape[1] != 3 or points.ndim != 2 or points.shape[1] != 3 or not len(points):
        raise ValueError(f"queries and points must be [M, 3] and non-empty [N, 3], got {tuple(queries.shape)}, "
                         f"{tuple(points.shape)}")
    p = points.to(queries.dtype)
    return torch.cat([torch.cdist(queries[s:s + chunk], p, compute_mode=_EXACT).min(dim=1).values
                      for s in range(0, queries.shape[0], chunk)])


@dataclass(frozen=True)
class GeometryError:
    """Gaussian centres vs a ground-truth posed surface, millimetres.

    to_mesh_*:   centre -> nearest point of the surface (accuracy).
    from_mesh_*: uniform surface sample -> nearest centre (completeness).
    chamfer_mm:  (to_mesh_mean_mm + from_mesh_mean_mm) / 2.
    """

    to_mesh_mean_mm: float
    to_mesh_median_mm: float
    from_mesh_mean_mm: float
    from_mesh_median_mm: float
    chamfer_mm: float
    num_points: int
    num_samples: int


def geometry_error(
    centres: Tensor,  # [N, 3] posed Gaussian means, metres
    vertices: Tensor,  # [V, 3] ground-truth posed vertices, metres
    faces: Tensor,  # [F, 3] int
    num_samples: int = 20_000,
    generator: torch.Generator | None = None,
) -> GeometryError:
    """Chamfer-like error of Gaussian centres against a ground-truth mesh (see :class:`GeometryError`)."""
    if centres.ndim != 2 or centres.shape[1] != 3 or centres.shape[0] == 0:
        raise ValueError(f"centres must be non-empty [N, 3], got {tuple(centres.shape)}")
    with torch.no_grad():
        c = centres.detach()
        v = vertices.detach().to(c.device, c.dtype)
        f = faces.to(c.device)
        d_to = point_to_mesh_distance(c, v, f) * 1000.0
        samples = sample_mesh_surface(v, f, num_samples, generator)
        d_from = nearest_point_distance(samples, c) * 1000.0
    to_mean, from_mean = float(d_to.mean()), float(d_from.mean())
    return GeometryError(to_mean, float(d_to.median()), from_mean, float(d_from.median()),
                         (to_mean + from_mean) / 2, int(c.shape[0]), int(num_samples))

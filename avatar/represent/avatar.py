"""Canonical 3D Gaussians of one subject, skinned to a body model (the fitted avatar).

Parametrization (what the optimizer sees; ``canonical()`` turns it into a ``GaussianSet``):

- ``means``          [N, 3] canonical positions, metres (the body model's rest pose for the subject's shape);
- ``quats``          [N, 4] wxyz rotations, unnormalized;
- ``log_scales``     [N, 3] log standard deviations (``scales = exp(log_scales)``);
- ``opacity_logits`` [N]    (``opacities = sigmoid``);
- ``color_logits``   [N, 3] (``colors = sigmoid``): logits rather than clamped raw RGB so every colour stays in
  (0, 1) with a non-zero gradient, as in 3DGS's opacity.

Skinning weights are ``base_weights`` (a buffer: the body model's dense weights interpolated with the barycentrics
of the surface point each Gaussian was born from, inherited by clones and splits) optionally corrected by a
``ResidualWeightField`` (``avatar.skinning.weights``), which starts at exactly the base weights.

Per-Gaussian tensors change size under densification through ``replace_gaussians``; the densification strategy
(``avatar.fit.densify``) owns the optimizer bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from avatar.geometry.projection import project_points
from avatar.skinning.lbs import lbs_points, skin_gaussians
from avatar.skinning.weights import ResidualWeightField
from avatar.types import Cameras, GaussianSet

PARAM_NAMES = ("means", "quats", "log_scales", "opacity_logits", "color_logits")
BUFFER_NAMES = ("base_weights",)
GAUSSIAN_FIELDS = PARAM_NAMES + BUFFER_NAMES


# ----------------------------------------------------------------------------------------------------------------
# pure functions


@dataclass(frozen=True)
class SurfaceSamples:
    points: Tensor  # [M, 3]
    face_ids: Tensor  # [M] int64
    bary: Tensor  # [M, 3] barycentrics in the vertex order of faces[face_ids]


def sample_surface(vertices: Tensor, faces: Tensor, num_samples: int, generator: torch.Generator) -> SurfaceSamples:
    """Area-weighted uniform samples on a triangle mesh ``vertices [V, 3]``, ``faces [F, 3]``."""
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"sample_surface: vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"sample_surface: faces must be [F, 3], got {tuple(faces.shape)}")
    if num_samples < 0:
        raise ValueError(f"sample_surface: num_samples must be >= 0, got {num_samples}")
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1)
    if num_samples == 0:
        e = vertices.new_zeros(0, 3)
        return SurfaceSamples(e, torch.zeros(0, dtype=torch.int64, device=vertices.device), e)
    face_ids = torch.multinomial(area.cpu().double(), num_samples, replacement=True, generator=generator)
    u = torch.rand(num_samples, 2, generator=generator, dtype=torch.float64)
    flip = u.sum(-1) > 1
    u = torch.where(flip[:, None], 1 - u, u)
    bary = torch.stack([1 - u[:, 0] - u[:, 1], u[:, 0], u[:, 1]], -1).to(vertices)
    face_ids = face_ids.to(vertices.device)
    points = (tri[face_ids] * bary[..., None]).sum(1)
    return SurfaceSamples(points, face_ids, bary)


def knn(points: Tensor, k: int, chunk: int = 1024, queries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest ``points [N, 3]`` of each query (default: the points themselves, excluding each point).

    Returns ``(distances [Q, k], indices [Q, k])``, nearest first. Chunked brute force (O(QN), no extra library)."""
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"knn: points must be [N, 3], got {tuple(points.shape)}")
    self_query = queries is None
    q = points if self_query else queries
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"knn: queries must be [Q, 3], got {tuple(q.shape)}")
    kk = k + 1 if self_query else k
    if not 1 <= kk <= points.shape[0]:
        raise ValueError(f"knn: k={k} needs at least {kk} points, got {points.shape[0]}")
    dists, idx = [], []
    p = points.detach()
    for s in range(0, q.shape[0], chunk):
        d = torch.cdist(q[s:s + chunk].detach(), p)  # [c, N]
        if self_query:
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        dd, ii = torch.topk(d, k, dim=1, largest=False)
        dists.append(dd)
        idx.append(ii)
    return torch.cat(dists), torch.cat(idx)


def initial_scales(points: Tensor, k: int = 3, min_scale: float = 1e-3, max_scale: float = 0.05) -> Tensor:
    """Isotropic standard deviations ``[N, 3]`` from the mean distance to the ``k`` nearest neighbours (3DGS)."""
    d, _ = knn(points, k)
    s = d.mean(1).clamp(min_scale, max_scale)
    return s[:, None].expand(-1, 3).contiguous()


def splat_visibility(points: Tensor, camera: Cameras, cell: int = 4, tolerance: float = 0.03) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``[N, 2]`` of posed ``points [N, 3]`` in ``camera`` (viewmats [4, 4]) and a visibility mask
    ``[N]``: inside the image, in front of the camera and within ``tolerance`` metres of the nearest point projected
    into the same ``cell x cell`` pixel block (a point z-buffer; dense surface points make it a surface test)."""
    uv, z = project_points(points, camera.viewmats, camera.Ks)
    W, H = camera.width, camera.height
    inside = (z > 1e-3) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
    gw, gh = (W + cell - 1) // cell, (H + cell - 1) // cell
    cx = (uv[:, 0] / cell).floor().clamp(0, gw - 1).long()
    cy = (uv[:, 1] / cell).floor().clamp(0, gh - 1).long()
    key = cy * gw + cx
    zbuf = torch.full((gw * gh,), float("inf"), dtype=z.dtype, device=z.device)
    zbuf = zbuf.scatter_reduce(0, key[inside], z[inside], reduce="amin")
    visible = inside & (z <= zbuf[key] + tolerance)
    return uv, visible


def initial_colors(
    points: Tensor,  # [N, 3] canonical
    weights: Tensor,  # [N, J] dense skinning weights
    views: Sequence[tuple[Tensor, Tensor, Cameras, Tensor]],  # (image [H,W,3], mask [H,W], camera, transforms [J,4,4])
    default: float = 0.5,
) -> Tensor:
    """Colours ``[N, 3]``: the mean over ``views`` of the pixel each posed point lands on where it is visible and the
    mask is above 0.5. Points no view sees (the back, in a monocular video) take the colour of the nearest seen point
    in canonical space, a better guess for clothing and skin than a constant; ``default`` grey if nothing is seen."""
    acc = points.new_zeros(points.shape[0], 3)
    cnt = points.new_zeros(points.shape[0])
    for image, mask, camera, transforms in views:
        if image.ndim != 3 or image.shape[-1] != 3 or mask.shape != image.shape[:2]:
            raise ValueError(f"initial_colors: image must be [H, W, 3] and mask [H, W], got {tuple(image.shape)} "
                             f"and {tuple(mask.shape)}")
        posed = lbs_points(points, weights, transforms)
        uv, vis = splat_visibility(posed, camera)
        H, W = mask.shape
        px = uv[:, 0].floor().clamp(0, W - 1).long()
        py = uv[:, 1].floor().clamp(0, H - 1).long()
        ok = vis & (mask[py, px] > 0.5)
        acc[ok] += image[py[ok], px[ok]].to(acc)
        cnt[ok] += 1
    out = torch.full_like(acc, default)
    seen = cnt > 0
    out[seen] = acc[seen] / cnt[seen, None]
    if bool(seen.any()) and not bool(seen.all()):
        _, nearest = knn(points[seen], 1, queries=points[~seen])
        out[~seen] = out[seen][nearest[:, 0]]
    return out


def _logit(x: Tensor, eps: float = 1e-4) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x) - torch.log1p(-x)


# ----------------------------------------------------------------------------------------------------------------
# learning rates


@dataclass(frozen=True)
class AvatarLR:
    """Adam learning rates of the avatar's parameter groups (GauHuman / 3DGS values)."""

    means: float = 1.6e-4
    """Initial position learning rate, multiplied by the avatar's ``extent`` (metres)."""
    means_final: float = 1.6e-6
    """Final position learning rate (exponential decay to it over the run), also times ``extent``."""
    colors: float = 2.5e-3
    """Colour logits."""
    opacities: float = 0.05
    """Opacity logits."""
    scales: float = 5e-3
    """Log-scales."""
    quats: float = 1e-3
    """Rotations."""
    weight_field: float = 1e-4
    """The residual skinning-weight MLP."""


# ----------------------------------------------------------------------------------------------------------------
# module


class GaussianAvatar(nn.Module):
    """Canonical Gaussians with skinning weights (see the module docstring for the parametrization).

    means [N, 3], quats [N, 4], log_scales [N, 3], opacity_logits [N], color_logits [N, 3]: parameters.
    base_weights [N, J]: buffer, rows sum to 1. body_vertices [V, 3]: canonical body surface (for off-body pruning).
    extent: the body's half bounding-box diagonal, metres (scales the position learning rate).
    weight_field: a ``ResidualWeightField`` or None (base weights only).
    """

    def __init__(
        self,
        means: Tensor,
        quats: Tensor,
        log_scales: Tensor,
        opacity_logits: Tensor,
        color_logits: Tensor,
        base_weights: Tensor,
        body_vertices: Tensor,
        weight_field: ResidualWeightField | None = None,
    ) -> None:
        super().__init__()
        GaussianSet(means, quats, log_scales, opacity_logits, color_logits, base_weights)  # shape checks
        if body_vertices.ndim != 2 or body_vertices.shape[1] != 3:
            raise ValueError(f"GaussianAvatar: body_vertices must be [V, 3], got {tuple(body_vertices.shape)}")
        if weight_field is not None and weight_field.num_bones != base_weights.shape[1]:
            raise ValueError(f"GaussianAvatar: weight_field has {weight_field.num_bones} bones, base_weights "
                             f"{base_weights.shape[1]}")
        for name, t in zip(PARAM_NAMES, (means, quats, log_scales, opacity_logits, color_logits)):
            setattr(self, name, nn.Parameter(t.detach().clone()))
        self.register_buffer("base_weights", base_weights.detach().clone())
        self.register_buffer("body_vertices", body_vertices.detach().clone())
        lo, hi = body_vertices.min(0).values, body_vertices.max(0).values
        self.extent = float((hi - lo).norm()) / 2
        self.weight_field = weight_field

    # --- construction --------------------------------------------------------------------------------------------

    @staticmethod
    def from_surface(
        vertices: Tensor,  # [V, 3] canonical body vertices for the subject's shape
        faces: Tensor,  # [F, 3]
        dense_weights: Tensor,  # [V, J]
        num_samples: int,
        generator: torch.Generator,
        views: Sequence[tuple[Tensor, Tensor, Cameras, Tensor]] = (),
        opacity: float = 0.3,
        weight_field: bool = True,
        field_hidden: int = 64,
        field_freqs: int = 4,
    ) -> "GaussianAvatar":
        """All ``vertices`` plus ``num_samples`` area-weighted face samples; weights by barycentric interpolation of
        ``dense_weights``; isotropic scales from the 3-NN spacing; ``opacity``; identity rotations; colours from
        ``views`` (see :func:`initial_colors`; grey without views)."""
        if dense_weights.shape != (vertices.shape[0], dense_weights.shape[-1]) or dense_weights.ndim != 2:
            raise ValueError(f"GaussianAvatar.from_surface: dense_weights must be [{vertices.shape[0]}, J], got "
                             f"{tuple(dense_weights.shape)}")
        if not 0.0 < opacity < 1.0:
            raise ValueError(f"GaussianAvatar.from_surface: opacity must be in (0, 1), got {opacity}")
        s = sample_surface(vertices, faces, num_samples, generator)
        w_s = (dense_weights[faces[s.face_ids]] * s.bary[..., None]).sum(1)  # [M, J]
        means = torch.cat([vertices, s.points])
        weights = torch.cat([dense_weights, w_s])
        weights = weights / weights.sum(-1, keepdim=True)
        n = means.shape[0]
        quats = means.new_zeros(n, 4)
        quats[:, 0] = 1
        log_scales = initial_scales(means).log()
        opac = means.new_full((n,), math.log(opacity / (1 - opacity)))
        colors = initial_colors(means, weights, views) if len(views) else means.new_full((n, 3), 0.5)
        lo, hi = vertices.min(0).values, vertices.max(0).values
        field = None
        if weight_field:
            field = ResidualWeightField(weights.shape[1], hidden=field_hidden, num_freqs=field_freqs,
                                        scale=float((hi - lo).max()), generator=generator).to(means)
        return GaussianAvatar(means, quats, log_scales, opac, _logit(colors), weights, vertices, field)

    # --- views ---------------------------------------------------------------------------------------------------

    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    @property
    def num_bones(self) -> int:
        return int(self.base_weights.shape[1])

    def skin_weights(self) -> Tensor:
        """Skinning weights ``[N, J]`` (base, or base corrected by the residual field)."""
        if self.weight_field is None:
            return self.base_weights
        return self.weight_field(self.means, self.base_weights)

    def canonical(self) -> GaussianSet:
        """The Gaussians in canonical space, with skinning weights."""
        return GaussianSet(self.means, self.quats, self.log_scales.exp(), torch.sigmoid(self.opacity_logits),
                           torch.sigmoid(self.color_logits), self.skin_weights())

    def posed(self, transforms: Tensor) -> GaussianSet:
        """Forward-skinned Gaussians for bone ``transforms [J, 4, 4]`` (canonical -> posed); no skin weights."""
        if transforms.shape != (self.num_bones, 4, 4):
            raise ValueError(f"GaussianAvatar.posed: transforms must be [{self.num_bones}, 4, 4], got "
                             f"{tuple(transforms.shape)}")
        c = self.canonical()
        means, quats = skin_gaussians(c.means, c.quats, c.skin_weights, transforms.to(c.means))
        return GaussianSet(means, quats, c.scales, c.opacities, c.colors)

    def distance_to_body(self, points: Tensor | None = None) -> Tensor:
        """Distance ``[N]`` from canonical ``points`` (default: the means) to the nearest body vertex, metres."""
        d, _ = knn(self.body_vertices, 1, queries=self.means if points is None else points)
        return d[:, 0]

    # --- optimization --------------------------------------------------------------------------------------------

    def param_groups(self, lr: AvatarLR, scale: float = 1.0) -> list[dict]:
        """Adam parameter groups, one per named tensor: ``{"name", "params", "lr"}``; ``scale`` multiplies all.
        The ``means`` group's lr is ``lr.means * extent * scale`` (decayed by the trainer)."""
        groups = [
            dict(name="means", params=[self.means], lr=lr.means * self.extent * scale),
            dict(name="quats", params=[self.quats], lr=lr.quats * scale),
            dict(name="log_scales", params=[self.log_scales], lr=lr.scales * scale),
            dict(name="opacity_logits", params=[self.opacity_logits], lr=lr.opacities * scale),
            dict(name="color_logits", params=[self.color_logits], lr=lr.colors * scale),
        ]
        if self.weight_field is not None:
            groups.append(dict(name="weight_field", params=list(self.weight_field.parameters()),
                               lr=lr.weight_field * scale))
        return groups

    def gaussian_tensors(self) -> dict[str, Tensor]:
        """The per-Gaussian tensors (parameters and buffers) by name, each with N rows."""
        return {name: getattr(self, name) for name in GAUSSIAN_FIELDS}

    @torch.no_grad()
    def replace_gaussians(self, keep: Tensor, new: dict[str, Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Keep the rows where ``keep [N]`` (bool) is true and append ``new`` rows (a value for every name in
        ``GAUSSIAN_FIELDS``, all with the same M rows). Parameters become new ``nn.Parameter`` objects; returns
        ``{name: (old, new)}`` for the parameters so the caller can move optimizer state."""
        n = self.num_gaussians
        if keep.dtype != torch.bool or keep.shape != (n,):
            raise ValueError(f"replace_gaussians: keep must be a bool [{n}] tensor, got {keep.dtype} {tuple(keep.shape)}")
        cur = self.gaussian_tensors()
        if new is not None:
            if set(new) != set(GAUSSIAN_FIELDS):
                raise ValueError(f"replace_gaussians: new must give {sorted(GAUSSIAN_FIELDS)}, got {sorted(new)}")
            m = {int(v.shape[0]) for v in new.values()}
            if len(m) != 1:
                raise ValueError(f"replace_gaussians: new tensors have different row counts {sorted(m)}")
            for name, v in new.items():
                if v.shape[1:] != cur[name].shape[1:]:
                    raise ValueError(f"replace_gaussians: new[{name!r}] must be [M, {list(cur[name].shape[1:])}], "
                                     f"got {tuple(v.shape)}")
        swaps: dict[str, tuple[Tensor, Tensor]] = {}
        for name, old in cur.items():
            value = old.detach()[keep]
            if new is not None:
                value = torch.cat([value, new[name].to(value)])
            if name in PARAM_NAMES:
                p = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
                setattr(self, name, p)
                swaps[name] = (old, p)
            else:
                setattr(self, name, value.contiguous())
        return swaps

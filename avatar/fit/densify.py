"""Densification and pruning of the avatar's Gaussians (3DGS's adaptive density control, gsplat strategy style).

The trainer owns the state: ``init_state`` makes it, ``accumulate`` adds one step's screen-space gradients and
``refine`` (every ``interval`` steps in ``[start, stop)``) clones, splits and prunes, then returns a fresh state.
Each operation is a pure function on tensors; ``update_optimizer`` moves Adam's ``exp_avg`` / ``exp_avg_sq`` along
(kept rows keep their moments, new rows start at zero, removed rows go).

Choice: the 3DGS / gsplat gradient rule (clone small, split large Gaussians whose mean screen-space gradient
exceeds ``grad_threshold``), not GauHuman's KL-divergence rule (split/clone only where the KL divergence to the
nearest neighbour > 0.4, merge pairs < 0.1). The KL rule needs a nearest-neighbour search and pairwise covariance
algebra at every refinement and mainly limits the count; here a hard ``max_gaussians`` budget (highest gradients
first) does that, which keeps the CPU cost predictable. Off-body pruning (GauHuman: > 5 cm) uses the distance to
the nearest canonical body vertex (anny's vertex spacing is ~1-2 cm, so this over-estimates the distance to the
surface by at most about half of that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar.geometry.rotations import quat_to_matrix
from avatar.represent.avatar import GAUSSIAN_FIELDS, GaussianAvatar


@dataclass(frozen=True)
class DensifyConfig:
    """Schedule and thresholds of densification and pruning."""

    start: int = 400
    """First step that refines (GauHuman: 400)."""
    stop: int = 1000
    """Steps at or after this never refine (GauHuman: 1,000)."""
    interval: int = 100
    """Refine every this many steps."""
    grad_threshold: float = 2e-4
    """Mean screen-space gradient norm (gsplat's scaling: d loss / d pixel x size / 2) above which a Gaussian grows."""
    grow_scale: float = 0.01
    """Gaussians whose largest scale is <= grow_scale x avatar extent are cloned, larger ones split."""
    split_factor: float = 1.6
    """Scales of the two children of a split are the parent's divided by this."""
    prune_opacity: float = 0.005
    """Gaussians below this opacity are removed."""
    prune_distance: float = 0.06
    """Gaussians farther than this (metres) from the canonical body surface are removed (GauHuman: 0.05)."""
    prune_scale: float = 0.1
    """Gaussians with a scale above this (metres) are removed."""
    reset_every: int = 0
    """Reset opacities to 2 x prune_opacity every this many steps (0 = never; 3DGS-Avatar: 3,000)."""
    max_gaussians: int = 50_000
    """Growth never takes the count above this (the highest gradients grow first)."""

    def validate(self) -> None:
        if self.interval < 1 or self.start < 0 or self.stop < self.start:
            raise ValueError(f"DensifyConfig: need interval >= 1 and 0 <= start <= stop, got interval={self.interval}, "
                             f"start={self.start}, stop={self.stop}")
        if self.split_factor <= 1.0:
            raise ValueError(f"DensifyConfig.split_factor must be > 1, got {self.split_factor}")


@dataclass(frozen=True)
class RefineReport:
    """What one refinement did."""

    cloned: int
    split: int
    pruned: int
    num_gaussians: int


# ----------------------------------------------------------------------------------------------------------------
# state


def init_state(num_gaussians: int, like: Tensor) -> dict[str, Tensor]:
    """``{"grad2d": [N], "count": [N]}`` zeros (accumulated gradient norms and visibility counts)."""
    z = like.new_zeros(num_gaussians)
    return {"grad2d": z, "count": z.clone()}


def accumulate(state: dict[str, Tensor], means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> dict[str, Tensor]:
    """Add one step's screen-space gradients: ``means2d_grad [C, N, 2]`` (d loss / d pixel), ``radii [C, N, 2]``
    (0 where culled). Gradients are scaled to NDC-like units as gsplat does (x width / 2 x C, y height / 2 x C)."""
    if means2d_grad.ndim != 3 or means2d_grad.shape[-1] != 2 or radii.shape != means2d_grad.shape:
        raise ValueError(f"accumulate: means2d_grad and radii must both be [C, N, 2], got "
                         f"{tuple(means2d_grad.shape)}, {tuple(radii.shape)}")
    n = state["grad2d"].shape[0]
    if means2d_grad.shape[1] != n:
        raise ValueError(f"accumulate: state has {n} Gaussians, gradients {means2d_grad.shape[1]}")
    C = means2d_grad.shape[0]
    g = means2d_grad.detach().clone()
    g[..., 0] *= width / 2.0 * C
    g[..., 1] *= height / 2.0 * C
    sel = (radii > 0).all(dim=-1)  # [C, N]
    ids = torch.nonzero(sel, as_tuple=True)[1]
    grad2d = state["grad2d"].index_add(0, ids, g[sel].norm(dim=-1).to(state["grad2d"]))
    count = state["count"].index_add(0, ids, torch.ones_like(ids, dtype=state["count"].dtype))
    return {"grad2d": grad2d, "count": count}


# ----------------------------------------------------------------------------------------------------------------
# pure operations on per-Gaussian tensors


def clone_values(values: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    """Copies of rows ``idx [M]`` of every tensor (the 3DGS clone: same position, same everything)."""
    return {k: v.detach()[idx].clone() for k, v in values.items()}


def split_values(values: dict[str, Tensor], idx: Tensor, generator: torch.Generator, factor: float = 1.6) -> dict[str, Tensor]:
    """Two children per row ``idx [M]`` (``2M`` rows, children of one parent at ``i`` and ``M + i``): positions drawn
    from the parent's Gaussian, log-scales reduced by ``log(factor)``, other fields copied. Needs "means", "quats",
    "log_scales"."""
    v = {k: t.detach()[idx] for k, t in values.items()}
    m = idx.shape[0]
    scales = v["log_scales"].exp()  # [M, 3]
    R = quat_to_matrix(v["quats"] / v["quats"].norm(dim=-1, keepdim=True))  # [M, 3, 3]
    noise = torch.randn(2, m, 3, generator=generator, dtype=scales.dtype).to(scales.device)
    offsets = (R[None] @ (scales[None] * noise)[..., None])[..., 0]  # [2, M, 3]
    out = {k: torch.cat([t, t]) for k, t in v.items()}
    out["means"] = (v["means"][None] + offsets).reshape(2 * m, 3)
    out["log_scales"] = out["log_scales"] - math.log(factor)
    return out


def update_optimizer(optimizer: torch.optim.Optimizer, swaps: dict[str, tuple[Tensor, Tensor]], keep: Tensor,
                     num_new: int) -> None:
    """Point ``optimizer`` at the new parameters of ``swaps`` ({name: (old, new)}) and carry Adam's moments: rows
    where ``keep [N]`` keep theirs, ``num_new`` appended rows start at zero. The step counter is unchanged."""
    by_id = {id(old): (old, new) for old, new in swaps.values()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) not in by_id:
                continue
            old, new = by_id[id(p)]
            group["params"][i] = new
            st = optimizer.state.pop(old, None)
            if st is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    t = st[key][keep]
                    st[key] = torch.cat([t, t.new_zeros(num_new, *t.shape[1:])]).contiguous()
            optimizer.state[new] = st


def apply_change(avatar: GaussianAvatar, optimizer: torch.optim.Optimizer | None, keep: Tensor,
                 new: dict[str, Tensor] | None = None) -> None:
    """``avatar.replace_gaussians(keep, new)`` and the matching optimizer update."""
    swaps = avatar.replace_gaussians(keep, new)
    if optimizer is not None:
        update_optimizer(optimizer, swaps, keep, 0 if new is None else int(next(iter(new.values())).shape[0]))


# ----------------------------------------------------------------------------------------------------------------
# the operations


def grow(avatar: GaussianAvatar, optimizer, state: dict[str, Tensor], cfg: DensifyConfig,
         generator: torch.Generator) -> tuple[int, int]:
    """Clone small and split large Gaussians with a high mean gradient, within the ``max_gaussians`` budget.
    Returns ``(cloned, split)``."""
    grads = state["grad2d"] / state["count"].clamp_min(1)
    high = grads > cfg.grad_threshold
    n = avatar.num_gaussians
    budget = max(cfg.max_gaussians - n, 0)
    with torch.no_grad():
        small = avatar.log_scales.exp().max(dim=-1).values <= cfg.grow_scale * avatar.extent
    # a split adds one net Gaussian, a clone one: keep the `budget` highest gradients
    cand = torch.nonzero(high, as_tuple=True)[0]
    if cand.numel() > budget:
        order = torch.argsort(grads[cand], descending=True, stable=True)
        cand = cand[order[:budget]]
    sel = torch.zeros(n, dtype=torch.bool, device=high.device)
    sel[cand] = True
    clone_idx = torch.nonzero(sel & small, as_tuple=True)[0]
    split_idx = torch.nonzero(sel & ~small, as_tuple=True)[0]
    if clone_idx.numel() + split_idx.numel() == 0:
        return 0, 0
    values = avatar.gaussian_tensors()
    c = clone_values(values, clone_idx)
    s = split_values(values, split_idx, generator, cfg.split_factor)
    new = {k: torch.cat([c[k], s[k]]) for k in GAUSSIAN_FIELDS}
    keep = torch.ones(n, dtype=torch.bool, device=high.device)
    keep[split_idx] = False
    apply_change(avatar, optimizer, keep, new)
    return int(clone_idx.numel()), int(split_idx.numel())


def prune_mask(avatar: GaussianAvatar, cfg: DensifyConfig) -> Tensor:
    """``[N]`` bool: transparent, off-body or oversized Gaussians."""
    with torch.no_grad():
        low = torch.sigmoid(avatar.opacity_logits) < cfg.prune_opacity
        far = avatar.distance_to_body() > cfg.prune_distance
        big = avatar.log_scales.exp().max(dim=-1).values > cfg.prune_scale
    return low | far | big


def prune(avatar: GaussianAvatar, optimizer, cfg: DensifyConfig) -> int:
    """Remove the Gaussians of :func:`prune_mask` (never all of them). Returns how many went."""
    bad = prune_mask(avatar, cfg)
    if not bool(bad.any()) or bool(bad.all()):
        return 0
    apply_change(avatar, optimizer, ~bad)
    return int(bad.sum())


def reset_opacity(avatar: GaussianAvatar, optimizer, value: float) -> None:
    """Clamp opacities to at most ``value`` and zero the opacity logits' Adam moments (3DGS)."""
    with torch.no_grad():
        limit = math.log(value / (1 - value))
        avatar.opacity_logits.clamp_(max=limit)
    if optimizer is not None:
        st = optimizer.state.get(avatar.opacity_logits)
        if st:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].zero_()


def refine(step: int, avatar: GaussianAvatar, optimizer, state: dict[str, Tensor], cfg: DensifyConfig,
           generator: torch.Generator) -> tuple[dict[str, Tensor], RefineReport | None]:
    """The strategy's per-step hook, called after the optimizer step with the 1-based ``step`` just taken: refines
    on schedule and returns the (possibly fresh) state and a report (None when nothing was due)."""
    report = None
    if cfg.start <= step < cfg.stop and step % cfg.interval == 0:
        cloned, split = grow(avatar, optimizer, state, cfg, generator)
        pruned = prune(avatar, optimizer, cfg)
        state = init_state(avatar.num_gaussians, state["grad2d"])
        report = RefineReport(cloned, split, pruned, avatar.num_gaussians)
    if cfg.reset_every and step % cfg.reset_every == 0 and step < cfg.stop:
        reset_opacity(avatar, optimizer, 2 * cfg.prune_opacity)
    return state, report

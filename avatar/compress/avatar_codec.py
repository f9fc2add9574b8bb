"""Compact avatars: prune Gaussians by their contribution to the training views, store attributes quantized.

Importance (LightGaussian / Compact-3DGS style): a Gaussian's accumulated blending weight ``sum_pixels alpha_i T_i``
over the training views. It is computed with the project's own rasterizer and no extra kernel: render a one-channel
image with every Gaussian's "colour" set to 1 and back-propagate ``d(sum of pixels) / d colour_i``, which is exactly
``sum_pixels alpha_i T_i`` (the rasterizer's colour gradient is the blending weight).

Storage (one ``.safetensors`` file through ``avatar.compress.storage``; layout in the manifest):

- means: float16 offsets from the set's centre (fp32 centre in the metadata): < 0.5 mm error at 1 m;
- colours and opacities: uint8 (opacity as ``(q + 0.5) / 256`` so it never reaches 0 or 1);
- scales: uint8 in log space between the set's min and max log-scale;
- rotations: wxyz quaternions with w >= 0, uint8 per component in [-1, 1], renormalized on load;
- optional k-means codebook (``codebook_size``) of the 7-d (log-scale, rotation) vector: one uint8 / uint16 index
  per Gaussian instead of 7 bytes (Compact-3DGS's geometry codebook);
- optional skinning weights: the top-4 bones per Gaussian (int16 ids) with uint8 weights, renormalized on load.

17 bytes per Gaussian (10 with the codebook) against the 68 of the float32 3DGS ``.ply`` (sh_degree 0) of
``avatar.export.ply``.

Fine-tune after pruning (LightGaussian / Compact-3DGS recover the pruned Gaussians' light this way):
:func:`finetune_pruned` keeps the selected rows of a fitted ``GaussianAvatar`` and runs a few dozen steps of the
project's own fitting loss (``avatar.fit.Trainer``, densification off) on its training frames, so the survivors'
opacities / scales / colours absorb what the pruned ones contributed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar.compress.storage import load_compact, save_compact
from avatar.types import GaussianSet


@dataclass(frozen=True)
class AvatarCodecConfig:
    """Quantized avatar storage."""

    codebook_size: int = 0
    """k-means codebook entries for (log-scale, rotation); 0 = per-Gaussian uint8 attributes."""
    codebook_iters: int = 10
    """Lloyd iterations of the codebook."""
    skin_topk: int = 4
    """Bones kept per Gaussian when the set has skinning weights (0 = do not store weights)."""
    seed: int = 0
    """Seed of the codebook's initial centres."""


# ----------------------------------------------------------------------------------------------------------------
# importance and pruning


def gaussian_contributions(
    means: Tensor,  # [N, 3] posed, world
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    backend: str = "cpu",
) -> Tensor:
    """Accumulated blending weight ``[N]`` (``sum over pixels and cameras of alpha_i T_i``) of each Gaussian."""
    from avatar.render.gaussians import rasterize_gaussians

    ones = torch.ones(means.shape[0], 1, dtype=means.dtype, device=means.device, requires_grad=True)
    with torch.enable_grad():
        out = rasterize_gaussians(means.detach(), quats.detach(), scales.detach(), opacities.detach(), ones,
                                  viewmats, Ks, width, height, backend=backend)
        out.colors.sum().backward()
    return ones.grad[:, 0].detach()


def keep_mask(importance: Tensor, keep_fraction: float) -> Tensor:
    """Boolean ``[N]``: the ``ceil(keep_fraction * N)`` most important Gaussians."""
    if importance.ndim != 1:
        raise ValueError(f"keep_mask: importance must be [N], got {tuple(importance.shape)}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_mask: keep_fraction must be in (0, 1], got {keep_fraction}")
    n = importance.shape[0]
    k = min(n, max(1, math.ceil(keep_fraction * n)))
    mask = torch.zeros(n, dtype=torch.bool, device=importance.device)
    mask[torch.topk(importance, k).indices] = True
    return mask


def select_gaussians(g: GaussianSet, keep: Tensor) -> GaussianSet:
    """The rows of ``g`` where ``keep [N]`` (bool) is true."""
    if keep.dtype != torch.bool or keep.shape != (len(g),):
        raise ValueError(f"select_gaussians: keep must be a bool [{len(g)}] tensor, got {keep.dtype} {tuple(keep.shape)}")
    sw = None if g.skin_weights is None else g.skin_weights[keep]
    return GaussianSet(g.means[keep], g.quats[keep], g.scales[keep], g.opacities[keep], g.colors[keep], sw)


def finetune_pruned(
    avatar,  # avatar.represent.avatar.GaussianAvatar (fitted)
    keep: Tensor,  # [N] bool
    frames: Sequence,  # the training ``avatar.data.Frame``s
    body_model,
    transforms: Tensor,  # [len(frames), J, 4, 4] canonical -> posed bone transforms of each frame
    shape: Tensor,  # [S] body shape
    fit_cfg,  # avatar.fit.FitConfig of the original fit
    steps: int,
    lr_scale: float = 0.5,
):
    """A copy of ``avatar`` with only the ``keep`` Gaussians, fine-tuned for ``steps`` steps of the fitting loss on
    ``frames`` (``avatar.fit.Trainer`` with ``fit_cfg``'s losses, backend and background; densification off; every
    learning rate times ``lr_scale``: the survivors are already converged, only the gaps need filling). ``avatar`` is
    not modified. ``steps == 0`` returns the pruned copy as is."""
    from avatar.fit.densify import DensifyConfig
    from avatar.fit.trainer import Trainer

    if keep.dtype != torch.bool or keep.shape != (avatar.num_gaussians,):
        raise ValueError(f"finetune_pruned: keep must be a bool [{avatar.num_gaussians}] tensor, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    if not bool(keep.any()):
        raise ValueError("finetune_pruned: keep selects no Gaussian")
    if steps < 0:
        raise ValueError(f"finetune_pruned: steps must be >= 0, got {steps}")
    if len(frames) == 0 or transforms.shape[0] != len(frames):
        raise ValueError(f"finetune_pruned: need one transform per frame, got {len(frames)} frames and "
                         f"{tuple(transforms.shape)} transforms")
    pruned = copy.deepcopy(avatar)
    with torch.no_grad():
        pruned.replace_gaussians(keep)
    if steps == 0:
        return pruned
    never = steps + 1  # densification window after the last step: no growth, no opacity-based pruning
    cfg = dataclasses.replace(fit_cfg, steps=steps, lr_scale=fit_cfg.lr_scale * lr_scale, checkpoint_every=0,
                              densify=DensifyConfig(start=never, stop=never), pose_refine=False)
    trainer = Trainer(cfg, pruned, body_model, frames, transforms, shape)
    trainer.run()
    return pruned


# ----------------------------------------------------------------------------------------------------------------
# quantization


def _u8(x: Tensor, lo: float, hi: float) -> Tensor:
    t = (x - lo) / max(hi - lo, 1e-12)
    return torch.round(t.clamp(0, 1) * 255).to(torch.uint8)


def _from_u8(q: Tensor, lo: float, hi: float) -> Tensor:
    return lo + q.float() / 255 * (hi - lo)


def _canonical_quats(quats: Tensor) -> Tensor:
    q = F.normalize(quats.float(), dim=-1)
    return torch.where(q[:, :1] < 0, -q, q)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of ``x [N, D]``: ``(centres [k, D], assignment [N] int64)``; centres start at k distinct
    random rows (from ``generator``), empty clusters keep their centre."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k must be in [1, {n}], got {k}")
    centres = x[torch.randperm(n, generator=generator)[:k]].clone()

    def assign() -> Tensor:
        return torch.cat([torch.cdist(x[s:s + chunk], centres).argmin(1) for s in range(0, n, chunk)])

    for _ in range(iters):
        a = assign()
        sums = torch.zeros_like(centres).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).to(x.dtype)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty, None]
    return centres, assign()


def encode_gaussians(g: GaussianSet, cfg: AvatarCodecConfig = AvatarCodecConfig()) -> tuple[dict[str, Tensor], dict]:
    """Quantized parts ``{name: tensor}`` and JSON metadata of a ``GaussianSet`` (see the module docstring)."""
    if not isinstance(g, GaussianSet):
        raise TypeError(f"encode_gaussians: need a GaussianSet, got {type(g).__name__}")
    if len(g) == 0:
        raise ValueError("encode_gaussians: the set is empty")
    if not bool((g.scales > 0).all()):
        raise ValueError("encode_gaussians: scales must be positive (linear standard deviations)")
    means = g.means.detach().float().cpu()
    centre = (means.min(0).values + means.max(0).values) / 2
    parts: dict[str, Tensor] = {"means": (means - centre).to(torch.float16)}
    meta: dict = {"num": len(g), "centre": centre.tolist()}
    parts["colors"] = _u8(g.colors.detach().float().cpu(), 0.0, 1.0)
    parts["opacities"] = torch.floor(g.opacities.detach().float().cpu().clamp(0, 1) * 256).clamp(0, 255).to(torch.uint8)
    log_s = g.scales.detach().float().cpu().log()
    quats = _canonical_quats(g.quats.detach().cpu())
    lo, hi = float(log_s.min()), float(log_s.max())
    meta["log_scale_range"] = [lo, hi]
    if cfg.codebook_size > 0:
        k = min(cfg.codebook_size, len(g))
        feats = torch.cat([(log_s - lo) / max(hi - lo, 1e-12), quats], 1)  # [N, 7], both parts ~unit range
        centres, idx = kmeans(feats, k, cfg.codebook_iters, torch.Generator().manual_seed(cfg.seed))
        parts["codebook"] = centres.to(torch.float16)
        parts["code"] = idx.to(torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32)
    else:
        parts["log_scales"] = _u8(log_s, lo, hi)
        parts["quats"] = _u8(quats, -1.0, 1.0)
    if g.skin_weights is not None and cfg.skin_topk > 0:
        w = g.skin_weights.detach().float().cpu()
        kk = min(cfg.skin_topk, w.shape[1])
        vals, ids = torch.topk(w, kk, dim=1)
        parts["skin_ids"] = ids.to(torch.int16)
        parts["skin_weights"] = _u8(vals / vals.sum(1, keepdim=True).clamp_min(1e-12), 0.0, 1.0)
        meta["num_bones"] = int(w.shape[1])
    return parts, meta


def decode_gaussians(parts: dict[str, Tensor], meta: dict, where: str = "decode_gaussians") -> GaussianSet:
    """Inverse of :func:`encode_gaussians` (lossy only by the stated quantization)."""
    need = {"means", "colors", "opacities"} | ({"codebook", "code"} if "codebook" in parts else {"log_scales", "quats"})
    missing = sorted(need - set(parts))
    if missing:
        raise ValueError(f"{where}: missing stored arrays {missing}")
    try:
        centre = torch.tensor(meta["centre"], dtype=torch.float32)
        lo, hi = (float(v) for v in meta["log_scale_range"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: metadata is malformed ({e!r})") from None
    means = parts["means"].float() + centre
    colors = parts["colors"].float() / 255
    opacities = (parts["opacities"].float() + 0.5) / 256
    if "codebook" in parts:
        feats = parts["codebook"].float()[parts["code"].long()]
        log_s = lo + feats[:, :3] * (hi - lo)
        quats = feats[:, 3:]
    else:
        log_s = _from_u8(parts["log_scales"], lo, hi)
        quats = _from_u8(parts["quats"], -1.0, 1.0)
    quats = F.normalize(quats, dim=-1)
    sw = None
    if "skin_ids" in parts:
        nb = int(meta.get("num_bones", 0))
        w = parts["skin_weights"].float() / 255
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        sw = torch.zeros(means.shape[0], nb).scatter_(1, parts["skin_ids"].long(), w)
    n = {int(t.shape[0]) for k, t in parts.items() if k != "codebook"}
    if len(n) != 1:
        raise ValueError(f"{where}: stored arrays disagree on the number of Gaussians: {sorted(n)}")
    return GaussianSet(means, quats, log_s.exp(), opacities, colors, sw)


def write_compact_avatar(path: str | Path, g: GaussianSet, cfg: AvatarCodecConfig = AvatarCodecConfig()) -> Path:
    """Quantize ``g`` and write it to ``path`` (.safetensors, atomically)."""
    parts, meta = encode_gaussians(g, cfg)
    return save_compact(path, parts, encodings="dense", metadata={"avatar_codec": meta})


def read_compact_avatar(path: str | Path) -> GaussianSet:
    """A ``GaussianSet`` from a file written by :func:`write_compact_avatar`."""
    parts, user = load_compact(path)
    if "avatar_codec" not in user:
        raise ValueError(f"read_compact_avatar: {path} is a compact weight file but not a compact avatar "
                         f"(no 'avatar_codec' metadata)")
    return decode_gaussians(parts, user["avatar_codec"], where=f"read_compact_avatar: {path}")

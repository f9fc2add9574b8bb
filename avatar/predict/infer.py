"""Running the depth + skinning-code network on views of any size: ``load_predictor`` and ``predict_views``.

``predict_views`` crops each view to a square around the person (the union of the mask and the prior's coverage,
which then fills ``DepthSkinConfig``-independent ``FILL = 0.85`` of the square's side, the middle of the framing the
network was trained on, see ``avatar.predict.samples``), samples the crop to the net size (bilinear for the image,
nearest for masks, depths and codes so no value is blended with the background), runs the net on all views as one
batch, and maps the predictions back to the view: outside the net's mask the predictions are first extended by a
few pixels from inside (so bilinear upsampling never blends in untrained background values), then sampled
bilinearly at every view pixel. Depths and codes are reported inside the input mask only (0 elsewhere), and the
back depth is clamped to be no nearer than the front depth.

Files: ``<name>.safetensors`` (float16 state dict) + ``<name>.json`` written by
``avatar.predict.train.save_predictor``; loading converts the stored float16 values exactly to float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import Tensor

from avatar.io import load_module_weights
from avatar.predict.network import DepthSkinConfig, DepthSkinNet, extend_nearest, make_inputs

__all__ = ["ViewPrediction", "FILL", "shipped_predictor_path", "load_predictor", "predict_views"]

FILL = 0.85  # fraction of the crop side taken by the person's larger extent


@dataclass(frozen=True)
class ViewPrediction:
    """Predictions for one view, at the view's size.

    mask:        [H, W] bool, the input person mask.
    depth_front: [H, W] camera z (metres) of the first surface, 0 outside the mask.
    depth_back:  [H, W] camera z of the last surface (>= depth_front), 0 outside the mask.
    codes_front: [H, W, 3] skinning codes in [0, 1] at the first surface (``SkinCodec.decode`` gives weights).
    codes_back:  [H, W, 3] ... at the last surface.
    """

    mask: Tensor
    depth_front: Tensor
    depth_back: Tensor
    codes_front: Tensor
    codes_back: Tensor


def shipped_predictor_path(body_name: str = "anny") -> Path:
    """``data/predictor/depthskin_<body>.safetensors`` in the source tree (written by ``tools/train_predictor.py``)."""
    return Path(__file__).resolve().parents[2] / "data" / "predictor" / f"depthskin_{body_name}.safetensors"


def load_predictor(path: str | Path | None = None) -> DepthSkinNet:
    """Load a network written by ``save_predictor``; ``None`` loads the shipped anny model. Returns a float32 CPU
    module in eval mode holding exactly the stored float16 values; ``model.meta`` is the JSON sidecar. Missing
    files, a wrong format or mismatched tensors raise errors naming the file."""

    from avatar.predict.train import FORMAT, FORMAT_VERSION

    shipped = path is None
    path = shipped_predictor_path() if shipped else Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        hint = " (train it with `python -m tools.train_predictor`)" if shipped else ""
        raise FileNotFoundError(f"load_predictor: no predictor weights at {path}{hint}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"load_predictor: {path} has no metadata file {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_predictor: {meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"load_predictor: {meta_path} is not a depth/skin predictor file (format {got!r}, expected {FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"load_predictor: {meta_path} has version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
    net = meta.get("net")
    if not isinstance(net, dict):
        raise ValueError(f"load_predictor: {meta_path} field 'net' must be the network config dict, got {net!r}")
    try:
        net = dict(net)
        if "widths" in net:
            net["widths"] = tuple(net["widths"])
        cfg = DepthSkinConfig(**net)
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_predictor: {meta_path} field 'net' is not a valid DepthSkinConfig: {err}") from None
    model = load_module_weights(DepthSkinNet(cfg), path, "load_predictor", f"the network of {meta_path}")
    model.meta = meta
    return model


def _crop_boxes(region: Tensor) -> Tensor:
    """``region [V, H, W]`` bool -> square crops ``[V, 3]`` (x0, y0, side) in pixel units, centred on the region's
    bounding box, side = larger extent / FILL."""
    boxes = []
    for r in region:
        ys, xs = torch.nonzero(r, as_tuple=True)
        x_lo, x_hi = float(xs.min()), float(xs.max()) + 1.0
        y_lo, y_hi = float(ys.min()), float(ys.max()) + 1.0
        side = max(x_hi - x_lo, y_hi - y_lo) / FILL
        boxes.append([(x_lo + x_hi - side) / 2, (y_lo + y_hi - side) / 2, side])
    return torch.tensor(boxes, dtype=torch.float64)


def _to_net_grid(boxes: Tensor, S: int, H: int, W: int, dtype) -> Tensor:
    """``grid_sample`` grid ``[V, S, S, 2]`` sampling each crop at the net's pixel centres (view normalized coords)."""
    t = (torch.arange(S, dtype=torch.float64) + 0.5) / S  # [S]
    x = boxes[:, 0, None] + boxes[:, 2, None] * t  # [V, S] view pixel coordinates
    y = boxes[:, 1, None] + boxes[:, 2, None] * t
    gx = (x / W * 2 - 1)[:, None, :].expand(-1, S, -1)
    gy = (y / H * 2 - 1)[:, :, None].expand(-1, -1, S)
    return torch.stack([gx, gy], -1).to(dtype)


def _from_net_grid(boxes: Tensor, S: int, H: int, W: int, dtype) -> Tensor:
    """``grid_sample`` grid ``[V, H, W, 2]`` sampling the net output at every view pixel centre."""
    x = (torch.arange(W, dtype=torch.float64) + 0.5)[None] - boxes[:, 0, None]  # [V, W]
    y = (torch.arange(H, dtype=torch.float64) + 0.5)[None] - boxes[:, 1, None]  # [V, H]
    gx = (x / boxes[:, 2, None] * 2 - 1)[:, None, :].expand(-1, H, -1)
    gy = (y / boxes[:, 2, None] * 2 - 1)[:, :, None].expand(-1, -1, W)
    return torch.stack([gx, gy], -1).to(dtype)


def _sample(x: Tensor, grid: Tensor, mode: str) -> Tensor:
    """``x [V, C, h, w]`` sampled at ``grid [V, h', w', 2]`` -> ``[V, C, h', w']`` (zeros outside)."""
    return F_.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _check(images, masks, priors) -> tuple[int, int, int]:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[-1] != 3 or not images.is_floating_point():
        raise ValueError(f"predict_views: images must be a float [V, H, W, 3] tensor in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    V, H, W = images.shape[:3]
    if not isinstance(masks, Tensor) or masks.shape != (V, H, W):
        raise ValueError(f"predict_views: masks must be [V, H, W] = {(V, H, W)} (one per image, same size), got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if not isinstance(priors, (list, tuple)) or len(priors) != V:
        raise ValueError(f"predict_views: priors must be a list of {V} DepthLayers (one per view), got "
                         f"{len(priors) if isinstance(priors, (list, tuple)) else type(priors).__name__}")
    for v, p in enumerate(priors):
        for name in ("mask", "depth_front", "depth_back"):
            t = getattr(p, name, None)
            if not isinstance(t, Tensor) or t.shape != (H, W):
                raise ValueError(f"predict_views: priors[{v}].{name} must be [H, W] = {(H, W)}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        for name in ("attrs_front", "attrs_back"):
            t = getattr(p, name, None)
            if t is not None and (not isinstance(t, Tensor) or t.shape != (H, W, 3)):
                raise ValueError(f"predict_views: priors[{v}].{name} must be None or [H, W, 3] skinning codes, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not bool(p.mask.bool().any()):
            raise ValueError(f"predict_views: the body-model prior of view {v} covers no pixel (is the body in view?)")
    return V, H, W


@torch.no_grad()
def predict_views(
    model: DepthSkinNet,
    images: Tensor,  # [V, H, W, 3] float in [0, 1]
    masks: Tensor,  # [V, H, W] bool (or float, > 0.5 = person)
    priors: list,  # V x avatar.predict.views.DepthLayers of the posed naked body model (attrs = its skinning codes)
) -> list[ViewPrediction]:
    """Front/back depth and skinning codes for each view (see the module docstring for the resampling).

    ``priors[v]`` is ``render_depth_layers(posed body vertices, faces, viewmat, K, W, H, vertex_attrs=codes)`` with
    ``codes = codec.encode(body.dense_skin_weights())``; priors without ``attrs_*`` (None) are accepted and give
    less accurate codes. Outputs are float32 on the images' device."""
    if not isinstance(model, DepthSkinNet):
        raise TypeError(f"predict_views: model must be a DepthSkinNet (load_predictor()), got {type(model).__name__}")
    V, H, W = _check(images, masks, priors)
    m_full = masks > 0.5 if masks.is_floating_point() else masks.bool()
    for v in range(V):
        if not bool(m_full[v].any()):
            raise ValueError(f"predict_views: mask of view {v} is empty (no person pixel)")
    device = images.device
    S = model.cfg.size
    dt = torch.float32
    pm = torch.stack([p.mask.bool() for p in priors]).to(device)  # [V, H, W]
    boxes = _crop_boxes(m_full | pm)
    grid = _to_net_grid(boxes, S, H, W, dt).to(device)
    img = _sample(images.to(dt).permute(0, 3, 1, 2), grid, "bilinear").permute(0, 2, 3, 1)  # [V, S, S, 3]
    mask = _sample(m_full.to(dt)[:, None], grid, "nearest")[:, 0] > 0.5
    prior_mask = _sample(pm.to(dt)[:, None], grid, "nearest")[:, 0] > 0.5
    depths = torch.stack([torch.stack([p.depth_front, p.depth_back]) for p in priors]).to(device, dt)  # [V, 2, H, W]
    prior_depth = _sample(depths, grid, "nearest")
    has_codes = all(p.attrs_front is not None and p.attrs_back is not None for p in priors)
    codes_f = codes_b = None
    if has_codes:
        codes = torch.stack([torch.cat([p.attrs_front, p.attrs_back], -1) for p in priors]).to(device, dt)  # [V, H, W, 6]
        codes = _sample(codes.permute(0, 3, 1, 2), grid, "nearest").permute(0, 2, 3, 1)
        codes_f, codes_b = codes[..., :3], codes[..., 3:]
    if not bool(prior_mask.flatten(1).any(1).all()):
        raise ValueError("predict_views: a body-model prior covers no pixel at the net resolution (too small in view)")
    x, ref = make_inputs(img, mask, prior_mask, prior_depth[:, 0], prior_depth[:, 1], codes_f, codes_b, model.cfg)
    param = next(model.parameters())
    out = model.predict(x.to(param.device, param.dtype), ref.to(param.device, param.dtype))
    net = torch.cat([out.depth_front[:, None], out.depth_back[:, None], out.codes_front.permute(0, 3, 1, 2),
                     out.codes_back.permute(0, 3, 1, 2)], 1).to(device, dt)  # [V, 8, S, S]
    ext, reached = extend_nearest(net, mask, 3)
    net = torch.where(reached[:, None], ext, net)
    back = _sample(net, _from_net_grid(boxes, S, H, W, dt).to(device), "bilinear")  # [V, 8, H, W]
    zero = back.new_zeros(())
    results = []
    for v in range(V):
        m = m_full[v]
        df = torch.where(m, back[v, 0], zero)
        db = torch.where(m, torch.maximum(back[v, 1], back[v, 0]), zero)
        cf = torch.where(m[..., None], back[v, 2:5].permute(1, 2, 0).clamp(0, 1), zero)
        cb = torch.where(m[..., None], back[v, 5:8].permute(1, 2, 0).clamp(0, 1), zero)
        results.append(ViewPrediction(mask=m, depth_front=df, depth_back=db, codes_front=cf, codes_back=cb))
    return results

"""The depth + skinning-code prediction network: one shared encoder, two U-Net decoders.

Why hand-written: the network is small (a few hundred thousand parameters, trained on 2 CPU cores in minutes) and
its inputs and outputs are specific to this pipeline (a body-model prior rendered into the view, outputs expressed
as residuals over it), so no off-the-shelf segmentation model fits; it is plain ``torch.nn`` convolutions.

Inputs, all at the net resolution ``[B, *, S, S]`` (``S = DepthSkinConfig.size``), built by :func:`make_inputs`:

====  =========================================================================================================
ch    meaning
====  =========================================================================================================
0-2   RGB in [0, 1]
3     person mask (from the user / segmentation), {0, 1}
4     prior mask: pixels covered by the posed naked body model, {0, 1}
5-6   prior front / back depth, ``(z - ref) / depth_scale`` inside the prior mask, 0 outside; ``ref [B]`` is the
      median front depth of the prior (camera z, metres), so the input does not depend on how far the camera is
7-12  prior front / back skinning codes (the body's codes rendered into the view), 0 where absent
13    1 where prior codes were given, 0 where not (the net is trained with them dropped at random, so a caller
      without codes still gets a prediction, a less accurate one)
====  =========================================================================================================

Outputs (:class:`DepthSkinOutput`), every pixel, to be read inside the person mask:

- depth: ``depth = base + residual_scale * raw`` with ``base`` = the prior's depth, extended past the prior's
  coverage over the person mask from the nearest covered pixels (:func:`extend_nearest`, at most ``extend_iters``
  pixels; ``ref`` beyond), so an
  untrained (zero-output) net reproduces the prior-only baseline;
- codes: ``sigmoid(raw + logit(base code))`` with the prior codes extended the same way where they are present,
  ``sigmoid(raw)`` where not: in [0, 1], and again the prior where ``raw = 0``. The last convolution of each decoder
  starts at zero.

Depths are camera z in metres (OpenCV camera, see ``avatar.geometry``); codes are those of
``avatar.predict.skin_codes.SkinCodec``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

__all__ = ["DepthSkinConfig", "DepthSkinOutput", "DepthSkinNet", "NUM_INPUTS", "make_inputs", "decode_outputs",
           "extend_nearest"]

NUM_INPUTS = 14
_CODE_EPS = 1e-3  # prior codes are clamped to [eps, 1 - eps] before the logit


@dataclass(frozen=True)
class DepthSkinConfig:
    """Size and shape of :class:`DepthSkinNet`."""

    size: int = 96
    """Side of the square net input in pixels (a multiple of 2 ** (len(widths) - 1))."""
    widths: tuple[int, ...] = (16, 32, 64, 128)
    """Channels of the encoder levels, full resolution first; the decoders mirror them."""
    depth_scale: float = 0.5
    """Metres per unit of the prior-depth input channels."""
    residual_scale: float = 0.1
    """Metres per unit of the raw depth output (the residual over the prior)."""
    code_dim: int = 3
    """Channels of a skinning code."""
    extend_iters: int = 32
    """Most pixels (rings of 3x3 averaging) by which the prior is extended past its coverage, towards the person
    mask's pixels, to form the output base."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.widths, tuple) or len(self.widths) < 2 or not all(isinstance(w, int) and w > 0 for w in self.widths):
            raise ValueError(f"DepthSkinConfig.widths must be a tuple of >= 2 positive ints, got {self.widths!r}")
        step = 2 ** (len(self.widths) - 1)
        if not isinstance(self.size, int) or self.size < step or self.size % step:
            raise ValueError(f"DepthSkinConfig.size must be a positive multiple of {step}, got {self.size!r}")
        for name in ("depth_scale", "residual_scale"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"DepthSkinConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.extend_iters, int) or self.extend_iters < 0:
            raise ValueError(f"DepthSkinConfig.extend_iters must be an int >= 0, got {self.extend_iters!r}")
        if self.code_dim != 3:
            raise ValueError(f"DepthSkinConfig.code_dim must be 3 (the SkinCodec's code size), got {self.code_dim!r}")


@dataclass(frozen=True)
class DepthSkinOutput:
    """Predictions at the net resolution.

    depth_front, depth_back: [B, S, S] camera z in metres.
    codes_front, codes_back: [B, S, S, 3] skinning codes in [0, 1].
    """

    depth_front: Tensor
    depth_back: Tensor
    codes_front: Tensor
    codes_back: Tensor


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU(),
    )


class _Decoder(nn.Module):
    """U-Net decoder: from the deepest feature up, upsample x2, concatenate the skip, two convolutions."""

    def __init__(self, widths: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        ups = []
        for level in range(len(widths) - 1, 0, -1):
            ups.append(_block(widths[level] + widths[level - 1], widths[level - 1]))
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for block, skip in zip(self.ups, reversed(feats[:-1])):
            x = F_.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


class DepthSkinNet(nn.Module):
    """Shared encoder + depth decoder (2 channels: front, back) + code decoder (6: front, back codes).

    ``forward(inputs [B, 14, S, S]) -> raw [B, 8, S, S]``; :func:`decode_outputs` turns the raw output into depths
    and codes given the inputs (pure function), and :meth:`predict` does both.
    """

    def __init__(self, cfg: DepthSkinConfig | None = None) -> None:
        super().__init__()
        cfg = DepthSkinConfig() if cfg is None else cfg
        if not isinstance(cfg, DepthSkinConfig):
            raise TypeError(f"DepthSkinNet: cfg must be a DepthSkinConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg
        w = cfg.widths
        self.enc = nn.ModuleList([_block(NUM_INPUTS, w[0])] + [_block(w[i - 1], w[i]) for i in range(1, len(w))])
        self.depth_decoder = _Decoder(w, 2)
        self.code_decoder = _Decoder(w, 2 * cfg.code_dim)

    def forward(self, inputs: Tensor) -> Tensor:
        """``inputs [B, 14, S, S]`` (see the module docstring) -> raw ``[B, 8, S, S]`` (2 depth + 6 code channels)."""
        _check_inputs(inputs, self.cfg.size)
        feats = []
        x = inputs
        for i, block in enumerate(self.enc):
            if i > 0:
                x = F_.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return torch.cat([self.depth_decoder(feats), self.code_decoder(feats)], 1)

    def predict(self, inputs: Tensor, ref: Tensor) -> DepthSkinOutput:
        """``inputs [B, 14, S, S]``, ``ref [B]`` (the depth reference of :func:`make_inputs`) -> depths and codes."""
        return decode_outputs(self(inputs), inputs, ref, self.cfg)


def _check_inputs(inputs: Tensor, size: int) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"DepthSkinNet: inputs must be a tensor [B, {NUM_INPUTS}, {size}, {size}], got {type(inputs).__name__}")
    if inputs.ndim != 4 or inputs.shape[1:] != (NUM_INPUTS, size, size):
        raise ValueError(f"DepthSkinNet: inputs must be [B, {NUM_INPUTS}, {size}, {size}], got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"DepthSkinNet: inputs must be floating point, got {inputs.dtype}")


def make_inputs(
    images: Tensor,  # [B, S, S, 3] in [0, 1]
    masks: Tensor,  # [B, S, S] person mask (bool or {0, 1})
    prior_mask: Tensor,  # [B, S, S] bool, pixels covered by the posed body model
    prior_front: Tensor,  # [B, S, S] camera z of the prior's first surface (0 outside prior_mask)
    prior_back: Tensor,  # [B, S, S] camera z of its last surface
    prior_codes_front: Tensor | None,  # [B, S, S, 3] prior codes at the first surface, or None
    prior_codes_back: Tensor | None,  # [B, S, S, 3]
    cfg: DepthSkinConfig,
    codes_present: Tensor | None = None,  # [B] bool: which samples carry prior codes (default: all if given)
) -> tuple[Tensor, Tensor]:
    """Pure function: the network input ``[B, 14, S, S]`` and the depth reference ``ref [B]`` (metres).

    ``ref`` is the median prior front depth inside the prior mask (the person mask's pixels if the prior is empty:
    then there is no reference at all and ``ValueError`` is raised)."""
    B, S = images.shape[0], images.shape[1]
    pm = prior_mask.bool()
    ref = []
    for b in range(B):
        vals = prior_front[b][pm[b]]
        if vals.numel() == 0:
            raise ValueError(f"make_inputs: the body-model prior of sample {b} covers no pixel; cannot set a depth reference")
        ref.append(vals.median())
    ref = torch.stack(ref).to(images.dtype)  # [B]
    pmf = pm.to(images.dtype)
    r = ref[:, None, None]
    df = (prior_front.to(images.dtype) - r) / cfg.depth_scale * pmf
    db = (prior_back.to(images.dtype) - r) / cfg.depth_scale * pmf
    if prior_codes_front is None or prior_codes_back is None:
        codes = images.new_zeros(B, S, S, 6)
        present = images.new_zeros(B)
    else:
        present = images.new_ones(B) if codes_present is None else codes_present.to(images.dtype)
        codes = torch.cat([prior_codes_front, prior_codes_back], -1).to(images.dtype) * pmf[..., None]
        codes = codes * present[:, None, None, None]
    x = torch.cat([
        images, masks.to(images.dtype)[..., None], pmf[..., None], df[..., None], db[..., None], codes,
        present[:, None, None, None].expand(B, S, S, 1),
    ], -1)
    return x.permute(0, 3, 1, 2).contiguous(), ref


def extend_nearest(values: Tensor, valid: Tensor, iters: int, needed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Extend ``values [B, C, S, S]`` from the ``valid [B, S, S]`` pixels outwards by up to ``iters`` rings: each
    ring's pixels take the mean of their valid 3x3 neighbours (an approximate nearest-pixel fill). Stops early once
    every pixel of ``needed [B, S, S]`` (default: all) is reached. Returns the values (0 where not reached) and the
    reached mask ``[B, S, S]``."""
    w = valid[:, None].to(values.dtype)  # [B, 1, S, S]
    v = values * w
    for _ in range(iters):
        missing = (w[:, 0] == 0) if needed is None else (needed & (w[:, 0] == 0))
        if not bool(missing.any()):
            break
        sv = F_.avg_pool2d(v, 3, stride=1, padding=1)  # 3x3 sums / 9
        sw = F_.avg_pool2d(w, 3, stride=1, padding=1)
        new = (w == 0) & (sw > 0)
        v = torch.where(new, sv / sw.clamp(min=1e-12), v)
        w = torch.where(new, torch.ones_like(w), w)
    return v, w[:, 0] > 0


def decode_outputs(raw: Tensor, inputs: Tensor, ref: Tensor, cfg: DepthSkinConfig) -> DepthSkinOutput:
    """Pure function: raw net output ``[B, 8, S, S]`` + its inputs ``[B, 14, S, S]`` + ``ref [B]`` -> depths, codes.

    Depth = extended prior depth (``ref`` where the extension does not reach) + ``residual_scale * raw``; codes =
    sigmoid(raw + logit(extended prior codes)) where prior codes are present, sigmoid(raw) elsewhere."""
    with torch.no_grad():
        pm = inputs[:, 4] > 0.5  # [B, S, S]
        base, reached = extend_nearest(inputs[:, 5:13], pm, cfg.extend_iters, needed=inputs[:, 3] > 0.5)
    r = ref.to(raw.dtype)[:, None, None]
    base_f = torch.where(reached, base[:, 0] * cfg.depth_scale + r, r)
    base_b = torch.where(reached, base[:, 1] * cfg.depth_scale + r, r)
    depth_front = base_f + cfg.residual_scale * raw[:, 0]
    depth_back = base_b + cfg.residual_scale * raw[:, 1]
    use = (reached & (inputs[:, 13] > 0.5))[:, None]  # [B, 1, S, S]
    prior = base[:, 2:8].clamp(_CODE_EPS, 1 - _CODE_EPS)
    logits = raw[:, 2:8] + torch.where(use, torch.logit(prior), torch.zeros_like(prior))
    codes = torch.sigmoid(logits).permute(0, 2, 3, 1)  # [B, S, S, 6]
    return DepthSkinOutput(depth_front, depth_back, codes[..., :3], codes[..., 3:])

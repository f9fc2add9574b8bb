"""Structured pruning + distillation of the two skinning-weight networks: the skinning-code decoder
(``avatar.predict.skin_codes.SkinCodec``, codes ``[3]`` -> weights ``[J]``) and the residual skinning-weight field
(``avatar.skinning.weights.ResidualWeightField``, canonical position -> log-space offsets ``[J]``).

Both end in a softmax over all J bones (104 for anny), so at 20k-50k points a large share of their time is the
``[N, J]`` output itself (the head matmul, ``log``, softmax), not the hidden layers; narrowing the hidden layers
alone leaves that floor. The recipes:

- decoder (:func:`distill_codec_decoder`): remove hidden neurons (``prune_sequential_neurons``: smaller dense layers)
  and distill the narrow decoder on the codes of the codec's own training points (``sample_skin_points``, encoded
  by the codec's encoder, plus a little code noise, since predicted codes are never exact): loss = L1 to the dense
  decoder's weights + cross-entropy to them. The J-wide softmax stays (decoded rows must be full weight vectors).
- field (:class:`SparseWeightField`, :func:`distill_weight_field`): narrower hidden layers, and the head pruned *per
  point* to the ``k`` bones of its base-weight support (top-k of the base weights, fixed per Gaussian set like a
  control-point binding): ``w = softmax_k(log(base_k + eps) + delta_k(x))``, sparse ``[N, k]`` weights + indices
  (the layout ``avatar.skinning.lbs`` takes). Outside the support the dense field gives ``base + eps`` (<= 1e-9)
  times ``exp(delta)``, i.e. ~0; the cost of the truncation is the base mass outside the top k, measured.
  Distilled on the field's own inputs (the Gaussians' canonical means, jittered a few millimetres since means move
  during fitting) against the dense field's weights.

int8 / bf16 apply afterwards (``avatar.compress.quantize``); files via ``avatar.compress.storage``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from avatar.compress.prune import prune_linear_neurons, prune_sequential_neurons
from avatar.skinning.weights import EPS, sinusoidal_encoding


def _lr_at(step: int, steps: int, lr: float) -> float:
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))


# ----------------------------------------------------------------------------------------------------------------
# skinning-code decoder


def distill_codec_decoder(codec, train_weights: Tensor, keep: float | Sequence[int] = 0.5, steps: int = 400,
                          batch: int = 4096, lr: float = 3e-3, code_noise: float = 0.01, seed: int = 0,
                          positions: Tensor | None = None, transforms: Tensor | None = None,
                          lbs_weight: float = 1.0) -> nn.Sequential:
    """A narrower copy of ``codec.decoder`` (hidden neurons pruned to ``keep`` of each width, or to the counts
    ``keep``, largest ``|in| * |out|`` norms first) distilled for ``steps`` Adam steps (cosine decay) on the codes of
    ``train_weights [M, J]`` (the codec's training points' weights) plus Gaussian code noise of ``code_noise``.

    Loss: ``sum_j |p_s - p_t|`` + cross-entropy ``-sum_j p_t log p_s`` against the dense decoder, plus (with the
    points' canonical ``positions [M, 3]`` and flattened bone ``transforms [P, J, 12]``) ``lbs_weight`` x the LBS
    position error in centimetres of the student's weights against ``train_weights`` under those poses -- the
    codec's own training term (``avatar.predict.skin_codes``): mixing up distant bones is what moves points, and
    L1 on weights does not see it. Returns the student (eval mode); ``codec`` is not changed."""
    if train_weights.ndim != 2 or train_weights.shape[1] != codec.num_bones:
        raise ValueError(f"distill_codec_decoder: train_weights must be [M, {codec.num_bones}], got "
                         f"{tuple(train_weights.shape)}")
    if not isinstance(steps, int) or steps < 0 or batch < 1:
        raise ValueError(f"distill_codec_decoder: steps must be an int >= 0 and batch >= 1, got {steps!r}, {batch!r}")
    use_lbs = positions is not None and transforms is not None and lbs_weight > 0
    if use_lbs and (positions.shape != (train_weights.shape[0], 3) or transforms.ndim != 3
                    or transforms.shape[1:] != (codec.num_bones, 12)):
        raise ValueError(f"distill_codec_decoder: positions must be [M, 3] and transforms [P, {codec.num_bones}, 12], "
                         f"got {tuple(positions.shape)} and {tuple(transforms.shape)}")
    gen = torch.Generator().manual_seed(seed)
    W = train_weights.float()
    with torch.no_grad():
        codes = torch.cat([codec.encode(w) for w in W.split(65536)])
    student = prune_sequential_neurons(codec.decoder, keep).train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        i = torch.randint(0, codes.shape[0], (batch,), generator=gen)
        c = codes[i]
        if code_noise > 0:
            c = (c + code_noise * torch.randn(c.shape, generator=gen)).clamp(0, 1)
        with torch.no_grad():
            p_t = torch.softmax(codec.decoder(c), -1)
        logp = torch.log_softmax(student(c), -1)
        p = logp.exp()
        loss = (p - p_t).abs().sum(-1).mean() - (p_t * logp).sum(-1).mean()
        if use_lbs:
            A = torch.einsum("bj,pjk->pbk", p - W[i], transforms.float()).unflatten(-1, (3, 4))  # [P, B, 3, 4]
            err = (A[..., :3] * positions[i].float()[None, :, None, :]).sum(-1) + A[..., 3]  # metres
            loss = loss + lbs_weight * 100.0 * err.norm(dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval()


# ----------------------------------------------------------------------------------------------------------------
# residual skinning-weight field


@dataclass(frozen=True)
class WeightSupport:
    """Per-point bone support of a Gaussian set: ``indices [N, k]`` (int64, the top-k base weights, largest
    first) and ``log_base [N, k]`` = ``log(base_k + eps)``. Valid while the set's base weights do not change
    (recompute after densification), like a control-point binding."""

    indices: Tensor
    log_base: Tensor

    @staticmethod
    def from_base(base_weights: Tensor, k: int, eps: float = EPS) -> "WeightSupport":
        if base_weights.ndim != 2 or not 1 <= k <= base_weights.shape[1]:
            raise ValueError(f"WeightSupport.from_base: need base_weights [N, J] and 1 <= k <= J, got "
                             f"{tuple(base_weights.shape)} and k={k}")
        val, idx = torch.topk(base_weights.detach(), k, dim=-1)
        return WeightSupport(idx.contiguous(), torch.log(val + eps).contiguous())

    def outside_mass(self, base_weights: Tensor) -> Tensor:
        """``[N]`` base-weight mass outside the support (what the truncation drops before the softmax)."""
        return (1 - torch.gather(base_weights, 1, self.indices).sum(-1)).clamp_min(0)


class SparseWeightField(nn.Module):
    """Residual weight field evaluated on each point's bone support only: ``encode(x) -> hidden ... -> J``
    log-offsets, of which the ``k`` support entries are used: ``w_k = softmax(log_base_k + delta_k)``.

    ``forward(points [N, 3], support) -> (weights [N, k], indices [N, k])`` (rows sum to 1; the sparse layout of
    ``avatar.skinning.lbs``). ``body`` / ``head`` as in ``ResidualWeightField`` (any widths)."""

    def __init__(self, body: nn.Sequential, head: nn.Linear, num_freqs: int, scale: float):
        super().__init__()
        self.body, self.head = body, head
        self.num_freqs, self.scale = int(num_freqs), float(scale)
        self.num_bones = int(head.out_features)

    @staticmethod
    def from_field(field, keep: float) -> "SparseWeightField":
        """Structured pruning of a ``ResidualWeightField``: its hidden widths times ``keep`` (whole neurons with the
        largest norms; smaller dense layers), same encoding and head outputs."""
        linears = [m for m in field.body if isinstance(m, nn.Linear)] + [field.head]
        small = prune_linear_neurons(linears, keep)
        body: list[nn.Module] = []
        for lin in small[:-1]:
            body += [lin, nn.ReLU()]
        return SparseWeightField(nn.Sequential(*body), small[-1], field.num_freqs, field.scale)

    def forward(self, points: Tensor, support: WeightSupport) -> tuple[Tensor, Tensor]:
        if points.ndim != 2 or points.shape[1] != 3 or support.indices.shape[0] != points.shape[0]:
            raise ValueError(f"SparseWeightField: points must be [N, 3] with N = the support's "
                             f"{support.indices.shape[0]}, got {tuple(points.shape)}")
        h = self.body(sinusoidal_encoding(points, self.num_freqs, self.scale))
        off = torch.gather(self.head(h), 1, support.indices)  # [N, k]
        # in the support's dtype (the base weights'), also when the network computes in bf16
        return torch.softmax(support.log_base + off.to(support.log_base.dtype), dim=-1), support.indices


def densify_weights(weights: Tensor, indices: Tensor, num_bones: int) -> Tensor:
    """Sparse ``weights [N, k]`` over ``indices [N, k]`` -> dense ``[N, J]``."""
    return weights.new_zeros(weights.shape[0], num_bones).scatter_add_(1, indices, weights)


def distill_weight_field(field, points: Tensor, base_weights: Tensor, keep: float = 0.25, k: int = 8,
                         steps: int = 300, batch: int = 8192, lr: float = 3e-3, jitter: float = 0.005,
                         seed: int = 0) -> tuple[SparseWeightField, WeightSupport]:
    """Prune ``field`` (a ``ResidualWeightField``) to a :class:`SparseWeightField` of ``keep`` x its hidden widths
    with a top-``k`` support of ``base_weights [N, J]``, and distill it for ``steps`` Adam steps on ``points [N, 3]``
    (jittered by ``jitter`` metres, Gaussian) against the dense field's weights restricted to the support
    (loss: L1 over the support + cross-entropy). Returns the student (eval mode) and the support of ``points``."""
    if points.ndim != 2 or points.shape[1] != 3 or base_weights.shape != (points.shape[0], field.num_bones):
        raise ValueError(f"distill_weight_field: need points [N, 3] and base_weights [N, {field.num_bones}], got "
                         f"{tuple(points.shape)} and {tuple(base_weights.shape)}")
    gen = torch.Generator().manual_seed(seed)
    student = SparseWeightField.from_field(field, keep).train()
    support = WeightSupport.from_base(base_weights, k)
    teacher = copy.deepcopy(field).eval()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    n = points.shape[0]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        i = torch.randint(0, n, (min(batch, n),), generator=gen)
        x = points[i].detach()
        if jitter > 0:
            x = x + jitter * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        sup = WeightSupport(support.indices[i], support.log_base[i])
        with torch.no_grad():
            w_t = torch.gather(teacher(x, base_weights[i]), 1, sup.indices)
            w_t = w_t / w_t.sum(-1, keepdim=True).clamp_min(1e-12)
        w_s, _ = student(x, sup)
        loss = (w_s - w_t).abs().sum(-1).mean() - (w_t * torch.log(w_s.clamp_min(1e-12))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval(), support

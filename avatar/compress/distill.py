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

int8 / bf16 apply afterwards (``avatar.compress.quantize``); files via ``avatar.compress.storage``. The shipped
compact decoder (``shipped_decoder_path``, written by ``python -m tools.compress_decoder``) is one such file:
int8 weight matrices, fp32 biases, the layer widths and the distillation report in its manifest
(:func:`save_compact_decoder` / :func:`load_compact_decoder`; loading gives exactly the stored values, nothing is
trained at load or import).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar.compress.prune import prune_linear_neurons, prune_sequential_neurons
from avatar.compress.storage import load_compact, save_compact
from avatar.skinning.weights import EPS, sinusoidal_encoding


def _lr_at(step: int, steps: int, lr: float) -> float:
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))


# ----------------------------------------------------------------------------------------------------------------
# skinning-code decoder


def distill_codec_decoder(codec, train_weights: Tensor, keep: float | Sequence[int] = 0.5, steps: int = 400,
                          batch: int = 4096, lr: float = 3e-3, code_noise: float = 0.01, seed: int = 0,
                          positions: Tensor | None = None, transforms: Tensor | None = None,
                          lbs_weight: float = 1.0, qat_steps: int = 0, qat_lr: float = 3e-4,
                          init: nn.Sequential | None = None) -> nn.Sequential:
    """A narrower copy of ``codec.decoder`` (hidden neurons pruned to ``keep`` of each width, or to the counts
    ``keep``, largest ``|in| * |out|`` norms first) distilled for ``steps`` Adam steps (cosine decay) on the codes of
    ``train_weights [M, J]`` (the codec's training points' weights) plus Gaussian code noise of ``code_noise``.

    Loss: ``sum_j |p_s - p_t|`` + cross-entropy ``-sum_j p_t log p_s`` against the dense decoder, plus (with the
    points' canonical ``positions [M, 3]`` and flattened bone ``transforms [P, J, 12]``) ``lbs_weight`` x the LBS
    position error in centimetres of the student's weights against ``train_weights`` under those poses -- the
    codec's own training term (``avatar.predict.skin_codes``): mixing up distant bones is what moves points, and
    L1 on weights does not see it.

    ``qat_steps`` > 0: then as many steps of the same loss (cosine from ``qat_lr``) with the Linear weights fake-
    quantized to int8 per output channel (straight-through, ``avatar.compress.quantize``); the returned weights are
    then ``dequantize(quantize(w))``, i.e. what an int8 file stores (measured: int8 rounding of a plain distilled
    half-width decoder cost +0.27 mm of held-out LBS error). ``init``: start from this already pruned decoder
    (e.g. a loaded compact decoder) instead of pruning ``codec.decoder``.
    Returns the student (eval mode); ``codec`` is not changed."""
    if train_weights.ndim != 2 or train_weights.shape[1] != codec.num_bones:
        raise ValueError(f"distill_codec_decoder: train_weights must be [M, {codec.num_bones}], got "
                         f"{tuple(train_weights.shape)}")
    if not isinstance(steps, int) or steps < 0 or not isinstance(qat_steps, int) or qat_steps < 0 or batch < 1:
        raise ValueError(f"distill_codec_decoder: steps and qat_steps must be ints >= 0 and batch >= 1, got "
                         f"{steps!r}, {qat_steps!r}, {batch!r}")
    use_lbs = positions is not None and transforms is not None and lbs_weight > 0
    if use_lbs and (positions.shape != (train_weights.shape[0], 3) or transforms.ndim != 3
                    or transforms.shape[1:] != (codec.num_bones, 12)):
        raise ValueError(f"distill_codec_decoder: positions must be [M, 3] and transforms [P, {codec.num_bones}, 12], "
                         f"got {tuple(positions.shape)} and {tuple(transforms.shape)}")
    gen = torch.Generator().manual_seed(seed)
    W = train_weights.float()
    with torch.no_grad():
        codes = torch.cat([codec.encode(w) for w in W.split(65536)])
    if init is not None:
        _decoder_linears(init, "distill_codec_decoder")
        student = copy.deepcopy(init).float().train()
    else:
        student = prune_sequential_neurons(codec.decoder, keep).train()

    def run(n: int, peak: float) -> None:
        opt = torch.optim.Adam(student.parameters(), lr=peak)
        for step in range(n):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, n, peak)
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

    run(steps, lr)
    if qat_steps > 0:
        from torch.nn.utils import parametrize

        from avatar.compress.quantize import _FakeQuantInt8

        linears = [m for m in student if isinstance(m, nn.Linear)]
        for lin in linears:
            parametrize.register_parametrization(lin, "weight", _FakeQuantInt8())
        run(qat_steps, qat_lr)
        for lin in linears:  # keep the fake-quantized values: an int8 file stores them (up to float rounding)
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    return student.eval()


DECODER_FORMAT = "avatar-skin-decoder-compact"
DECODER_SLOPE = 0.01  # LeakyReLU slope of the SkinCodec decoder (avatar.predict.skin_codes._mlp)


def shipped_decoder_path(body_name: str = "anny") -> Path:
    """``data/compressed/skin_decoder_<body>.safetensors`` in the source tree (``python -m tools.compress_decoder``)."""
    return Path(__file__).resolve().parents[2] / "data" / "compressed" / f"skin_decoder_{body_name}.safetensors"


def _decoder_linears(decoder: nn.Sequential, where: str) -> list[nn.Linear]:
    """The Linear layers of a ``Linear, LeakyReLU, ..., Linear`` chain (the SkinCodec decoder layout), checked."""
    mods = list(decoder) if isinstance(decoder, nn.Sequential) else []
    ok = len(mods) % 2 == 1 and all(isinstance(m, nn.Linear) for m in mods[::2]) and all(
        isinstance(m, nn.LeakyReLU) and m.negative_slope == DECODER_SLOPE for m in mods[1::2])
    if not ok:
        raise TypeError(f"{where}: decoder must be an nn.Sequential of Linear / LeakyReLU({DECODER_SLOPE}) layers "
                        f"ending in a Linear, got {type(decoder).__name__}: {decoder!r:.200}")
    lin = mods[::2]
    if any(a.out_features != b.in_features for a, b in zip(lin, lin[1:])):
        raise ValueError(f"{where}: consecutive Linear widths do not chain: {[tuple(l.weight.shape) for l in lin]}")
    return lin


def save_compact_decoder(path: str | Path, decoder: nn.Sequential, meta: dict | None = None) -> Path:
    """Write a (pruned) SkinCodec ``decoder`` to ``path``: weight matrices int8 per output channel, biases float32,
    the widths ``[in, hidden..., J]`` and ``meta`` (JSON-able) in the manifest. Atomic."""
    lin = _decoder_linears(decoder, "save_compact_decoder")
    widths = [lin[0].in_features] + [l.out_features for l in lin]
    sd = {k: v.detach().float() for k, v in decoder.state_dict().items()}
    enc = {k: ("int8" if v.ndim == 2 else "dense") for k, v in sd.items()}
    return save_compact(path, sd, enc, metadata={"format": DECODER_FORMAT, "widths": widths, "slope": DECODER_SLOPE,
                                                 **(meta or {})})


def load_compact_decoder(path: str | Path | None = None, body_name: str = "anny") -> nn.Sequential:
    """Load a file written by :func:`save_compact_decoder` (``None``: the shipped
    ``data/compressed/skin_decoder_<body_name>.safetensors``) into a float32 ``nn.Sequential`` in eval mode holding
    exactly the stored (dequantized int8) values; its ``meta`` attribute holds the manifest's metadata."""
    shipped = path is None
    path = shipped_decoder_path(body_name) if shipped else Path(path)
    if not path.is_file():
        hint = " (write it with `python -m tools.compress_decoder`)" if shipped else ""
        raise FileNotFoundError(f"load_compact_decoder: no compact decoder at {path}{hint}")
    tensors, user = load_compact(path)
    if user.get("format") != DECODER_FORMAT:
        raise ValueError(f"load_compact_decoder: {path} is not a compact skin decoder (format {user.get('format')!r}, "
                         f"expected {DECODER_FORMAT!r})")
    widths = user.get("widths")
    if (not isinstance(widths, list) or len(widths) < 2 or not all(isinstance(w, int) and w > 0 for w in widths)
            or user.get("slope") != DECODER_SLOPE):
        raise ValueError(f"load_compact_decoder: {path}: fields 'widths' / 'slope' must be a list of >= 2 positive "
                         f"ints and {DECODER_SLOPE}, got {widths!r} / {user.get('slope')!r}")
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(DECODER_SLOPE))
    decoder = nn.Sequential(*layers)
    try:
        decoder.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as err:
        raise ValueError(f"load_compact_decoder: {path}: tensors do not match the widths {widths}: {err}") from None
    decoder.eval()
    decoder.meta = user
    return decoder


def codec_with_decoder(codec, decoder: nn.Module):
    """A copy of the SkinCodec ``codec`` (same encoder) whose decoder is ``decoder`` (e.g. a compact one, or one
    behind ``to_bfloat16``); ``decoder`` must map ``[..., 3]`` codes to ``[..., codec.num_bones]`` logits."""
    out = copy.deepcopy(codec)
    out.decoder = decoder
    return out


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

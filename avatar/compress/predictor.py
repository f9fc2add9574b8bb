"""Compressing the depth + skinning-code predictor (``avatar.predict.network.DepthSkinNet``, a U-Net of 3x3 convs).

Speed on a CPU comes from structure, so the recipe is: **channel pruning** to a physically narrower ``DepthSkinNet``
(:func:`prune_depthskin_channels`: every encoder / decoder level keeps the channels whose filters have the largest
L2 norm; GroupNorm keeps its 4-channel groups), **distillation** of the narrow net on the training views the dense
net was trained on (:func:`distill_predictor`: the training loss against the ground truth plus the same loss against
the dense net's predictions), **int8 weights** in the file (:func:`save_compact_predictor`, per-output-channel
symmetric int8 for every conv, loaded back exactly as ``q * scale``) and **bf16 + channels-last compute**
(:class:`CastPredictor`, for CPUs with native bf16; ``bf16_support()`` says whether this one has it).

Measured here (2-core CPU with AMX-BF16, batch 4 at 96 px, interleaved medians): dense fp32 128 ms, half-width
fp32 channels-last 44 ms, half-width bf16 channels-last 29 ms (one loaded run; see ``bench_compress.py`` for the
numbers of record).

Accuracy of a predictor is not an image: it is the held-out depth error (mm, front and back, inside the person
mask) and the code / decoded-weight L1 of :func:`avatar.predict.train.evaluate_predictor`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar.compress.storage import load_compact, save_compact

FORMAT = "avatar-depthskin-compact"


def _conv_score(conv: nn.Conv2d, norm: nn.GroupNorm | None = None) -> Tensor:
    s = conv.weight.detach().flatten(1).norm(dim=1)
    if norm is not None:
        s = s * norm.weight.detach().abs()
    return s


def _top(scores: Tensor, count: int) -> Tensor:
    return torch.sort(torch.topk(scores, count).indices).values


def _copy_conv(src: nn.Conv2d, dst: nn.Conv2d, rows: Tensor, cols: Tensor) -> None:
    dst.weight.copy_(src.weight[rows][:, cols])
    if src.bias is not None:
        dst.bias.copy_(src.bias[rows])


def _copy_block(src: nn.Sequential, dst: nn.Sequential, cols: Tensor, mid: Tensor, out: Tensor) -> None:
    # _block: Conv2d(cin, c) GroupNorm(g, c) SiLU Conv2d(c, c) SiLU
    _copy_conv(src[0], dst[0], mid, cols)
    dst[1].weight.copy_(src[1].weight[mid])
    dst[1].bias.copy_(src[1].bias[mid])
    _copy_conv(src[3], dst[3], out, mid)


def _block_sets(block: nn.Sequential, width: int) -> tuple[Tensor, Tensor]:
    return _top(_conv_score(block[0], block[1]), width), _top(_conv_score(block[3]), width)


@torch.no_grad()
def prune_depthskin_channels(net, keep: float):
    """A new, narrower ``DepthSkinNet`` (widths ``max(4, round(keep * w))``, multiples of 4 so GroupNorm keeps
    4-channel groups) initialised from ``net``: at every level the block's middle and output channels with the
    largest filter norms are kept (middle channels scored by ``|filter| * |GroupNorm gain|``), and the next layers
    take exactly those input channels (U-Net skips included). The original is untouched. Not function-preserving
    (GroupNorm statistics change), hence :func:`distill_predictor` afterwards."""
    from avatar.predict.network import DepthSkinConfig, DepthSkinNet

    if not isinstance(net, DepthSkinNet):
        raise TypeError(f"prune_depthskin_channels: net must be a DepthSkinNet, got {type(net).__name__}")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"prune_depthskin_channels: keep must be in (0, 1], got {keep}")
    old = net.cfg.widths
    new = tuple(max(4, int(round(keep * w / 4.0)) * 4) for w in old)
    new = tuple(min(n, w) for n, w in zip(new, old))
    cfg = DepthSkinConfig(**{**net.cfg.__dict__, "widths": new})
    small = DepthSkinNet(cfg).to(dtype=next(net.parameters()).dtype)
    outs = []
    cols = torch.arange(net.enc[0][0].in_channels)
    for i, (b_old, b_new) in enumerate(zip(net.enc, small.enc)):
        mid, out = _block_sets(b_old, new[i])
        _copy_block(b_old, b_new, cols, mid, out)
        outs.append(out)
        cols = out
    for d_old, d_new in ((net.depth_decoder, small.depth_decoder), (net.code_decoder, small.code_decoder)):
        prev = outs[-1]
        for j, (u_old, u_new) in enumerate(zip(d_old.ups, d_new.ups)):
            level = len(old) - 1 - j  # upsampled from this level, skip from level - 1
            cols = torch.cat([prev, old[level] + outs[level - 1]])
            mid, out = _block_sets(u_old, new[level - 1])
            _copy_block(u_old, u_new, cols, mid, out)
            prev = out
        _copy_conv(d_old.head, d_new.head, torch.arange(d_old.head.out_channels), prev)
    return small


class CastPredictor(nn.Module):
    """Inference wrapper of a ``DepthSkinNet`` computing in ``dtype`` with channels-last tensors (oneDNN's fast conv
    layout on CPU); inputs and outputs stay float32 ``[B, C, S, S]``. ``predict`` decodes like the wrapped net."""

    def __init__(self, net, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True):
        super().__init__()
        self.net = copy.deepcopy(net).eval().to(dtype)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.cfg, self.dtype, self.channels_last = net.cfg, dtype, channels_last

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).float().contiguous()

    def predict(self, inputs: Tensor, ref: Tensor):
        from avatar.predict.network import decode_outputs

        return decode_outputs(self(inputs), inputs, ref, self.cfg)


def distill_predictor(student, teacher, train_set, steps: int, train_cfg=None, lr: float = 1e-3,
                      teacher_weight: float = 1.0, seed: int = 0, log: Callable[[str], None] | None = None,
                      log_every: int = 50) -> tuple[object, list[dict]]:
    """Fine-tune ``student`` (in place; returned) for ``steps`` Adam steps on ``train_set``
    (``avatar.predict.samples.SampleSet``, the dense net's training views) with ``predictor_loss`` against the
    ground truth plus ``teacher_weight`` x the same loss against ``teacher``'s predictions (depths and codes);
    the augmentations and loss weights of ``train_cfg`` (``PredictorTrainConfig``, default: the shipped one's);
    learning rate: 3% warm-up, cosine decay to 2%. Every random draw comes from ``seed``. Returns the student
    (eval mode) and the logged loss history."""
    from avatar.predict.train import PredictorTrainConfig, _lr_factor, batch_inputs, predictor_loss

    cfg = PredictorTrainConfig() if train_cfg is None else train_cfg
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"distill_predictor: steps must be an int >= 0, got {steps!r}")
    if student.cfg.size != teacher.cfg.size:
        raise ValueError(f"distill_predictor: student and teacher sizes differ ({student.cfg.size} vs {teacher.cfg.size})")
    teacher.eval()
    student.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    history: list[dict] = []
    window: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step / max(steps, 1))
        idx = torch.randint(0, len(train_set), (cfg.batch_size,), generator=gen)
        x, ref = batch_inputs(train_set, idx, student.cfg, gen, cfg.drop_prior_codes, cfg.color_gain)
        s = train_set.select(idx)
        with torch.no_grad():
            t = teacher.predict(x, ref)
        out = student.predict(x, ref)
        loss, _ = predictor_loss(out, s.target_depth, s.target_codes, s.masks, cfg)
        if teacher_weight > 0:
            t_depth = torch.stack([t.depth_front, t.depth_back], 1)
            t_codes = torch.cat([t.codes_front, t.codes_back], -1)
            lt, _ = predictor_loss(out, t_depth, t_codes, s.masks, cfg)
            loss = loss + teacher_weight * lt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            history.append({"step": step + 1, "loss": sum(window) / len(window)})
            if log is not None:
                log(f"[distill_predictor] step {step + 1}/{steps} loss {history[-1]['loss']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            window = []
    student.eval()
    return student, history


def quantize_predictor_weights(net) -> object:
    """A copy of ``net`` holding exactly what :func:`save_compact_predictor` stores (and
    :func:`load_compact_predictor` gives back): conv weights as their int8 round trip ``dequantize(quantize(w))``,
    every other floating tensor rounded to float16."""
    from avatar.compress.quantize import dequantize_per_channel, quantize_per_channel_int8

    out = copy.deepcopy(net)
    with torch.no_grad():
        for name, t in list(out.named_parameters()) + list(out.named_buffers()):
            if not t.is_floating_point():
                continue
            if t.ndim == 4 and name.endswith("weight"):
                q, s = quantize_per_channel_int8(t)
                t.copy_(dequantize_per_channel(q, s, t.dtype))
            else:
                t.copy_(t.to(torch.float16).to(t.dtype))
    return out


def save_compact_predictor(path: str | Path, net, meta: dict | None = None) -> Path:
    """Write ``net`` (a ``DepthSkinNet``) to ``path``: conv weights int8 per output channel, everything else
    (biases, GroupNorm gains) float16; the network config and ``meta`` in the file's manifest. Atomic."""
    from avatar.predict.network import DepthSkinNet

    if not isinstance(net, DepthSkinNet):
        raise TypeError(f"save_compact_predictor: net must be a DepthSkinNet, got {type(net).__name__}")
    sd = net.state_dict()
    enc = {k: ("int8" if (v.ndim == 4 and k.endswith("weight")) else "fp16") for k, v in sd.items()}
    cfg = dict(net.cfg.__dict__)
    cfg["widths"] = list(cfg["widths"])
    return save_compact(path, sd, enc, metadata={"format": FORMAT, "net": cfg, **(meta or {})})


def load_compact_predictor(path: str | Path):
    """Load a file written by :func:`save_compact_predictor` into a float32 ``DepthSkinNet`` (eval mode); its
    ``meta`` attribute holds the stored metadata. Errors name the file."""
    from avatar.predict.network import DepthSkinConfig, DepthSkinNet

    path = Path(path)
    tensors, user = load_compact(path)
    if user.get("format") != FORMAT:
        raise ValueError(f"load_compact_predictor: {path} is not a compact predictor (format {user.get('format')!r}, "
                         f"expected {FORMAT!r})")
    try:
        net_cfg = dict(user["net"])
        net_cfg["widths"] = tuple(net_cfg["widths"])
        cfg = DepthSkinConfig(**net_cfg)
        cfg.validate()
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"load_compact_predictor: {path}: field 'net' is not a valid DepthSkinConfig: {err}") from None
    net = DepthSkinNet(cfg)
    try:
        net.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as err:
        raise ValueError(f"load_compact_predictor: {path}: tensors do not match the network: {err}") from None
    net.eval()
    net.meta = user
    return net


def parameter_count(module: nn.Module) -> int:
    """Parameters of a module (a ``CastPredictor`` counts its wrapped net's)."""
    return sum(p.numel() for p in module.parameters())

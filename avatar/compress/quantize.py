"""Post-training quantization of the project's small MLPs, and a short quantization-aware fine-tune.

- ``quantize_per_channel_int8`` / ``dequantize_per_channel``: symmetric int8 weights with one fp32 scale per output
  channel (``scale = max|w_row| / 127``); the storage format of ``avatar.compress.storage`` too.
- ``Int8WeightLinear`` / ``quantize_weight_only``: weight-only int8 (4x smaller weights); the weight is dequantized
  on the fly into the compute dtype (fp32 or bf16). torch's ``_weight_int8pack_mm`` CPU kernel was measured 37x
  *slower* than an fp32 matmul here (50k x 128 x 128), so the dequantize-then-matmul path is the fast one on CPU.
- ``quantize_dynamic_int8``: int8 dynamic quantization of every ``nn.Linear`` (activations quantized per batch at
  run time) with ``torch.ao.quantization.quantize_dynamic``. torch 2.13 prints a deprecation warning for the
  quantized tensor types it uses and ships no non-deprecated replacement in core (the successor is the separate
  ``torchao`` package, not a dependency here); the warning is silenced locally and the result measured, not assumed.
- ``to_bfloat16`` / ``bf16_support``: bf16 weights and activations (inputs cast in, outputs cast back). This CPU has
  AVX512-BF16 and AMX-BF16; on CPUs without them bf16 matmuls are emulated and slower, so callers check first.
- ``qat_finetune``: straight-through fake quantization of the Linear weights (``torch.nn.utils.parametrize``) while
  optimizing a caller-given loss for a few steps, then exact conversion to ``Int8WeightLinear`` -- for when plain
  PTQ costs more accuracy than allowed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


def quantize_per_channel_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``weight [out, ...]`` -> ``(q int8 [out, ...], scale float32 [out])`` with
    ``weight ~= q * scale``; rows of zeros get scale 1 (q = 0)."""
    if weight.ndim < 1 or not weight.is_floating_point():
        raise ValueError(f"quantize_per_channel_int8: need a floating tensor [out, ...], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale.view(-1, *([1] * (w.ndim - 1)))).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q [out, ...] * scale [out]`` in ``dtype`` (computed in float32, then cast)."""
    if q.dtype != torch.int8 or scale.ndim != 1 or scale.shape[0] != q.shape[0]:
        raise ValueError(f"dequantize_per_channel: need int8 q [out, ...] and scale [out], got {q.dtype} "
                         f"{tuple(q.shape)} and {tuple(scale.shape)}")
    return (q.float() * scale.float().view(-1, *([1] * (q.ndim - 1)))).to(dtype)


class Int8WeightLinear(nn.Module):
    """A Linear layer whose weight is stored as int8 + per-channel scale (buffers ``qweight [out, in]``,
    ``scale [out]``; ``bias [out]`` float or None) and dequantized into ``compute_dtype`` at each call."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if qweight.ndim != 2:
            raise ValueError(f"Int8WeightLinear: qweight must be [out, in], got {tuple(qweight.shape)}")
        dequantize_per_channel(qweight[:1], scale[:1])  # dtype / shape checks
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = int(qweight.shape[1]), int(qweight.shape[0])

    @staticmethod
    def from_linear(linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> "Int8WeightLinear":
        q, s = quantize_per_channel_int8(linear.weight)
        return Int8WeightLinear(q, s, linear.bias, compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize_per_channel(self.qweight, self.scale, self.compute_dtype)
        b = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, make(child))
        else:
            _replace_linears(child, make)
    return model


def quantize_weight_only(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by an :class:`Int8WeightLinear`."""
    return _replace_linears(copy.deepcopy(model), lambda l: Int8WeightLinear.from_linear(l, compute_dtype))


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (float32, CPU) with every ``nn.Linear`` int8-dynamically quantized (see module docstring)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return quantize_dynamic(copy.deepcopy(model).float().eval(), {nn.Linear}, dtype=torch.qint8)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16), and what was found."""
    flags = _cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return True, f"native bf16 ({', '.join(native)}; torch CPU capability {torch.backends.cpu.get_cpu_capability()})"
    return False, ("no avx512_bf16 / amx_bf16 CPU flag: bf16 matmuls would be emulated (slower than fp32); "
                   f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


class CastModule(nn.Module):
    """Runs ``module`` in ``dtype``: floating inputs are cast in, floating outputs cast back to the first input's
    dtype (so the wrapped network is a drop-in replacement)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, *args: Tensor) -> Tensor:
        out_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), torch.float32)
        cast = [a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = self.module(*cast)
        return out.to(out_dtype) if torch.is_tensor(out) and out.is_floating_point() else out


def to_bfloat16(module: nn.Module) -> CastModule:
    """A bf16 copy of ``module`` behind a :class:`CastModule`."""
    return CastModule(copy.deepcopy(module), torch.bfloat16)


class _FakeQuantInt8(nn.Module):
    """Straight-through fake quantization: forward uses ``dequant(quant(w))``, backward passes gradients to ``w``."""

    def forward(self, w: Tensor) -> Tensor:
        q, s = quantize_per_channel_int8(w)
        return w + (dequantize_per_channel(q, s, w.dtype) - w).detach()


def qat_finetune(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], steps: int, lr: float = 1e-4,
                 compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Quantization-aware fine-tune: a copy of ``model`` trained for ``steps`` Adam steps on ``loss_fn(model)`` with
    fake-quantized (int8 per-channel) Linear weights, returned as weight-only int8 (what was trained with is exactly
    what is stored). ``model`` itself is not changed."""
    if steps < 0:
        raise ValueError(f"qat_finetune: steps must be >= 0, got {steps}")
    m = copy.deepcopy(model).float().train()
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise ValueError("qat_finetune: the model has no nn.Linear layers")
    for lin in linears:
        parametrize.register_parametrization(lin, "weight", _FakeQuantInt8())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m)
        loss.backward()
        opt.step()
    for lin in linears:
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    return quantize_weight_only(m.eval(), compute_dtype)


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers as held in memory (quantized dynamic modules: their packed int8
    weights and fp32 scales / biases)."""
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for mod in model.modules():  # torch.ao dynamic Linear keeps its weight in a packed param, not a parameter
        if hasattr(mod, "_packed_params") and hasattr(mod, "weight") and callable(mod.weight):
            w = mod.weight()
            total += w.numel() * 1 + w.shape[0] * 4
            b = mod.bias()
            total += 0 if b is None else b.numel() * 4
    return total

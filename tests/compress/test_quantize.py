import pytest
import torch
from torch import nn

from avatar.compress.quantize import (
    Int8WeightLinear,
    bf16_support,
    dequantize_per_channel,
    model_bytes,
    qat_finetune,
    quantize_dynamic_int8,
    quantize_per_channel_int8,
    quantize_weight_only,
    to_bfloat16,
)


def _mlp(gen):
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return m


def test_per_channel_int8_error_bound(gen):
    w = torch.randn(32, 48, generator=gen)
    q, s = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and s.shape == (32,)
    err = (dequantize_per_channel(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())  # round-to-nearest: half a step per channel
    torch.testing.assert_close(s, w.abs().amax(1) / 127)


@torch.no_grad()
def test_quantized_models_within_tolerance_of_fp32(gen):
    m = _mlp(gen)
    x = torch.randn(256, 16, generator=gen)
    ref = m(x)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert rel(quantize_weight_only(m)(x)) < 0.02
    assert rel(quantize_dynamic_int8(m)(x)) < 0.03
    assert rel(to_bfloat16(m)(x)) < 0.03
    assert to_bfloat16(m)(x).dtype == torch.float32
    # weight-only int8 computes exactly with the dequantized weights
    wo = quantize_weight_only(m)
    lin = wo[0]
    assert isinstance(lin, Int8WeightLinear)
    torch.testing.assert_close(lin(x), x @ dequantize_per_channel(lin.qweight, lin.scale).T + m[0].bias)
    assert model_bytes(wo) < 0.3 * model_bytes(m)
    assert model_bytes(quantize_dynamic_int8(m)) < 0.4 * model_bytes(m)


def test_bf16_support_reports_reason():
    ok, why = bf16_support()
    assert isinstance(ok, bool) and why


def test_qat_finetune_reduces_quantized_error(gen):
    m = _mlp(gen)
    x = torch.randn(512, 16, generator=gen)
    target = torch.sin(x[:, :4] * 2)
    ptq = quantize_weight_only(m)
    loss = lambda net: ((net(x) - target) ** 2).mean()  # noqa: E731
    qat = qat_finetune(m, loss, steps=40, lr=3e-3)
    assert isinstance(qat[0], Int8WeightLinear)
    assert float(loss(qat)) < float(loss(ptq))
    with pytest.raises(ValueError, match="Linear"):
        qat_finetune(nn.ReLU(), loss, 1)

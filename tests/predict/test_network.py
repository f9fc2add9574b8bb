"""DepthSkinNet: shapes, output ranges, residual-over-prior behaviour, gradients, input building, bad input."""

import pytest
import torch

from avatar.predict.network import (
    NUM_INPUTS,
    DepthSkinConfig,
    DepthSkinNet,
    decode_outputs,
    extend_nearest,
    make_inputs,
)

CFG = DepthSkinConfig(size=32, widths=(4, 8, 16))


def _prior(B=2, S=32, gen=None):
    """A synthetic prior: a disc of depth ~2.5 m (front) / ~2.8 m (back) with smooth codes, plus an image/mask
    slightly larger than the disc (clothing past the body)."""
    gen = gen or torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    r = ((xx - S / 2) ** 2 + (yy - S / 2) ** 2).sqrt()
    pm = (r < S * 0.3).expand(B, S, S).clone()
    mask = (r < S * 0.36).expand(B, S, S).clone()
    front = torch.where(pm, 2.5 + 0.01 * r, torch.zeros(())).expand(B, S, S).clone()
    back = torch.where(pm, 2.8 - 0.01 * r, torch.zeros(())).expand(B, S, S).clone()
    codes = torch.stack([xx / S, yy / S, 0.5 + 0 * xx], -1).expand(B, S, S, 3) * pm[..., None]
    images = torch.rand(B, S, S, 3, generator=gen)
    return images, mask, pm, front, back, codes.clone(), (1 - codes).clone() * pm[..., None]


def _inputs(B=2):
    images, mask, pm, front, back, cf, cb = _prior(B)
    return make_inputs(images, mask, pm, front, back, cf, cb, CFG), (images, mask, pm, front, back, cf, cb)


def test_shapes_and_parameter_count():
    net = DepthSkinNet(CFG)
    (x, ref), _ = _inputs(3)
    assert x.shape == (3, NUM_INPUTS, 32, 32) and ref.shape == (3,)
    raw = net(x)
    assert raw.shape == (3, 8, 32, 32)
    out = net.predict(x, ref)
    assert out.depth_front.shape == out.depth_back.shape == (3, 32, 32)
    assert out.codes_front.shape == out.codes_back.shape == (3, 32, 32, 3)
    # the shipped size: a few hundred thousand parameters
    n = sum(p.numel() for p in DepthSkinNet().parameters())
    assert 300_000 < n < 1_000_000


def test_make_inputs_channels_and_reference():
    (x, ref), (images, mask, pm, front, back, cf, cb) = _inputs(2)
    assert torch.allclose(ref, torch.stack([front[b][pm[b]].median() for b in range(2)]))
    assert torch.equal(x[:, 0:3], images.permute(0, 3, 1, 2))
    assert torch.equal(x[:, 3], mask.float()) and torch.equal(x[:, 4], pm.float())
    expected = (front - ref[:, None, None]) / CFG.depth_scale * pm
    assert torch.allclose(x[:, 5], expected, atol=1e-6)
    assert torch.equal(x[:, 7:10], cf.permute(0, 3, 1, 2)) and torch.equal(x[:, 13], torch.ones(2, 32, 32))
    # without codes: zeros and the "present" channel off
    x2, _ = make_inputs(images, mask, pm, front, back, None, None, CFG)
    assert torch.equal(x2[:, 7:14], torch.zeros(2, 7, 32, 32))


def test_zero_head_reproduces_the_prior():
    """The decoders' last convolutions start at zero: the untrained net outputs the prior (residual formulation),
    extended past the prior's coverage to the nearest covered pixels."""
    net = DepthSkinNet(CFG)
    (x, ref), (images, mask, pm, front, back, cf, cb) = _inputs(2)
    out = net.predict(x, ref)
    assert torch.allclose(out.depth_front[pm], front[pm], atol=1e-5)
    assert torch.allclose(out.depth_back[pm], back[pm], atol=1e-5)
    # codes: sigmoid(logit(c)) = c for codes inside [eps, 1 - eps]
    inside = pm & (cf > 2e-3).all(-1) & (cf < 1 - 2e-3).all(-1)
    assert torch.allclose(out.codes_front[inside], cf[inside], atol=1e-5)
    # a ring just outside the prior takes the value of its nearest covered pixels: the prior depth there is
    # 2.5 + 0.01 r at r ~ 0.3 S, so the extension lies within 1 cm of it
    ring = mask & ~pm
    assert ring.any()
    assert ((out.depth_front[ring] - (2.5 + 0.01 * 0.3 * 32)).abs() < 0.01).all()


def test_residual_scale_and_code_range():
    net = DepthSkinNet(CFG)
    with torch.no_grad():
        net.depth_decoder.head.bias.copy_(torch.tensor([1.0, -2.0]))
        net.code_decoder.head.bias.fill_(50.0)
        net.code_decoder.head.weight.normal_(0, 10.0)
    (x, ref), (images, mask, pm, front, back, cf, cb) = _inputs(2)
    out = net.predict(x, ref)
    assert torch.allclose(out.depth_front[pm], front[pm] + CFG.residual_scale, atol=1e-5)
    assert torch.allclose(out.depth_back[pm], back[pm] - 2 * CFG.residual_scale, atol=1e-5)
    for codes in (out.codes_front, out.codes_back):
        assert codes.min() >= 0 and codes.max() <= 1
    # large logits saturate towards 1 but stay a sigmoid (never outside [0, 1], never NaN)
    assert torch.isfinite(out.codes_front).all() and out.codes_front.mean() > 0.9


def test_decode_outputs_is_pure_and_uses_ref_where_no_prior_reaches():
    cfg = DepthSkinConfig(size=32, widths=(4, 8, 16), extend_iters=0)
    (x, ref), (images, mask, pm, front, back, cf, cb) = _inputs(2)
    raw = torch.zeros(2, 8, 32, 32)
    raw[:, 0] = 0.5
    out = decode_outputs(raw, x, ref, cfg)
    off = ~pm
    assert torch.allclose(out.depth_front[off], (ref[:, None, None] + 0.5 * cfg.residual_scale).expand(2, 32, 32)[off])
    assert torch.allclose(out.codes_front[off], torch.full_like(out.codes_front[off], 0.5))  # sigmoid(0)


def test_extend_nearest_against_a_brute_force_nearest_fill():
    values = torch.zeros(1, 1, 9, 9)
    valid = torch.zeros(1, 9, 9, dtype=torch.bool)
    valid[0, 4, 4] = True
    values[0, 0, 4, 4] = 3.0
    v, reached = extend_nearest(values, valid, 2)
    # two rings of 3x3 growth: a 5x5 square around the one valid pixel, all holding its value
    expect = torch.zeros(9, 9, dtype=torch.bool)
    expect[2:7, 2:7] = True
    assert torch.equal(reached[0], expect)
    assert torch.equal(v[0, 0][expect], torch.full((25,), 3.0))
    assert torch.equal(v[0, 0][~expect], torch.zeros(81 - 25))


def test_gradients_reach_encoder_and_both_decoders():
    net = DepthSkinNet(CFG)
    with torch.no_grad():  # leave the zero init so that gradients reach below the heads
        net.depth_decoder.head.weight.normal_(0, 0.1)
        net.code_decoder.head.weight.normal_(0, 0.1)
    (x, ref), _ = _inputs(2)
    out = net.predict(x, ref)
    loss = out.depth_front.mean() + out.depth_back.mean() + out.codes_front.mean() + out.codes_back.mean()
    loss.backward()
    for name in ("enc.0.0.weight", "depth_decoder.ups.0.0.weight", "code_decoder.ups.0.0.weight",
                 "depth_decoder.head.weight", "code_decoder.head.weight"):
        g = dict(net.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_bad_input():
    net = DepthSkinNet(CFG)
    with pytest.raises(ValueError, match=r"\[B, 14, 32, 32\]"):
        net(torch.zeros(1, 13, 32, 32))
    with pytest.raises(ValueError, match="inputs must be"):
        net(torch.zeros(1, 14, 48, 48))
    with pytest.raises(TypeError, match="floating point"):
        net(torch.zeros(1, 14, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a tensor"):
        net([[0.0]])
    with pytest.raises(ValueError, match="size must be a positive multiple of 4"):
        DepthSkinNet(DepthSkinConfig(size=30, widths=(4, 8, 16)))
    with pytest.raises(ValueError, match="widths"):
        DepthSkinNet(DepthSkinConfig(widths=(8,)))
    with pytest.raises(TypeError, match="DepthSkinConfig"):
        DepthSkinNet({"size": 32})
    images, mask, pm, front, back, cf, cb = _prior(2)
    pm[1] = False
    with pytest.raises(ValueError, match="sample 1 covers no pixel"):
        make_inputs(images, mask, pm, front, back, cf, cb, CFG)

import pytest
import torch

from avatar.compress.predictor import (
    CastPredictor,
    distill_predictor,
    load_compact_predictor,
    parameter_count,
    prune_depthskin_channels,
    quantize_predictor_weights,
    save_compact_predictor,
)
from avatar.compress.storage import save_compact
from avatar.predict.network import DepthSkinConfig, DepthSkinNet
from avatar.predict.samples import SampleSet

CFG = DepthSkinConfig(size=32, widths=(8, 16, 32), extend_iters=4)


def _net(seed: int = 0) -> DepthSkinNet:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = DepthSkinNet(CFG)
    finally:
        torch.random.set_rng_state(state)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero heads, so the raw output depends on every layer
        for d in (net.depth_decoder, net.code_decoder):
            d.head.weight.copy_(torch.randn(d.head.weight.shape, generator=g) * 0.1)
    return net.eval()


def _inputs(gen, b=2):
    return torch.rand(b, 14, CFG.size, CFG.size, generator=gen)


def _samples(gen, n=6) -> SampleSet:
    """Synthetic views: a disc (the person) in front of a slanted plane prior, targets offset from the prior."""
    S = CFG.size
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r = ((xx - S / 2) ** 2 + (yy - S / 2) ** 2).float().sqrt()
    masks = (r < S * 0.4).expand(n, S, S).clone()
    prior_mask = (r < S * 0.35).expand(n, S, S).clone()
    base = 2.0 + 0.01 * xx.float()
    prior_depth = torch.stack([base, base + 0.3], 0).expand(n, 2, S, S) * prior_mask[:, None]
    bump = 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.cos(r / S * 6)
    target_depth = (torch.stack([base, base + 0.3], 0)[None] - bump) * masks[:, None]
    codes = torch.rand(n, S, S, 6, generator=gen) * 0.2 + 0.4
    images = (torch.rand(n, S, S, 3, generator=gen) * 255).to(torch.uint8)
    return SampleSet(images, masks, prior_mask, prior_depth.float(), (codes * prior_mask[..., None]).half(),
                     target_depth.float(), codes.half(), torch.eye(4).expand(n, 4, 4), torch.eye(3).expand(n, 3, 3),
                     torch.zeros(n, dtype=torch.int64))


def test_keep_all_channels_is_the_same_network(gen):
    net = _net()
    same = prune_depthskin_channels(net, 1.0)
    assert same.cfg.widths == CFG.widths
    x = _inputs(gen)
    with torch.no_grad():
        assert torch.equal(same(x), net(x))


def test_half_channels_is_a_smaller_dense_net_with_copied_filters(gen):
    net = _net()
    small = prune_depthskin_channels(net, 0.5)
    assert small.cfg.widths == (4, 8, 16)
    assert 3.5 < parameter_count(net) / parameter_count(small) < 4.5
    # the first conv keeps whole filters of the original (all 14 inputs), the kept ones by filter norm
    w0, ws = net.enc[0][0].weight, small.enc[0][0].weight
    score = w0.flatten(1).norm(dim=1) * net.enc[0][1].weight.abs()
    kept = torch.sort(torch.topk(score, 4).indices).values
    assert torch.equal(ws, w0[kept])
    with torch.no_grad():
        assert small(_inputs(gen)).shape == (2, 8, CFG.size, CFG.size)
    assert net.cfg.widths == CFG.widths  # the original is untouched


def test_compact_file_round_trip_is_exact_and_small(gen, tmp_path):
    net = prune_depthskin_channels(_net(), 0.5)
    stored = quantize_predictor_weights(net)
    path = save_compact_predictor(tmp_path / "p.safetensors", stored, {"note": "test"})
    back = load_compact_predictor(path)
    x = _inputs(gen)
    with torch.no_grad():
        assert torch.equal(back(x), stored(x))
        # int8 weights change the output only a little
        assert float((stored(x) - net(x)).abs().max()) < 0.05 * float(net(x).abs().max())
    assert back.meta["note"] == "test" and back.cfg == net.cfg
    dense = save_compact(tmp_path / "dense.safetensors", stored.state_dict(), "dense")
    assert path.stat().st_size < 0.55 * dense.stat().st_size  # int8 convs; a tiny net's manifest weighs in
    # quantizing twice changes nothing (what is stored is a fixed point)
    again = quantize_predictor_weights(stored)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), stored.state_dict().values()))


def test_compact_file_errors(tmp_path):
    other = save_compact(tmp_path / "o.safetensors", {"w": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not a compact predictor"):
        load_compact_predictor(other)
    with pytest.raises(TypeError, match="DepthSkinNet"):
        save_compact_predictor(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="keep must be"):
        prune_depthskin_channels(_net(), 0.0)


def test_cast_predictor_channels_last(gen):
    net = _net()
    x = _inputs(gen)
    with torch.no_grad():
        ref = net(x)
        out32 = CastPredictor(net, torch.float32)(x)
        out16 = CastPredictor(net)(x)
    torch.testing.assert_close(out32, ref, atol=1e-5, rtol=1e-4)
    assert out16.dtype == torch.float32 and out16.is_contiguous()
    assert float((out16 - ref).abs().max()) < 0.05 * float(ref.abs().max())
    ref_in = torch.full((2,), 2.0)
    p = CastPredictor(net, torch.float32).predict(x, ref_in)
    q = net.predict(x, ref_in)
    torch.testing.assert_close(p.depth_front, q.depth_front, atol=1e-5, rtol=1e-5)


def test_distillation_moves_the_student_towards_the_teacher(gen):
    from avatar.predict.train import PredictorTrainConfig, batch_inputs

    teacher = _net(3)
    student = prune_depthskin_channels(teacher, 0.5)
    data = _samples(gen)
    x, ref = batch_inputs(data, torch.arange(len(data)), CFG)

    def gap(m):
        with torch.no_grad():
            a, b = m.predict(x, ref), teacher.predict(x, ref)
        return float((a.depth_front - b.depth_front).abs().mean() + (a.codes_front - b.codes_front).abs().mean())

    before = gap(student)
    cfg = PredictorTrainConfig(net=CFG, batch_size=2)
    student, history = distill_predictor(student, teacher, data, 12, cfg, lr=3e-3, teacher_weight=4.0, log_every=6)
    assert len(history) == 2 and all(h["loss"] > 0 for h in history)
    assert gap(student) < 0.7 * before
    assert not student.training
    with pytest.raises(ValueError, match="steps"):
        distill_predictor(student, teacher, data, -1, cfg)

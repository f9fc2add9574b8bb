import pytest
import torch

from avatar.compress.distill import (
    SparseWeightField,
    WeightSupport,
    densify_weights,
    distill_codec_decoder,
    distill_weight_field,
)
from avatar.compress.quantize import quantize_weight_only, to_bfloat16
from avatar.predict.skin_codes import SkinCodec
from avatar.skinning.weights import ResidualWeightField

J = 12


def _field(gen, hidden=32, head_scale=0.5):
    f = ResidualWeightField(J, hidden=hidden, layers=2, num_freqs=2, scale=1.0, generator=gen)
    with torch.no_grad():
        f.head.weight.copy_(torch.randn(f.head.weight.shape, generator=gen) * head_scale)
        f.head.bias.copy_(torch.randn(J, generator=gen) * 0.2)
    return f.eval()


def _sparse_base(gen, n, k_nonzero=3):
    """Base weights with at most ``k_nonzero`` bones per row (like a body model's)."""
    idx = torch.stack([torch.randperm(J, generator=gen)[:k_nonzero] for _ in range(n)])
    w = torch.rand(n, k_nonzero, generator=gen) + 0.05
    return densify_weights(w / w.sum(-1, keepdim=True), idx, J)


def test_full_support_and_width_reproduces_the_dense_field(gen):
    f = _field(gen)
    x = torch.rand(200, 3, generator=gen)
    base = torch.softmax(torch.randn(200, J, generator=gen) * 3, -1)
    sf = SparseWeightField.from_field(f, 1.0)
    sup = WeightSupport.from_base(base, J)
    w, idx = sf(x, sup)
    with torch.no_grad():
        torch.testing.assert_close(densify_weights(w, idx, J), f(x, base), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(200), atol=1e-6, rtol=0)
    assert float(sup.outside_mass(base).max()) < 1e-6


def test_top_k_support_is_exact_when_the_base_has_at_most_k_bones(gen):
    f = _field(gen)
    x = torch.rand(300, 3, generator=gen)
    base = _sparse_base(gen, 300, 3)
    sup = WeightSupport.from_base(base, 4)
    w, idx = SparseWeightField.from_field(f, 1.0)(x, sup)
    with torch.no_grad():
        dense = f(x, base)
    # outside the base support the dense field gives (0 + eps) exp(delta) / Z ~ 1e-9: dropped
    torch.testing.assert_close(densify_weights(w, idx, J), dense, atol=1e-6, rtol=0)
    assert float(sup.outside_mass(base).max()) < 1e-6
    assert idx.shape == (300, 4) and w.dtype == base.dtype


def test_distilled_narrow_field_is_closer_than_pruned_alone(gen):
    f = _field(gen, hidden=32)
    x = torch.rand(2000, 3, generator=gen)
    base = _sparse_base(gen, 2000, 4)
    with torch.no_grad():
        ref = f(x, base)

    def err(sf, sup):
        with torch.no_grad():
            w, i = sf(x, sup)
        return float((densify_weights(w, i, J) - ref).abs().sum(-1).mean())

    sup = WeightSupport.from_base(base, 4)
    e_pruned = err(SparseWeightField.from_field(f, 0.25), sup)
    student, sup2 = distill_weight_field(f, x, base, keep=0.25, k=4, steps=150, batch=1024, lr=1e-2, seed=0)
    assert torch.equal(sup2.indices, sup.indices)
    e_dist = err(student, sup)
    assert e_dist < 0.5 * e_pruned and e_dist < 0.1
    assert sum(p.numel() for p in student.parameters()) < 0.4 * sum(p.numel() for p in f.parameters())
    # quantized copies run through the same interface (int8 weight-only, bf16 compute), weights stay fp32 rows
    for q in (quantize_weight_only(student), to_bfloat16(student)):
        with torch.no_grad():
            w, _ = q(x, sup)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(-1), torch.ones(2000), atol=1e-5, rtol=0)
        assert err(q, sup) < e_dist + 0.05


def test_weight_field_errors(gen):
    f = _field(gen)
    with pytest.raises(ValueError, match="1 <= k <= J"):
        WeightSupport.from_base(torch.rand(5, J), J + 1)
    sup = WeightSupport.from_base(torch.rand(5, J), 3)
    with pytest.raises(ValueError, match="N = the support"):
        SparseWeightField.from_field(f, 0.5)(torch.rand(4, 3), sup)
    with pytest.raises(ValueError, match="base_weights"):
        distill_weight_field(f, torch.rand(5, 3), torch.rand(5, J + 1))


def _codec(seed=0, bones=8):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return SkinCodec(bones).eval()
    finally:
        torch.random.set_rng_state(state)


def test_codec_decoder_distillation_approaches_the_dense_decoder(gen):
    codec = _codec()
    with torch.no_grad():  # a sharper teacher than the random init, so the student has something to learn
        codec.decoder[-1].weight.mul_(8.0)
    w = torch.softmax(torch.randn(3000, 8, generator=gen) * 3, -1)
    with torch.no_grad():
        codes = codec.encode(w)
        ref = codec.decode(codes)
    from avatar.compress.prune import prune_sequential_neurons

    def err(dec):
        with torch.no_grad():
            return float((torch.softmax(dec(codes), -1) - ref).abs().sum(-1).mean())

    e0 = err(prune_sequential_neurons(codec.decoder, 0.25))
    small = distill_codec_decoder(codec, w, keep=0.25, steps=80, batch=256, lr=3e-3, code_noise=0.0)
    assert err(small) < 0.5 * e0
    assert not small.training
    # the LBS term: positions and per-pose bone transforms [P, J, 12]
    pos = torch.rand(3000, 3, generator=gen)
    T = torch.eye(4)[:3].reshape(1, 1, 12).expand(2, 8, 12).clone()
    T[..., 3] += torch.randn(2, 8, generator=gen) * 0.1  # per-bone translations
    small2 = distill_codec_decoder(codec, w, keep=0.25, steps=20, batch=256, positions=pos, transforms=T)
    assert err(small2) < e0
    with pytest.raises(ValueError, match="transforms"):
        distill_codec_decoder(codec, w, steps=1, positions=pos, transforms=T[:, :3])
    with pytest.raises(ValueError, match="train_weights"):
        distill_codec_decoder(codec, w[:, :5])


def test_compact_decoder_file_round_trip_is_exact(gen, tmp_path):
    from avatar.compress.distill import codec_with_decoder, load_compact_decoder, save_compact_decoder
    from avatar.compress.quantize import dequantize_per_channel, quantize_per_channel_int8

    codec = _codec()
    w = torch.softmax(torch.randn(500, 8, generator=gen) * 3, -1)
    small = distill_codec_decoder(codec, w, keep=0.5, steps=5, batch=64)
    path = save_compact_decoder(tmp_path / "dec.safetensors", small, {"steps": 5, "note": "x"})
    back = load_compact_decoder(path)
    assert back.meta["steps"] == 5 and back.meta["widths"] == [3, 32, 64, 128, 64, 8]
    assert not back.training
    for (k, a), b in zip(small.state_dict().items(), back.state_dict().values()):
        want = dequantize_per_channel(*quantize_per_channel_int8(a)) if a.ndim == 2 else a
        assert torch.equal(b, want), k  # int8 weights exactly dequantize(quantize(w)), biases exact
    codes = torch.rand(200, 3, generator=gen)
    with torch.no_grad():
        dec = codec_with_decoder(codec, back).decode(codes)
        ref = codec_with_decoder(codec, small).decode(codes)
    assert (dec - ref).abs().max() < 0.02
    torch.testing.assert_close(dec.sum(-1), torch.ones(200), atol=1e-5, rtol=0)
    assert codec.decoder is not back  # the original codec keeps its dense decoder
    # smaller than the fp32 state dict by ~4x (int8 matrices + fp32 biases + header)
    assert path.stat().st_size < 0.5 * 4 * sum(p.numel() for p in small.parameters())


def test_codec_decoder_qat_gives_int8_exact_weights_and_beats_plain_rounding(gen, tmp_path):
    from avatar.compress.distill import load_compact_decoder, save_compact_decoder
    from avatar.compress.quantize import dequantize_per_channel, quantize_per_channel_int8

    codec = _codec()
    with torch.no_grad():
        codec.decoder[-1].weight.mul_(8.0)
    w = torch.softmax(torch.randn(2000, 8, generator=gen) * 3, -1)
    with torch.no_grad():
        codes = codec.encode(w)
        ref = codec.decode(codes)
    plain = distill_codec_decoder(codec, w, keep=0.25, steps=60, batch=256, code_noise=0.0)
    qat = distill_codec_decoder(codec, w, keep=0.25, steps=0, batch=256, code_noise=0.0, qat_steps=60, qat_lr=1e-3,
                                init=plain)
    for lin in (m for m in qat if isinstance(m, torch.nn.Linear)):  # weights already on the int8 grid
        torch.testing.assert_close(dequantize_per_channel(*quantize_per_channel_int8(lin.weight)), lin.weight,
                                   atol=1e-6, rtol=0)

    def err(dec):
        back = load_compact_decoder(save_compact_decoder(tmp_path / "d.safetensors", dec))
        with torch.no_grad():
            return float((torch.softmax(back(codes), -1) - ref).abs().sum(-1).mean())

    assert err(qat) < err(plain)
    with pytest.raises(ValueError, match="qat_steps"):
        distill_codec_decoder(codec, w, steps=1, qat_steps=-1)


def test_compact_decoder_errors(tmp_path):
    from avatar.compress.distill import load_compact_decoder, save_compact_decoder
    from avatar.compress.storage import save_compact

    with pytest.raises(TypeError, match="nn.Sequential of Linear"):
        save_compact_decoder(tmp_path / "a.safetensors", torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                                                             torch.nn.Linear(4, 5)))
    with pytest.raises(FileNotFoundError, match="no compact decoder"):
        load_compact_decoder(tmp_path / "missing.safetensors")
    save_compact(tmp_path / "other.safetensors", {"w": torch.zeros(2, 2)}, metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a compact skin decoder"):
        load_compact_decoder(tmp_path / "other.safetensors")
    save_compact_decoder(tmp_path / "d.safetensors", _codec().decoder)
    from avatar.compress.storage import load_compact

    t, meta = load_compact(tmp_path / "d.safetensors")
    save_compact(tmp_path / "bad.safetensors", t, metadata={**meta, "widths": [3, 7, 8]})
    with pytest.raises(ValueError, match="do not match the widths"):
        load_compact_decoder(tmp_path / "bad.safetensors")


def _shipped_decoder():
    from avatar.compress.distill import shipped_decoder_path

    return shipped_decoder_path("anny")


@pytest.mark.skipif(not _shipped_decoder().is_file(), reason="data/compressed/skin_decoder_anny.safetensors not written")
def test_shipped_compact_decoder_loads_and_matches_its_recorded_heldout_error(anny_body, monkeypatch):
    """The shipped file (python -m tools.compress_decoder) loads without any training and reproduces the held-out
    LBS error recorded in its metadata on the recorded held-out set; it is >= 4x smaller than the dense fp32 decoder."""
    import avatar.compress.distill as distill
    from avatar.compress.distill import codec_with_decoder, load_compact_decoder
    from avatar.predict.skin_codes import evaluate_skin_codec, load_skin_codec, shipped_codec_path
    from avatar.predict.train import file_sha256
    from tools.compress_decoder import heldout_set

    def no_training(*a, **k):
        raise AssertionError("loading the shipped decoder must not train")

    monkeypatch.setattr(distill, "distill_codec_decoder", no_training)
    monkeypatch.setattr(torch.optim.Adam, "step", no_training)
    dec = load_compact_decoder()
    meta = dec.meta
    codec = load_skin_codec()
    assert meta["teacher"]["sha256"] == file_sha256(shipped_codec_path("anny"))  # distilled from the shipped codec
    assert meta["command"].startswith("python -m tools.compress_decoder") and isinstance(meta["seed"], int)
    assert meta["parameters"] == sum(p.numel() for p in dec.parameters())
    dense_fp32_bytes = 4 * meta["teacher"]["parameters"]
    assert _shipped_decoder().stat().st_size <= dense_fp32_bytes / 4
    spec = meta["heldout"]
    test, shapes = heldout_set(anny_body, spec)
    ev = evaluate_skin_codec(codec_with_decoder(codec, dec), anny_body, test, shapes, spec["poses"], spec["pose_seed"])
    rec = meta["val"]["student_int8_fp32"]
    assert ev["lbs_error_mm_mean"] == pytest.approx(rec["lbs_error_mm_mean"], rel=1e-3, abs=1e-4)
    assert ev["l1_mean"] == pytest.approx(rec["l1_mean"], rel=1e-3, abs=1e-4)
    # and the recorded numbers are those of a useful decoder: close to the dense one, far from the undistilled prune
    dense = meta["val"]["dense_fp32"]["lbs_error_mm_mean"]
    assert rec["lbs_error_mm_mean"] < dense + 0.1
    assert meta["val"]["pruned_no_distill"]["lbs_error_mm_mean"] > 10 * rec["lbs_error_mm_mean"]

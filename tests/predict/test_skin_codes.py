"""The skinning-code autoencoder: shapes and ranges, sampling, a short training run, save/load, the shipped codec."""

import json

import pytest
import torch

from avatar.predict.skin_codes import (
    SkinCodec,
    SkinCodecConfig,
    evaluate_skin_codec,
    load_skin_codec,
    sample_skin_points,
    save_skin_codec,
    shipped_codec_path,
    train_skin_codec,
)


def test_codec_shapes_and_ranges(gen):
    codec = SkinCodec(7)
    w = torch.softmax(torch.randn(5, 4, 7, generator=gen) * 3, -1)
    codes = codec.encode(w)
    assert codes.shape == (5, 4, 3) and bool(((codes > 0) & (codes < 1)).all())
    dec = codec.decode(torch.rand(11, 3, generator=gen))
    assert dec.shape == (11, 7) and bool((dec >= 0).all())
    torch.testing.assert_close(dec.sum(-1), torch.ones(11))
    torch.testing.assert_close(codec(w), codec.decode(codec.encode(w)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 7\]"):
        codec.encode(torch.rand(3, 6))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        codec.decode(torch.rand(3, 4))
    with pytest.raises(ValueError, match="num_bones"):
        SkinCodec(1)


def test_samples_lie_on_and_near_the_surface(anny_body, gen):
    from avatar.eval.metrics import point_to_mesh_distance

    shapes = torch.full((1, 6), 0.5)
    s = sample_skin_points(anny_body, shapes, 3000, 0.5, 0.04, gen)
    V = anny_body.num_vertices
    assert s.canonical.shape == (3000 + 1500 + V, 3) and s.weights.shape == (3000 + 1500 + V, 104)
    torch.testing.assert_close(s.weights.sum(-1), torch.ones(len(s.weights)))
    rest = anny_body.rest(shapes).vertices[0]
    torch.testing.assert_close(s.canonical[-V:], rest)  # the vertices themselves, with their own weights
    torch.testing.assert_close(s.weights[-V:], anny_body.dense_skin_weights())
    d_surface = point_to_mesh_distance(s.canonical[:150], rest, anny_body.faces)
    assert float(d_surface.max()) < 1e-5
    d_off = point_to_mesh_distance(s.canonical[3000:3300], rest, anny_body.faces)
    assert float(d_off.max()) <= 0.04 + 1e-4 and float(d_off.mean()) > 0.005
    torch.testing.assert_close(s.weights[3000:4500], s.weights[:1500])  # offset copies keep the surface weights


@pytest.fixture
def one_thread():
    """The codec is tiny: one torch thread is much faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_beats_trivial_codes_and_roundtrips(anny_body, tmp_path, one_thread):
    cfg = SkinCodecConfig(num_shapes=1, surface_samples=3000, steps=150, batch_size=256, lr=5e-3,
                          holdout_samples=1500, eval_poses=2)
    codec, report = train_skin_codec(anny_body, cfg, seed=3)
    # a constant code (no information) decodes to one row for every point; the trained codec must do far better
    gen = torch.Generator().manual_seed(0)
    test = sample_skin_points(anny_body, torch.full((1, 6), 0.5), 1500, 0.0, 0.0, gen, include_vertices=False)
    with torch.no_grad():
        trained = (codec(test.weights) - test.weights).abs().sum(-1).mean()
        const = (test.weights.mean(0, keepdim=True) - test.weights).abs().sum(-1).mean()
    assert float(trained) < 0.9 * float(const)
    assert 0 < report["l1_mean"] < 2 and 0 < report["lbs_error_mm_mean"] <= report["lbs_error_mm_max"]
    # deterministic for a seed
    small = SkinCodecConfig(num_shapes=1, surface_samples=500, steps=3, batch_size=64, holdout_samples=200, eval_poses=1)
    one, r1 = train_skin_codec(anny_body, small, seed=3)
    two, r2 = train_skin_codec(anny_body, small, seed=3)
    for a, b in zip(one.state_dict().values(), two.state_dict().values()):
        assert torch.equal(a, b)
    assert r1["l1_mean"] == r2["l1_mean"]
    # save / load gives exactly the stored values, and the metadata
    path = save_skin_codec(tmp_path / "codec.safetensors", codec, {"body": "anny", "seed": 3, "config": cfg, "report": report})
    loaded = load_skin_codec(path)
    assert loaded.num_bones == 104 and not loaded.training
    for k, v in codec.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["seed"] == 3 and meta["config"]["steps"] == 150 and meta["report"]["l1_mean"] == report["l1_mean"]


def test_evaluation_matches_a_direct_lbs_reference(anny_body):
    """evaluate_skin_codec's LBS error equals skinning the points with true and decoded weights by hand."""
    from avatar.data.synthetic import make_motion
    from avatar.skinning.lbs import lbs_points
    from avatar.types import BodyPose

    torch.manual_seed(0)
    codec = SkinCodec(104).eval()
    shapes = torch.full((1, 6), 0.5)
    s = sample_skin_points(anny_body, shapes, 400, 0.5, 0.03, torch.Generator().manual_seed(1), include_vertices=False)
    rep = evaluate_skin_codec(codec, anny_body, s, shapes, num_poses=2, seed=5)
    rest = anny_body.rest(shapes)
    motion = make_motion(anny_body, rest.bone_heads[0], "free", 14, 5)
    pose = BodyPose(motion.rotations[[0, 13]], motion.translation[[0, 13]])
    T, _ = anny_body.bone_transforms(pose, shapes.expand(2, -1))
    with torch.no_grad():
        dec = codec(s.weights)
    errs = torch.cat([(lbs_points(s.canonical, s.weights, T[t]) - lbs_points(s.canonical, dec, T[t])).norm(dim=-1)
                      for t in range(2)]) * 1000
    assert rep["lbs_error_mm_mean"] == pytest.approx(float(errs.mean()), rel=1e-5)
    assert rep["lbs_error_mm_max"] == pytest.approx(float(errs.max()), rel=1e-5)
    assert rep["l1_mean"] == pytest.approx(float((dec - s.weights).abs().sum(-1).mean()), rel=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no skinning codec at"):
        load_skin_codec(tmp_path / "missing.safetensors")
    codec = SkinCodec(5)
    path = save_skin_codec(tmp_path / "c.safetensors", codec, {"body": "anny"})
    with pytest.raises(ValueError, match="codec for body 'anny', expected 'smpl'"):
        load_skin_codec(path, body_name="smpl")
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_skin_codec(path)
    save_skin_codec(path, codec, {"body": "anny"})
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_skin_codec(path)
    with pytest.raises(ValueError, match="meta must be a dict"):
        save_skin_codec(tmp_path / "d.safetensors", codec, {})


@pytest.mark.skipif(not shipped_codec_path("anny").is_file(), reason="the shipped codec has not been trained yet")
def test_shipped_codec_quality(anny_body):
    """The shipped codec loads and its stored held-out numbers hold on fresh held-out samples."""
    codec = load_skin_codec()
    meta = codec.meta
    assert meta["body"] == "anny" and meta["bone_names"] == list(anny_body.bone_names)
    shapes = torch.tensor([[0.2, 0.6, 0.4, 0.6, 0.5, 0.45]])
    s = sample_skin_points(anny_body, shapes, 4000, 0.5, 0.05, torch.Generator().manual_seed(99), include_vertices=False)
    rep = evaluate_skin_codec(codec, anny_body, s, shapes, num_poses=3, seed=11)
    stored = meta["report"]
    assert rep["l1_mean"] < 1.5 * stored["l1_mean"] + 0.02
    assert rep["lbs_error_mm_mean"] < 1.5 * stored["lbs_error_mm_mean"] + 1.0
    assert stored["l1_mean"] < 0.5  # a constant code scores ~1.8 (test above)


def test_trains_for_smpl_layout_bodies(fake_smpl_file, one_thread):
    """Any body model works (SMPL: 24 bones, random poses instead of anny's motion): the codec beats a constant code."""
    from avatar.body import SMPLBody

    body = SMPLBody(fake_smpl_file.parent.parent, model_type="smpl")
    cfg = SkinCodecConfig(num_shapes=1, surface_samples=2000, steps=100, batch_size=256, lr=5e-3,
                          holdout_samples=1000, eval_poses=2)
    codec, report = train_skin_codec(body, cfg, seed=0)
    assert codec.num_bones == body.num_bones == 24
    assert report["lbs_poses_per_shape"] == 2 and report["lbs_error_mm_mean"] >= 0
    s = sample_skin_points(body, torch.zeros(1, body.shape_dim), 1000, 0.0, 0.0, torch.Generator().manual_seed(1),
                           include_vertices=False)
    with torch.no_grad():
        trained = (codec(s.weights) - s.weights).abs().sum(-1).mean()
    const = (s.weights.mean(0, keepdim=True) - s.weights).abs().sum(-1).mean()
    assert float(trained) < float(const)

"""Training of the depth + skinning-code network: loss, baseline fill, a short training run, save/load, inference on
views of any size, and the shipped weights against the prior-only baseline on held-out synthetic renders."""

import dataclasses
import json

import pytest
import torch

from avatar.predict.infer import ViewPrediction, load_predictor, predict_views, shipped_predictor_path
from avatar.predict.network import DepthSkinConfig, DepthSkinNet, DepthSkinOutput
from avatar.predict.samples import SampleConfig, SampleSet, generate_samples
from avatar.predict.train import (
    PredictorTrainConfig,
    evaluate_predictor,
    file_sha256,
    fill_from_prior,
    predictor_loss,
    save_predictor,
    train_predictor,
)
from avatar.predict.views import DepthLayers

TINY_NET = DepthSkinConfig(size=48, widths=(8, 16, 32))


@pytest.fixture(scope="module")
def codec():
    from avatar.predict.skin_codes import load_skin_codec

    return load_skin_codec()


@pytest.fixture(scope="module")
def tiny_sets(anny_body, codec):
    small = dict(size=48, texture_size=64, motion_frames=6)
    train = generate_samples(anny_body, codec, SampleConfig(seed=11, num_subjects=2, views_per_subject=8, **small))
    val = generate_samples(anny_body, codec, SampleConfig(seed=12, num_subjects=1, views_per_subject=6, **small))
    return train, val


def test_loss_matches_a_hand_computation():
    B, S = 1, 4
    gt_depth = torch.full((B, 2, S, S), 2.0)
    gt_codes = torch.full((B, S, S, 6), 0.5)
    masks = torch.zeros(B, S, S, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    perfect = DepthSkinOutput(gt_depth[:, 0].clone(), gt_depth[:, 1].clone(), gt_codes[..., :3].clone(), gt_codes[..., 3:].clone())
    cfg = PredictorTrainConfig(net=TINY_NET, train=SampleConfig(size=48), val=SampleConfig(seed=1, size=48))
    loss, parts = predictor_loss(perfect, gt_depth, gt_codes, masks, cfg)
    assert float(loss) == 0.0
    # front depth off by 1 cm inside the mask and 1 m outside it (ignored); codes off by 0.1 in one channel
    df = gt_depth[:, 0].clone() + 0.01 * masks + 1.0 * ~masks
    cf = gt_codes[..., :3].clone()
    cf[..., 0] += 0.1
    out = DepthSkinOutput(df, gt_depth[:, 1].clone(), cf, gt_codes[..., 3:].clone())
    loss, parts = predictor_loss(out, gt_depth, gt_codes, masks, cfg)
    assert parts["depth_front_m"] == pytest.approx(0.01, rel=1e-5)
    assert parts["codes_front"] == pytest.approx(0.1 / 3, rel=1e-5)
    assert parts["grad_m"] == pytest.approx(0.0, abs=1e-7)  # a constant offset inside the mask has no gradient
    assert float(loss) == pytest.approx(cfg.depth_weight * 0.01 + cfg.code_weight * 0.1 / 3, rel=1e-5)


def test_fill_from_prior_reaches_every_needed_pixel():
    values = torch.zeros(1, 2, 16, 16)
    valid = torch.zeros(1, 16, 16, dtype=torch.bool)
    valid[0, 2:5, 2:5] = True
    values[0, 0][valid[0]] = 1.5
    values[0, 1][valid[0]] = -2.0
    needed = torch.zeros(1, 16, 16, dtype=torch.bool)
    needed[0, 14, 15] = True  # far from the valid block
    out = fill_from_prior(values, valid, needed)
    assert out[0, 0, 14, 15] == pytest.approx(1.5) and out[0, 1, 14, 15] == pytest.approx(-2.0)


def test_samples_are_consistent(tiny_sets, anny_body):
    train, _ = tiny_sets
    assert len(train) == 16 and train.images.shape == (16, 48, 48, 3) and train.images.dtype == torch.uint8
    m = train.masks
    assert m.flatten(1).any(1).all() and train.prior_mask.flatten(1).any(1).all()
    # depths: positive inside the masks, 0 outside; back layer never in front of the front layer
    assert (train.target_depth[:, 0][m] > 0.5).all() and (train.target_depth[:, 0][~m] == 0).all()
    assert (train.target_depth[:, 1][m] >= train.target_depth[:, 0][m] - 1e-5).all()
    assert ((train.target_codes >= 0) & (train.target_codes <= 1)).all()
    # clothing lies outside the body: over the pixels both cover, the clothed front surface is nearer on average
    both = m & train.prior_mask
    assert (train.target_depth[:, 0][both] - train.prior_depth[:, 0][both]).mean() < 0


def test_generation_is_a_pure_function_of_the_seed(anny_body, codec):
    cfg = SampleConfig(seed=5, num_subjects=1, views_per_subject=2, size=32, texture_size=32, motion_frames=3)
    torch.manual_seed(0)
    a = generate_samples(anny_body, codec, cfg)
    torch.manual_seed(1)  # global RNG state must not matter
    b = generate_samples(anny_body, codec, cfg)
    c = generate_samples(anny_body, codec, dataclasses.replace(cfg, seed=6))
    for f in ("images", "masks", "prior_depth", "target_codes", "viewmats", "Ks"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.viewmats, c.viewmats)
    with pytest.raises(ValueError, match="SampleConfig.fill"):
        generate_samples(anny_body, codec, dataclasses.replace(cfg, fill=(0.9, 0.5)))
    with pytest.raises(ValueError, match="codec has 3 bones"):
        from avatar.predict.skin_codes import SkinCodec

        generate_samples(anny_body, SkinCodec(3), cfg)


@pytest.mark.slow
def test_quick_training_reduces_the_validation_error(tiny_sets, codec):
    train, val = tiny_sets
    cfg = PredictorTrainConfig(net=TINY_NET, train=SampleConfig(seed=11, size=48), val=SampleConfig(seed=12, size=48),
                               steps=80, batch_size=4, lr=3e-3, eval_every=0, log_every=0)
    model, report = train_predictor(cfg, codec=codec, log=None, samples=(train, val))
    first, last = report["val_initial"], report["val"]
    # the zero-initialised heads start at the prior baseline (same fill), and training beats it clearly
    assert first["depth_front_mm"] == pytest.approx(first["prior_depth_front_mm"], rel=0.02)
    depth_first = first["depth_front_mm"] + first["depth_back_mm"]
    depth_last = last["depth_front_mm"] + last["depth_back_mm"]
    assert depth_last < 0.85 * depth_first, (depth_first, depth_last)
    assert last["codes_l1"] < 1.5 * first["codes_l1"]
    # the returned model holds float16-representable weights and evaluating it again gives the report's numbers
    for p in model.parameters():
        assert torch.equal(p, p.half().float())
    again = evaluate_predictor(model, val, codec)
    assert again["depth_front_mm"] == pytest.approx(last["depth_front_mm"], rel=1e-6)


def test_save_load_round_trip_is_exact(tmp_path, tiny_sets):
    _, val = tiny_sets
    torch.manual_seed(3)
    model = DepthSkinNet(TINY_NET)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_predictor(tmp_path / "net.safetensors", model, {"seed": 3})
    loaded = load_predictor(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dtype"] == "float16" and meta["seed"] == 3 and tuple(meta["net"]["widths"]) == TINY_NET.widths
    assert loaded.cfg == TINY_NET
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and b.dtype == torch.float32
        assert torch.equal(a.half().float(), b), k
    model_fp16 = DepthSkinNet(TINY_NET)
    model_fp16.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    a = evaluate_predictor(model_fp16, val)
    b = evaluate_predictor(loaded, val)
    assert a == b


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no predictor weights"):
        load_predictor(tmp_path / "missing.safetensors")
    model = DepthSkinNet(TINY_NET)
    path = save_predictor(tmp_path / "net.safetensors", model, {})
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="net.json.*not a depth/skin predictor"):
        load_predictor(path)
    path.with_suffix(".json").write_text(json.dumps({**meta, "net": {**meta["net"], "widths": [8, 16, 64]}}))
    with pytest.raises(ValueError, match="tensors do not match"):
        load_predictor(path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_predictor(path)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_predictor(tmp_path / "net.bin", model, {})


def _posed_prior(anny_body, codec, width, height):
    """The anny rest body seen from the front at ``width x height``, with its skinning codes as attributes."""
    from avatar.geometry.projection import intrinsics_from_fov, look_at
    from avatar.predict.views import render_depth_layers

    v = anny_body.rest().vertices[0].float()
    centre = (v.min(0).values + v.max(0).values) / 2
    eye = centre + torch.tensor([0.0, -3.0, 0.1])
    view = look_at(eye[None].double(), centre[None].double(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))[0].float()
    K = intrinsics_from_fov(45.0, width, height)
    codes = codec.encode(anny_body.dense_skin_weights().float())
    with torch.no_grad():
        return render_depth_layers(v, anny_body.faces, view, K, width, height, vertex_attrs=codes)


def test_predict_views_with_zero_heads_returns_the_prior_at_the_view_size(anny_body, codec):
    """An untrained net predicts the prior; after cropping, resampling to the net size and back, the prediction
    matches the prior at the view's own pixels (away from the silhouette, where nearest sampling decides)."""
    W, H = 150, 200
    prior = _posed_prior(anny_body, codec, W, H)
    model = DepthSkinNet(DepthSkinConfig(size=64, widths=(8, 16, 32)))
    images = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(0))
    (pred,) = predict_views(model, images, prior.mask[None], [prior])
    assert isinstance(pred, ViewPrediction)
    assert pred.depth_front.shape == (H, W) and pred.codes_back.shape == (H, W, 3)
    m = prior.mask
    assert (pred.depth_front[~m] == 0).all() and (pred.codes_front[~m] == 0).all()
    inner = -torch.nn.functional.max_pool2d(-m[None, None].float(), 7, stride=1, padding=3)[0, 0] > 0.5
    err_f = (pred.depth_front - prior.depth_front).abs()[inner]
    err_c = (pred.codes_front - prior.attrs_front).abs()[inner]
    assert err_f.median() < 0.003 and err_f.quantile(0.9) < 0.02, (err_f.median(), err_f.quantile(0.9))
    assert err_c.median() < 0.01
    assert (pred.depth_back[m] >= pred.depth_front[m]).all()


def test_predict_views_bad_input(anny_body, codec):
    prior = _posed_prior(anny_body, codec, 40, 60)
    model = DepthSkinNet(DepthSkinConfig(size=32, widths=(8, 16, 32)))
    img = torch.rand(1, 60, 40, 3)
    mask = prior.mask[None]
    with pytest.raises(ValueError, match=r"masks must be \[V, H, W\]"):
        predict_views(model, img, torch.ones(1, 60, 41, dtype=torch.bool), [prior])
    with pytest.raises(ValueError, match="list of 2 DepthLayers"):
        predict_views(model, img.expand(2, -1, -1, -1), mask.expand(2, -1, -1), [prior])
    with pytest.raises(ValueError, match="images must be a float"):
        predict_views(model, img[..., :2], mask, [prior])
    with pytest.raises(ValueError, match="mask of view 0 is empty"):
        predict_views(model, img, torch.zeros_like(mask), [prior])
    empty = DepthLayers(torch.zeros(60, 40, dtype=torch.bool), torch.zeros(60, 40), torch.zeros(60, 40))
    with pytest.raises(ValueError, match="prior of view 0 covers no pixel"):
        predict_views(model, img, mask, [empty])
    with pytest.raises(ValueError, match=r"priors\[0\].depth_front must be \[H, W\]"):
        predict_views(model, img, mask, [dataclasses.replace(prior, depth_front=torch.zeros(3, 3))])
    with pytest.raises(TypeError, match="DepthSkinNet"):
        predict_views(object(), img, mask, [prior])
    # priors without codes are accepted (less accurate codes)
    (pred,) = predict_views(model, img, mask, [dataclasses.replace(prior, attrs_front=None, attrs_back=None)])
    assert torch.isfinite(pred.codes_front).all()


@pytest.mark.slow
def test_shipped_weights_beat_the_prior_baseline_on_held_out_renders(anny_body, codec):
    path = shipped_predictor_path()
    model = load_predictor()
    meta = model.meta
    # trained against the shipped codec (the codes mean nothing with another one)
    from avatar.predict.skin_codes import shipped_codec_path

    assert meta["codec"]["sha256"] == file_sha256(shipped_codec_path()), "retrain: the shipped codec changed"
    assert path.stat().st_size < 4_000_000 and meta["dtype"] == "float16"
    # held-out subjects (a seed used by neither training nor validation), at the net size
    held = SampleConfig(seed=424_242, num_subjects=1, views_per_subject=4, size=model.cfg.size)
    samples = generate_samples(anny_body, codec, held)
    r = evaluate_predictor(model, samples, codec)
    assert r["depth_front_mm"] < 0.9 * r["prior_depth_front_mm"], r
    assert r["depth_back_mm"] < 0.9 * r["prior_depth_back_mm"], r
    # codes: the shipped run (325 steps on a shared machine) keeps the prior's codes (it does not beat them yet);
    # assert that it does not degrade them by more than 2%
    assert r["codes_l1"] < 1.02 * r["prior_codes_l1"], r
    assert r["weights_l1"] < 1.02 * r["prior_weights_l1"], r
    # and through predict_views on larger renders (crop + resample + paste back)
    big = generate_samples(anny_body, codec, dataclasses.replace(held, size=256, views_per_subject=2))
    priors = [DepthLayers(big.prior_mask[i], big.prior_depth[i, 0], big.prior_depth[i, 1],
                          big.prior_codes[i, ..., :3].float(), big.prior_codes[i, ..., 3:].float()) for i in range(2)]
    preds = predict_views(model, big.images.float() / 255, big.masks, priors)
    base = fill_from_prior(big.prior_depth, big.prior_mask, big.masks)
    m = big.masks
    err = torch.stack([p.depth_front for p in preds])[m] - big.target_depth[:, 0][m]
    err_prior = base[:, 0][m] - big.target_depth[:, 0][m]
    assert err.abs().mean() < 0.95 * err_prior.abs().mean(), (err.abs().mean(), err_prior.abs().mean())

"""THuman2.0-layout scans: loading (OBJ + texture + fit), the restricted unpickler, skinning-weight transfer, scan
samples against the depth-layer renderer, the SMPL key mapping against smplx's own forward, and clear errors."""

import io
import pickle

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from avatar.predict.samples import SampleConfig
from avatar.predict.scans import (
    NumpyOnlyUnpickler,
    fitted_body_vertices,
    load_fit_params,
    load_thuman2,
    mix_samples,
    params_to_pose,
    scan_samples,
)
from avatar.predict.views import render_depth_layers
from avatar.types import BodyPose

SID = "0007"


@pytest.fixture(scope="module")
def codec():
    from avatar.predict.skin_codes import load_skin_codec

    return load_skin_codec()


def _fit(body):
    rng = np.random.default_rng(5)
    return {
        "rotations": rng.normal(0.0, 0.15, size=(body.num_bones, 3)),
        "phenotype": rng.uniform(0.3, 0.7, size=body.shape_dim),
        "transl": np.array([0.02, -0.01, 0.03]),
        "scale": np.array([1.07]),
        "translation": np.array([0.1, -0.2, 0.3]),
    }


@pytest.fixture(scope="module")
def thuman_root(tmp_path_factory, anny_body):
    """A THuman2.0-layout folder whose scan is the fitted anny body itself (scaled and translated), textured."""
    root = tmp_path_factory.mktemp("thuman")
    fit = _fit(anny_body)
    pose, shape, scale, translation = params_to_pose(anny_body, fit)
    verts = fitted_body_vertices(anny_body, pose, shape, scale, translation).numpy()
    faces = anny_body.faces.numpy()
    uv = np.zeros((len(verts), 2))
    uv[faces.reshape(-1)] = anny_body.uvs.numpy()[anny_body.face_uvs.numpy().reshape(-1)]  # one uv per vertex
    blocks = np.random.default_rng(3).integers(0, 256, size=(4, 4, 3))
    image = np.kron(blocks, np.ones((16, 16, 1))).astype(np.uint8)  # 64 x 64, 16-texel blocks (JPEG-friendly)
    mesh = trimesh.Trimesh(verts, faces, process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(image)))
    text, files = trimesh.exchange.obj.export_obj(mesh, return_texture=True, mtl_name="material0.mtl")
    folder = root / "data" / SID
    folder.mkdir(parents=True)
    (folder / f"{SID}.obj").write_text(text)
    png_name = next(n for n in files if n.endswith(".png"))
    (folder / "material0.mtl").write_bytes(files["material0.mtl"].replace(png_name.encode(), b"material0.jpeg"))
    Image.fromarray(image).save(folder / "material0.jpeg", quality=100, subsampling=0)
    (root / "anny" / SID).mkdir(parents=True)
    with open(root / "anny" / SID / "anny_param.pkl", "wb") as f:
        pickle.dump(fit, f)
    return root, verts, faces, uv, image, fit


@pytest.fixture(scope="module")
def scan(thuman_root, anny_body):
    return load_thuman2(thuman_root[0], SID, anny_body)


def test_loaded_scan_matches_what_was_written(scan, thuman_root, anny_body):
    _, verts, faces, uv, image, fit = thuman_root
    assert scan.name == SID
    np.testing.assert_allclose(scan.vertices.numpy(), verts, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(scan.faces.numpy(), faces)
    np.testing.assert_allclose(scan.uvs.numpy(), np.stack([uv[:, 0], 1 - uv[:, 1]], -1), atol=1e-6)  # glTF v
    assert scan.texture.shape == (64, 64, 3) and scan.colors is None
    assert np.abs(scan.texture.numpy().astype(float) - image).mean() < 1.0  # JPEG, quality 100, no chroma subsampling
    np.testing.assert_allclose(scan.pose.rotations.numpy(), fit["rotations"], atol=1e-6)
    np.testing.assert_allclose(scan.pose.translation.numpy(), fit["transl"], atol=1e-7)
    np.testing.assert_allclose(scan.shape.numpy(), fit["phenotype"], atol=1e-6)
    assert scan.scale == pytest.approx(1.07)
    np.testing.assert_allclose(scan.translation.numpy(), fit["translation"], atol=1e-7)
    # scale then translate (THuman's rule): the fitted body lands on the scan
    np.testing.assert_allclose(scan.body_vertices.numpy(), verts, atol=1e-6)
    out = anny_body(scan.pose, scan.shape).vertices[0]
    np.testing.assert_allclose(scan.body_vertices.numpy(), (out * 1.07 + scan.translation).numpy(), atol=1e-6)


def test_skin_weights_equal_the_body_weights_on_the_body_surface(scan, anny_body):
    dense = anny_body.dense_skin_weights().float()
    err = (scan.skin_weights - dense).abs().max().item()
    assert err < 1e-4
    torch.testing.assert_close(scan.skin_weights.sum(1), torch.ones(len(dense)), atol=1e-5, rtol=0)
    from avatar.predict.scans import transfer_skin_weights

    chunked = transfer_skin_weights(scan.vertices, scan.body_vertices, anny_body.faces, dense, chunk=3000)
    assert torch.equal(chunked, scan.skin_weights)


def test_skin_weights_of_offset_points_blend_the_nearest_face(anny_body):
    from avatar.predict.scans import transfer_skin_weights

    verts = anny_body.rest().vertices[0].float()
    faces = anny_body.faces
    dense = anny_body.dense_skin_weights().float()
    tri = verts[faces[[100, 5000]]]  # [2, 3, 3]
    bary = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    pts = (bary[..., None] * tri).sum(1) + 0.002 * n / n.norm(dim=-1, keepdim=True)  # 2 mm off the surface
    w = transfer_skin_weights(pts, verts, faces, dense)
    ref = (bary[..., None] * dense[faces[[100, 5000]]]).sum(1)
    assert (w - ref).abs().max().item() < 1e-3


def test_scan_samples_targets_are_the_scan_depth_layers(scan, anny_body, codec):
    cfg = SampleConfig(seed=0, size=48, views_per_subject=2, prior_pose_noise=0.0)
    s = scan_samples([scan, scan], anny_body, codec, cfg, seed=4)
    assert len(s) == 4 and s.images.shape == (4, 48, 48, 3) and s.subject.tolist() == [0, 0, 1, 1]
    codes = codec.encode(scan.skin_weights).float()
    for n in range(len(s)):
        ref = render_depth_layers(scan.vertices, scan.faces, s.viewmats[n], s.Ks[n], 48, 48, vertex_attrs=codes)
        assert torch.equal(s.masks[n], ref.mask) and ref.mask.sum() > 100
        assert torch.equal(s.target_depth[n, 0], ref.depth_front.float())
        assert torch.equal(s.target_depth[n, 1], ref.depth_back.float())
        torch.testing.assert_close(s.target_codes[n, ..., :3].float(), ref.attrs_front.half().float(), atol=0, rtol=0)
        # the scan is the fitted body here: the exact prior equals the target (codes to fp16 and transfer error)
        assert torch.equal(s.prior_mask[n], s.masks[n])
        assert (s.prior_depth[n] - s.target_depth[n]).abs().max().item() < 1e-5
        assert (s.prior_codes[n].float() - s.target_codes[n].float()).abs().max().item() < 5e-3
        # the image shows the texture inside the mask: every pixel there has one of the 16 block colours (shaded)
        assert s.images[n][s.masks[n]].float().std() > 5.0
    # seeded: the same call gives the same samples
    again = scan_samples([scan, scan], anny_body, codec, cfg, seed=4)
    assert torch.equal(again.images, s.images) and torch.equal(again.viewmats, s.viewmats)


def test_mix_samples_shifts_subject_ids(scan, anny_body, codec):
    cfg = SampleConfig(seed=0, size=32, views_per_subject=2)
    a = scan_samples([scan], anny_body, codec, cfg, seed=1)
    b = scan_samples([scan], anny_body, codec, cfg, seed=2)
    mixed = mix_samples(a, b)
    assert len(mixed) == 4 and mixed.subject.tolist() == [0, 0, 1, 1]
    assert torch.equal(mixed.target_depth[2:], b.target_depth)
    c = scan_samples([scan], anny_body, codec, SampleConfig(size=40, views_per_subject=1), seed=1)
    with pytest.raises(ValueError, match="image sizes differ"):
        mix_samples(a, c)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "smplx_param.pkl"
    bad.write_bytes(pickle.dumps({"betas": np.zeros(10), "x": _Evil()}))
    with pytest.raises(ValueError, match=r"smplx_param\.pkl.*refusing to load the global (os|posix)\.system"):
        load_fit_params(bad)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # plain numpy data (arrays, numpy scalars, nested) is fine, as is protocol 2 (Python 2 era files)
    good = {"a": np.arange(6.0).reshape(2, 3), "s": np.float32(1.5), "i": 3}
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        out = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(good, protocol=proto))).load()
        np.testing.assert_array_equal(out["a"], good["a"])
        assert float(out["s"]) == 1.5 and out["i"] == 3


def test_missing_files_and_bad_keys_name_the_file(tmp_path, thuman_root, anny_body):
    root = thuman_root[0]
    with pytest.raises(FileNotFoundError, match=r"data/9999/9999\.obj"):
        load_thuman2(root, "9999", anny_body)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pkl"):
        load_thuman2(root, SID, anny_body, param_path=tmp_path / "nowhere.pkl")
    fit = _fit(anny_body)
    del fit["rotations"]
    p = tmp_path / "no_rot.pkl"
    p.write_bytes(pickle.dumps(fit))
    with pytest.raises(ValueError, match=r"no_rot\.pkl: missing key 'rotations'"):
        load_thuman2(root, SID, anny_body, param_path=p)
    fit = _fit(anny_body)
    fit["phenotype"] = np.zeros(4)
    p.write_bytes(pickle.dumps(fit))
    with pytest.raises(ValueError, match=r"no_rot\.pkl: 'phenotype' must have 6 values, got 4"):
        load_thuman2(root, SID, anny_body, param_path=p)
    fit["phenotype"], fit["scale"] = np.full(6, 0.5), np.array([-1.0])
    p.write_bytes(pickle.dumps(fit))
    with pytest.raises(ValueError, match=r"no_rot\.pkl: 'scale' must be positive"):
        load_thuman2(root, SID, anny_body, param_path=p)
    p.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"no_rot\.pkl: not a readable pickle"):
        load_fit_params(p)
    broken = tmp_path / "data" / "0001"
    broken.mkdir(parents=True)
    (broken / "0001.obj").write_text("this is not an obj\n")
    with pytest.raises(ValueError, match=r"0001\.obj"):
        load_thuman2(tmp_path, "0001", anny_body, param_path=root / "anny" / SID / "anny_param.pkl")


def test_smpl_keys_follow_smplx_scaled_then_translated(fake_smpl_file):
    from avatar.body import SMPLBody

    smpl = SMPLBody(fake_smpl_file.parent.parent, model_type="smpl")
    rng = np.random.default_rng(2)
    params = {"global_orient": rng.normal(0, 0.3, size=(1, 3)), "body_pose": rng.normal(0, 0.3, size=(1, 69)),
              "betas": rng.normal(size=(1, 10)), "transl": rng.normal(size=(1, 3)),
              "scale": np.array([0.93]), "translation": rng.normal(size=(1, 3))}
    pose, shape, scale, translation = params_to_pose(smpl, params, "fit.pkl")
    ours = fitted_body_vertices(smpl, pose, shape, scale, translation)
    ref = smpl.smplx_forward_vertices(BodyPose(torch.from_numpy(np.concatenate(
        [params["global_orient"], params["body_pose"]], 1).reshape(24, 3)).float(),
        torch.from_numpy(params["transl"][0]).float()), torch.from_numpy(params["betas"][0]).float())[0]
    ref = ref * 0.93 + torch.from_numpy(params["translation"][0]).float()
    assert (ours - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match=r"fit\.pkl: 'body_pose' must have 69 values, got 63"):
        params_to_pose(smpl, dict(params, body_pose=np.zeros(63)), "fit.pkl")


def test_smplx_keys_layout_and_pca_hands():
    """SMPL-X key layout on a stand-in with the attributes the mapping reads (no licensed model here): joints
    0 global, 1-21 body, 22 jaw, 23-24 eyes, 25-39 left hand, 40-54 right hand; PCA hands expand with the model's
    components and get its hand mean added (smplx's flat_hand_mean=False)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(9)
    comps_l, comps_r = rng.normal(size=(6, 45)), rng.normal(size=(6, 45))
    mean_l, mean_r = rng.normal(size=45), rng.normal(size=45)
    smpl = SimpleNamespace(np_left_hand_components=comps_l, np_right_hand_components=comps_r,
                           left_hand_mean=torch.from_numpy(mean_l), right_hand_mean=torch.from_numpy(mean_r))
    body = SimpleNamespace(name="smplx", shape_dim=10, num_bones=55, dtype=torch.float64, _smpl=smpl)
    p = {"global_orient": rng.normal(size=3), "body_pose": rng.normal(size=63), "jaw_pose": rng.normal(size=3),
         "leye_pose": rng.normal(size=3), "reye_pose": rng.normal(size=3), "left_hand_pose": rng.normal(size=(1, 4)),
         "right_hand_pose": rng.normal(size=45), "betas": rng.normal(size=(1, 16)), "expression": rng.normal(size=10),
         "scale": np.array(0.9), "translation": rng.normal(size=3)}
    pose, shape, scale, translation = params_to_pose(body, p, "smplx_param.pkl")
    r = pose.rotations.numpy()
    assert r.shape == (55, 3) and shape.shape == (10,) and scale == pytest.approx(0.9)
    np.testing.assert_allclose(r[0], p["global_orient"])
    np.testing.assert_allclose(r[1:22].reshape(-1), p["body_pose"])
    np.testing.assert_allclose(r[22], p["jaw_pose"])
    np.testing.assert_allclose(r[23:25].reshape(-1), np.concatenate([p["leye_pose"], p["reye_pose"]]))
    np.testing.assert_allclose(r[25:40].reshape(-1), p["left_hand_pose"][0] @ comps_l[:4] + mean_l)
    np.testing.assert_allclose(r[40:55].reshape(-1), p["right_hand_pose"] + mean_r)
    np.testing.assert_allclose(shape.numpy(), p["betas"][0, :10])
    np.testing.assert_allclose(translation.numpy(), p["translation"])
    assert pose.translation.abs().max() == 0  # no 'transl' key: zero
    with pytest.raises(ValueError, match=r"smplx_param\.pkl: 'left_hand_pose' has 12 PCA coefficients .* 6 hand components"):
        params_to_pose(body, dict(p, left_hand_pose=np.zeros(12)), "smplx_param.pkl")


def test_y_up_scans_keep_viewmats_in_the_scan_frame(tmp_path, fake_smpl_file):
    """SMPL bodies are y up: the orbit runs about y, and the stored viewmats map the scan's own frame to the
    camera, so re-rendering the unrotated scan with them gives the targets."""
    from avatar.body import SMPLBody
    from avatar.predict.scans import ScanSubject
    from avatar.predict.skin_codes import SkinCodec

    smpl = SMPLBody(fake_smpl_file.parent.parent, model_type="smpl")
    pose = BodyPose.zeros(24)
    verts = fitted_body_vertices(smpl, pose, smpl.default_shape(), 1.0, torch.zeros(3))
    w = smpl.dense_skin_weights().float()
    scan = ScanSubject("y", verts, smpl.faces, None, None, None, pose, smpl.default_shape(), 1.0, torch.zeros(3),
                       verts, w)
    torch.manual_seed(0)
    codec = SkinCodec(24)
    s = scan_samples([scan], smpl, codec, SampleConfig(size=32, views_per_subject=2, elevation_degrees=(0.0, 0.0)), seed=3)
    for n in range(2):
        ref = render_depth_layers(verts, smpl.faces, s.viewmats[n], s.Ks[n], 32, 32)
        assert (s.masks[n] != ref.mask).sum() <= 2 and ref.mask.sum() > 50
        both = s.masks[n] & ref.mask
        assert (s.target_depth[n, 0][both] - ref.depth_front[both]).abs().max() < 1e-4
        # elevation 0: the camera centre lies at the scan's mid height along y (the up axis)
        R, t = s.viewmats[n, :3, :3].double(), s.viewmats[n, :3, 3].double()
        centre = -R.T @ t
        mid = (verts.min(0).values + verts.max(0).values) / 2
        assert abs(float(centre[1]) - float(mid[1])) < 1e-4


def test_thuman_scan_samples_and_the_training_sets_of_the_cli(thuman_root, anny_body, codec, monkeypatch):
    import shutil

    from avatar.predict.scans import thuman_ids, thuman_scan_samples
    from avatar.predict.train import PredictorTrainConfig
    from tools.train_predictor import TrainPredictorArgs, scan_training_sets

    root = thuman_root[0]
    assert thuman_ids(root) == [SID]
    small = SampleConfig(seed=0, size=32, views_per_subject=2, num_subjects=1, texture_size=32, motion_frames=4)
    s = thuman_scan_samples(root, anny_body, codec, small, seed=3)
    ref = scan_samples([load_thuman2(root, SID, anny_body)], anny_body, codec, small, seed=3)
    assert torch.equal(s.target_depth, ref.target_depth) and s.subject.tolist() == [0, 0]

    # anny fits: the scans join the synthetic training views; validation stays synthetic
    cfg = PredictorTrainConfig(train=small, val=SampleConfig(seed=9, size=32, views_per_subject=1, num_subjects=1,
                                                             texture_size=32, motion_frames=4))
    args = TrainPredictorArgs(thuman_root=root, thuman_body="anny")
    train, val = scan_training_sets(args, cfg, codec, None, "")
    assert len(train) == 4 and train.subject.tolist() == [0, 0, 1, 1] and len(val) == 1
    assert torch.equal(train.target_depth[2:], thuman_scan_samples(root, anny_body, codec, small).target_depth)

    # SMPL-like fits alone need two scans (the last is held out): one scan is a clear error
    from types import SimpleNamespace

    other_rig = SimpleNamespace(name="smplx", num_bones=anny_body.num_bones)
    monkeypatch.setattr("avatar.body.load_body_model", lambda name, path=None: other_rig)
    with pytest.raises(ValueError, match="at least 2 scans"):
        scan_training_sets(TrainPredictorArgs(thuman_root=root, thuman_body="smplx"), cfg, codec, None, "")

    # a codec of another rig is refused before anything is rendered
    other = type("Codec", (), {"num_bones": 55})()
    with pytest.raises(ValueError, match="codec has 55 bones"):
        thuman_scan_samples(root, anny_body, other, small)
    empty = root.parent / "empty_thuman"
    (empty / "data").mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError, match="no scans"):
        thuman_ids(empty)
    shutil.rmtree(empty)

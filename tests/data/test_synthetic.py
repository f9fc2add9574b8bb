"""Synthetic subjects: clothing, texture, motion, rendering, the ZJU / PeopleSnapshot writers, distortion, atomicity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from avatar.data import synthetic as syn
from avatar.data.params import easymocap_to_pose
from avatar.data.synthetic import SyntheticConfig, make_subject, render_frame
from avatar.data.writers import write_peoplesnapshot, write_zju
from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.render.mesh import rasterize
from avatar.skinning.lbs import lbs_points
from avatar.types import BodyPose

SMALL = dict(num_frames=3, width=64, height=64, texture_size=128)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def zju_subject(anny_body):
    cfg = SyntheticConfig(seed=3, motion="free", rig="ring23", cameras=(0, 11), **SMALL)
    return make_subject(cfg, anny_body)


def test_phenotype_range_and_seed():
    a, b = syn.sample_phenotype(0), syn.sample_phenotype(1)
    assert a.shape == (6,) and bool(((a >= 0) & (a <= 1)).all())
    assert torch.equal(a, syn.sample_phenotype(0)) and not torch.equal(a, b)


@pytest.mark.parametrize("kind", ["shirt_trousers", "shirt_skirt"])
def test_clothing_offsets(anny_body, kind):
    rest = anny_body.rest()
    off = syn.clothing_offsets(anny_body, rest.vertices[0], rest.bone_heads[0], kind, seed=0)
    nz = off[off != 0]
    assert nz.numel() > 1000
    assert float(nz.min()) >= 0.01 - 1e-6 and float(nz.max()) <= 0.05 + 1e-6
    W = anny_body.dense_skin_weights()
    for bone in ("head", "wrist.L", "foot.R"):
        assert float(off[W[:, anny_body.bone_index(bone)] > 0.5].abs().max()) == 0.0
    clothed = syn.clothe(rest.vertices[0], anny_body.faces, off)
    moved = (clothed - rest.vertices[0]).norm(dim=-1)
    assert torch.allclose(moved, off, atol=1e-6)
    if kind == "shirt_skirt":  # grows towards the hem
        z = rest.vertices[0, :, 2]
        _, lower = syn.garment_masks(anny_body, kind)
        sk = lower & (off > 0)
        zs = z[sk]
        hi = off[sk][zs > zs.quantile(0.8)].mean()
        lo = off[sk][zs < zs.quantile(0.2)].mean()
        assert float(lo) > float(hi) + 0.01


def test_texture_high_frequency_and_deterministic(anny_body):
    rest = anny_body.rest()
    off = syn.clothing_offsets(anny_body, rest.vertices[0], rest.bone_heads[0], "shirt_trousers", 0)
    t0 = syn.paint_texture(anny_body, rest.vertices[0], rest.bone_heads[0], off, "shirt_trousers", 0, size=256)
    t0b = syn.paint_texture(anny_body, rest.vertices[0], rest.bone_heads[0], off, "shirt_trousers", 0, size=256)
    t1 = syn.paint_texture(anny_body, rest.vertices[0], rest.bone_heads[0], off, "shirt_trousers", 1, size=256)
    assert t0.shape == (256, 256, 3) and float(t0.min()) >= 0 and float(t0.max()) <= 1
    assert torch.equal(t0, t0b) and float((t0 - t1).abs().mean()) > 0.02
    g = (t0[1:, :-1] - t0[:-1, :-1]).abs().sum(-1) + (t0[:-1, 1:] - t0[:-1, :-1]).abs().sum(-1)
    painted = t0[:-1, :-1].sum(-1) > 0
    assert float(g[painted].mean()) > 0.05  # stripes, weave, hair strands, noise


@pytest.mark.parametrize("motion", ["turn", "free"])
def test_motion_smooth(anny_body, motion):
    rest = anny_body.rest()
    N = 60
    pose = syn.make_motion(anny_body, rest.bone_heads[0], motion, N, seed=0)
    assert pose.rotations.shape == (N, anny_body.num_bones, 3) and pose.translation.shape == (N, 3)
    R = axis_angle_to_matrix(pose.rotations.double())
    rel = R[1:] @ R[:-1].transpose(-1, -2)
    angle = torch.arccos(((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))  # [N-1, J]
    assert float(angle.max()) < 0.2
    assert float((pose.translation[1:] - pose.translation[:-1]).norm(dim=-1).max()) < 0.02
    if motion == "turn":
        total = float(angle[:, 0].sum()) + 2 * math.pi / N  # last frame back to the first closes the circle
        assert abs(total - 2 * math.pi) < 1e-3
        assert float(pose.rotations[:, 0, :2].abs().max()) == 0.0  # about the vertical (z) axis
    else:
        assert float(pose.rotations[:, anny_body.bone_index("lowerleg01.L")].norm(dim=-1).max()) > 0.3


def test_render_mask_matches_gt_silhouette(anny_body, zju_subject):
    s = zju_subject
    frame = render_frame(s, anny_body, 1)
    assert frame.images.shape == (2, 64, 64, 3) and frame.masks.shape == (2, 64, 64)
    frags = rasterize(frame.vertices, s.faces, s.cameras.viewmats, s.cameras.Ks, 64, 64)
    for c in range(2):
        m = frame.masks[c].numpy()
        assert m.sum() > 100
        assert _iou(m, frags.mask[c].numpy()) >= 0.98


def test_zju_round_trip(anny_body, zju_subject, tmp_path):
    import trimesh

    s = zju_subject
    folder = write_zju(s, anny_body, tmp_path, "CoreView_900", progress=False)
    annots = np.load(folder / "annots.npy", allow_pickle=True).item()
    cams = annots["cams"]
    assert set(cams) >= {"K", "D", "R", "T"} and len(cams["K"]) == 2
    assert cams["K"][0].shape == (3, 3) and cams["D"][0].shape == (5, 1)
    assert cams["R"][0].shape == (3, 3) and cams["T"][0].shape == (3, 1)
    # T in millimetres: cameras about 3 m from the subject
    centre = s.canonical_vertices.mean(0).double().numpy()
    for c in range(2):
        x_cam = cams["R"][c] @ centre + cams["T"][c][:, 0] / 1000.0
        assert 2.5 < x_cam[2] < 3.5 and np.linalg.norm(cams["T"][c]) > 1000
    assert len(annots["ims"]) == 3 and annots["ims"][0]["ims"] == ["Camera_B1/000000.jpg", "Camera_B2/000000.jpg"]
    for entry in annots["ims"]:
        for rel in entry["ims"]:
            assert (folder / rel).is_file()
            assert (folder / "mask" / rel.replace(".jpg", ".png")).is_file()
    assert json.loads((folder / "body_model.json").read_text())["body_model"] == "anny"
    assert (folder / "texture.png").is_file() and json.loads((folder / "synthetic.json").read_text())["config"]["seed"] == 3
    mesh = trimesh.load(folder / "canonical_mesh.ply", process=False)
    canon = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    assert canon.shape == (anny_body.num_vertices, 3)
    for f in range(3):
        p = np.load(folder / "params" / f"{f}.npy", allow_pickle=True).item()
        assert p["poses"].shape == (1, 3 * anny_body.num_bones) and p["Rh"].shape == (1, 3)
        assert p["Th"].shape == (1, 3) and p["shapes"].shape == (1, 6) and not p["poses"][0, :3].any()
        shape = torch.from_numpy(p["shapes"])
        root_head = anny_body.rest(shape).bone_heads[0, 0]
        pose = easymocap_to_pose(*(torch.from_numpy(p[k]) for k in ("poses", "Rh", "Th")), root_head)
        out = anny_body(pose, shape)
        posed = lbs_points(canon, anny_body.skin_weights, out.bone_transforms[0], anny_body.skin_indices)
        gt = torch.from_numpy(np.load(folder / "vertices" / f"{f}.npy"))
        assert gt.shape == (anny_body.num_vertices, 3) and gt.dtype == torch.float32
        assert float((posed - gt).abs().max()) < 1e-4
        # the written mask is the silhouette of the ground-truth mesh
        K = torch.from_numpy(cams["K"][1]).float()[None]
        V = torch.eye(4)[None]
        V[0, :3, :3] = torch.from_numpy(cams["R"][1]).float()
        V[0, :3, 3] = torch.from_numpy(cams["T"][1][:, 0] / 1000).float()
        sil = rasterize(gt, s.faces, V, K, 64, 64).mask[0].numpy()
        mask = np.asarray(Image.open(folder / "mask" / "Camera_B2" / f"{f:06d}.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert _iou(mask, sil) >= 0.98


def test_peoplesnapshot_layout(anny_body, tmp_path):
    cfg = SyntheticConfig(seed=5, motion="turn", clothing="shirt_skirt", **SMALL)
    s = make_subject(cfg, anny_body)
    folder = write_peoplesnapshot(s, anny_body, tmp_path, "female-9-casual", progress=False)
    cams = np.load(folder / "cameras.npz")
    assert cams["intrinsic"].shape == (3, 3) and cams["extrinsic"].shape == (4, 4)
    assert int(cams["height"]) == 64 and int(cams["width"]) == 64 and "dist_coeffs" not in cams
    poses = np.load(folder / "poses.npz")
    J = anny_body.num_bones
    assert poses["betas"].shape == (1, 6) and poses["global_orient"].shape == (3, 3)
    assert poses["body_pose"].shape == (3, 3 * (J - 1)) and poses["transl"].shape == (3, 3)
    assert (folder / "female-9-casual.mp4").stat().st_size > 0
    import trimesh

    canon = torch.as_tensor(np.asarray(trimesh.load(folder / "canonical_mesh.ply", process=False).vertices), dtype=torch.float32)
    shape = torch.from_numpy(poses["betas"])
    for i in range(3):
        img = np.asarray(Image.open(folder / "images" / f"image_{i:04d}.png"))
        mask = np.load(folder / "masks" / f"mask_{i:04d}.npy")
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == np.uint8 and mask.sum() > 50
        rot = torch.cat([torch.from_numpy(poses["global_orient"][i]), torch.from_numpy(poses["body_pose"][i])]).view(J, 3)
        out = anny_body(BodyPose(rot, torch.from_numpy(poses["transl"][i])), shape)
        posed = lbs_points(canon, anny_body.skin_weights, out.bone_transforms[0], anny_body.skin_indices)
        gt = torch.from_numpy(np.load(folder / "vertices" / f"{i:04d}.npy"))
        assert float((posed - gt).abs().max()) < 1e-4
        sil = rasterize(gt, s.faces, torch.from_numpy(cams["extrinsic"])[None], torch.from_numpy(cams["intrinsic"])[None], 64, 64)
        assert _iou(mask, sil.mask[0].numpy()) >= 0.98
    with pytest.raises(ValueError, match="monocular"):
        write_peoplesnapshot(make_subject(SyntheticConfig(rig="ring23", cameras=(0, 1), **SMALL), anny_body),
                             anny_body, tmp_path, "two", progress=False)


def test_distortion_round_trip(anny_body):
    base = dict(seed=2, motion="turn", num_frames=1, width=128, height=128, texture_size=128)
    plain = make_subject(SyntheticConfig(**base), anny_body)
    dist = make_subject(SyntheticConfig(distortion=(-0.6, 0.2, 0.002, -0.002, 0.0), **base), anny_body)
    f0, f1 = render_frame(plain, anny_body, 0), render_frame(dist, anny_body, 0)
    before = _iou(f0.masks[0].numpy(), f1.masks[0].numpy())
    assert before < 0.97  # distortion changes the image
    assert float((f0.images - f1.images).abs().mean()) > 1e-3
    und = syn.undistort_images(f1.masks[..., None], dist.cameras.Ks, dist.distortion)[..., 0] > 0.5
    after = _iou(und[0].numpy(), f0.masks[0].numpy())
    assert after >= 0.97 and after > before


def test_deterministic(anny_body, tmp_path):
    cfg = SyntheticConfig(seed=7, motion="free", rig="ring23", cameras=(3,), num_frames=2, width=48, height=48, texture_size=64)
    a = write_zju(make_subject(cfg, anny_body), anny_body, tmp_path / "a", "S", progress=False)
    b = write_zju(make_subject(cfg, anny_body), anny_body, tmp_path / "b", "S", progress=False)
    for rel in ("params/0.npy", "params/1.npy", "mask/Camera_B1/000001.png", "vertices/1.npy", "texture.png", "Camera_B1/000000.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_atomic_on_failure(anny_body, tmp_path, monkeypatch):
    cfg = SyntheticConfig(num_frames=3, width=32, height=32, texture_size=64)
    s = make_subject(cfg, anny_body)
    import avatar.data.writers as writers

    calls = []

    def failing(subject, body, i):
        calls.append(i)
        if i == 1:
            raise RuntimeError("injected")
        return render_frame(subject, body, i)

    monkeypatch.setattr(writers, "render_frame", failing)
    with pytest.raises(RuntimeError, match="injected"):
        write_peoplesnapshot(s, anny_body, tmp_path, "subj", progress=False)
    assert calls == [0, 1] and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_peoplesnapshot(s, anny_body, tmp_path, "subj", progress=False)
    with pytest.raises(FileExistsError):
        write_peoplesnapshot(s, anny_body, tmp_path, "subj", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["subj"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(motion="dance"), "motion"),
        (dict(num_frames=0), "num_frames"),
        (dict(rig="mono", cameras=(1,)), "cameras"),
        (dict(rig="ring23", cameras=(23,)), "cameras"),
        (dict(distortion=(0.1, 0.0)), "distortion"),
        (dict(clothing="dress"), "clothing"),
        (dict(width=4), "width"),
    ],
)
def test_bad_config(anny_body, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_subject(SyntheticConfig(**kwargs), anny_body)

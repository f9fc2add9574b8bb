"""Round trip of the data issue: generate a synthetic subject in each layout, load it with the dataset type, and
check that the loaded cameras, masks and poses agree with the ground truth that was generated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from avatar.data import AvatarDataset, SyntheticConfig, make_subject, write_peoplesnapshot, write_zju
from avatar.render.mesh import rasterize
from avatar.skinning import lbs_points

SMALL = dict(num_frames=3, width=96, height=96, texture_size=128)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum().clamp_min(1))


def check_round_trip(folder, dataset, body, gt_vertices_of, min_iou):
    faces = torch.from_numpy(np.asarray(trimesh.load(folder / "canonical_mesh.ply", process=False).faces)).long()
    canonical = torch.from_numpy(np.asarray(trimesh.load(folder / "canonical_mesh.ply", process=False).vertices)).float()
    assert len(dataset) > 0
    ious = []
    for i in range(len(dataset)):
        fr = dataset[i]
        gt = torch.from_numpy(np.load(gt_vertices_of(fr.frame_id))).float()
        # the loaded pose re-skins the clothed canonical mesh onto the ground-truth posed mesh
        out = body(fr.pose, fr.shape)
        posed = lbs_points(canonical, body.skin_weights, out.bone_transforms[0], body.skin_indices)
        assert (posed - gt).abs().max() < 1e-3
        # the ground-truth mesh seen by the loaded (undistorted) camera covers the loaded mask
        frag = rasterize(gt, faces, fr.camera.viewmats[None], fr.camera.Ks[None], fr.camera.width, fr.camera.height)
        assert fr.mask.shape == (fr.camera.height, fr.camera.width) and fr.image.shape[:2] == fr.mask.shape
        ious.append(iou(frag.face_ids[0] >= 0, fr.mask > 0.5))
    assert min(ious) >= min_iou, ious
    return ious


@pytest.mark.parametrize("distortion", [None, (-0.15, 0.03, 0.001, -0.001, 0.0)])
def test_zju_layout_round_trip(tmp_path, anny_body, distortion):
    cfg = SyntheticConfig(seed=5, motion="free", rig="ring23", cameras=(0, 4, 13), distortion=distortion, **SMALL)
    folder = write_zju(make_subject(cfg, anny_body), anny_body, tmp_path, progress=False)
    ds = AvatarDataset(folder, resolution=None, body_model=anny_body)
    assert len(ds) == 3 * 3 and ds.body_model_name == "anny"
    check_round_trip(folder, ds, anny_body, lambda f: folder / "vertices" / f"{f}.npy",
                     0.98 if distortion is None else 0.97)


@pytest.mark.parametrize("distortion", [None, (-0.15, 0.03, 0.0, 0.0, 0.0)])
def test_peoplesnapshot_layout_round_trip(tmp_path, anny_body, distortion):
    cfg = SyntheticConfig(seed=6, motion="turn", rig="mono", cameras=(0,), distortion=distortion, **SMALL)
    folder = write_peoplesnapshot(make_subject(cfg, anny_body), anny_body, tmp_path, progress=False)
    ds = AvatarDataset(folder, resolution=None, body_model=anny_body)
    assert len(ds) == 3 and ds.body_model_name == "anny"
    check_round_trip(folder, ds, anny_body, lambda f: folder / "vertices" / f"{f:04d}.npy",
                     0.98 if distortion is None else 0.97)


def test_protocol_on_a_synthetic_subject(tmp_path, anny_body):
    cfg = SyntheticConfig(seed=7, motion="free", rig="ring23", cameras=tuple(range(23)), num_frames=6, width=32,
                          height=32, texture_size=64)
    folder = write_zju(make_subject(cfg, anny_body), anny_body, tmp_path, progress=False)
    train = AvatarDataset(folder, "zju_monocular", "train", fit="scale", body_model=anny_body)
    test = AvatarDataset(folder, "zju_monocular", "test", fit="scale", body_model=anny_body)
    assert set(train.cameras) == {4} and 4 not in set(test.cameras) and len(set(test.cameras)) == 22
    assert train[0].image.shape == (512, 512, 3)  # the protocol's resolution

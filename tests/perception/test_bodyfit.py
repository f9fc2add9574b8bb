"""avatar.perception.bodyfit: the fast kinematics against the body model, and fits to exact synthetic detections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from avatar.perception.bodyfit import DEFAULT_BONES, BodyFitConfig, Kinematics, fit_body, keypoint_basis, keypoints_from
from avatar.perception.landmarks import Detections
from avatar.types import BodyPose

FACING = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # body z-up, facing -y -> camera


@pytest.fixture(scope="module")
def body():
    from avatar.body import AnnyBody

    return AnnyBody()


def test_kinematics_match_body_model(body):
    g = torch.Generator().manual_seed(0)
    shape = torch.rand(body.shape_dim, generator=g)
    rot = 0.4 * torch.randn(3, body.num_bones, 3, generator=g)
    tr = torch.randn(3, 3, generator=g)
    out = body(BodyPose(rot, tr), shape.expand(3, -1))
    rest = body.rest(shape[None])
    kin = Kinematics(body, rest.bone_heads[0])
    G = kin.transforms(rot, tr)
    torch.testing.assert_close(G, out.bone_transforms[:, :, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(kin.joints(G), out.joints, atol=1e-5, rtol=0)
    kp = keypoints_from(G, keypoint_basis(body, rest.vertices[0]))
    torch.testing.assert_close(kp, body.keypoints(out.vertices), atol=1e-5, rtol=0)
    # only some bones rotate: the reduced tree gives the same transforms
    active = tuple(body.bone_index(n) for n in DEFAULT_BONES)
    keep = torch.zeros(body.num_bones)
    keep[list(active) + [0]] = 1
    rot2 = rot * keep[:, None]
    out2 = body(BodyPose(rot2, tr), shape.expand(3, -1))
    torch.testing.assert_close(Kinematics(body, rest.bone_heads[0], active).transforms(rot2, tr),
                               out2.bone_transforms[:, :, :3], atol=1e-5, rtol=0)


def _scene(body, F=8, seed=0, W=256, H=256):
    """Exact detections of a known motion seen by a camera at the origin (the body 3 m away, facing it)."""
    g = torch.Generator().manual_seed(seed)
    J = body.num_bones
    ids = [body.bone_index(n) for n in DEFAULT_BONES]
    rot = torch.zeros(F, J, 3)
    t = torch.linspace(0, 1, F)[:, None]
    base = 0.35 * torch.randn(len(ids), 3, generator=g)
    rot[:, ids] = base[None] * torch.sin(2 * math.pi * t)[..., None] + 0.1 * base[None]
    yaw = (0.4 * torch.sin(2 * math.pi * t[:, 0]))
    R = FACING @ axis_angle_to_matrix(torch.stack([torch.zeros(F), torch.zeros(F), yaw], -1))
    rot[:, 0] = matrix_to_axis_angle(R)
    shape = body.default_shape()
    rest = body.rest(shape[None])
    h0 = rest.bone_heads[0, 0]
    trans = torch.tensor([0.1, 0.1, 3.0]) - h0 + 0.05 * torch.randn(F, 3, generator=g)
    pose = BodyPose(rot, trans)
    out = body(pose, shape.expand(F, -1))
    kp3 = body.keypoints(out.vertices)
    K = torch.tensor([[400.0, 0, W / 2], [0, 400.0, H / 2], [0, 0, 1]])
    uv = kp3[..., :2] / kp3[..., 2:] * 400.0 + torch.tensor([W / 2, H / 2])
    conf = torch.ones(F, 23)
    conf[:, [19, 20]] = 0  # BlazePose has no small toes
    world = kp3 - kp3[:, [11, 12]].mean(1, keepdim=True)
    from avatar.render.mesh import soft_silhouette

    with torch.no_grad():
        masks = soft_silhouette(out.vertices, body.faces, torch.eye(4).expand(F, 4, 4), K.expand(F, 3, 3), W, H)
    det = Detections(uv.numpy().astype(np.float32), conf.numpy(), world.numpy().astype(np.float32),
                     (masks > 0.5).float().numpy(), np.ones(F, bool))
    return det, K, pose, out.joints


def _mpjpe(body, fit, joints):
    out = body(fit.pose, fit.shape.expand(fit.pose.rotations.shape[0], -1))
    ids = [body.bone_index(n) for n in ("upperleg01.L", "lowerleg01.L", "foot.L", "upperarm01.R", "lowerarm01.R",
                                        "wrist.R", "head")]
    a, b = out.joints[:, ids], joints[:, ids]
    return float((a - b).norm(dim=-1).mean()) * 1000


# exact 3D landmarks here (a perfect detector), and random rotations that do not respect the knee/elbow hinges
FAST = dict(iters_global=60, iters_pose=200, iters_refit=60, iters_shape=0, fit_shape=False, w_3d=0.1, w_hinge=0.0,
            w_pose_prior=0.002)


def test_fit_recovers_known_motion(body):
    det, K, pose, joints = _scene(body)
    ts = np.arange(det.num_frames) / 10.0
    fit = fit_body(body, det, K, 256, 256, ts, BodyFitConfig(**FAST), progress=False)
    init_err = _mpjpe(body, type(fit)(body.default_shape(), fit.init_pose, fit.error_px, fit.swapped), joints)
    err = _mpjpe(body, fit, joints)
    assert fit.error_px.mean() < 2.0  # pixels, exact detections
    assert err < 25.0, f"absolute joint error {err:.1f} mm (initialization {init_err:.1f} mm)"
    assert err < 0.5 * init_err
    assert not fit.swapped.any()
    assert fit.pose.rotations.shape == (det.num_frames, body.num_bones, 3)


def test_fit_undoes_left_right_swaps_and_ignores_missing_keypoints(body):
    det, K, pose, joints = _scene(body, seed=1)
    from avatar.perception.bodyfit import ARM_KEYPOINTS, LEG_KEYPOINTS, _swap_labels

    for f in (2, 5):  # BlazePose-style label swaps of the arms in two frames, of the legs in one
        det.keypoints[f] = _swap_labels(det.keypoints[f], ARM_KEYPOINTS)
        det.world[f] = _swap_labels(det.world[f], ARM_KEYPOINTS)
    det.keypoints[3] = _swap_labels(det.keypoints[3], LEG_KEYPOINTS)
    det.world[3] = _swap_labels(det.world[3], LEG_KEYPOINTS)
    det.confidence[4, [9, 10]] = 0.0  # wrists missed in one frame
    det.keypoints[4, [9, 10]] = 0.0
    fit = fit_body(body, det, K, 256, 256, np.arange(det.num_frames) / 10.0, BodyFitConfig(**FAST), progress=False)
    assert fit.swapped[[2, 5], 0].all() and fit.swapped[3, 1]
    assert fit.swapped.sum() == 3
    assert _mpjpe(body, fit, joints) < 50.0  # 100-200 mm in the swapped frames without the label check


def test_shape_and_silhouette_stage_runs(body):
    det, K, pose, joints = _scene(body, F=4, seed=2)
    cfg = BodyFitConfig(iters_global=40, iters_pose=80, iters_shape=10, silhouette_frames=2, silhouette_size=64)
    fit = fit_body(body, det, K, 256, 256, np.arange(4) / 10.0, cfg, progress=False)
    assert torch.isfinite(fit.shape).all() and ((fit.shape >= 0) & (fit.shape <= 1)).all()
    assert "shape + silhouette" in fit.seconds


def test_bad_input(body):
    det, K, _, _ = _scene(body, F=2)
    empty = det.subset(np.zeros(2, bool))
    with pytest.raises(ValueError, match="no frame with a detected person"):
        fit_body(body, empty, K, 256, 256, np.zeros(0), progress=False)
    with pytest.raises(ValueError, match="iters_pose"):
        fit_body(body, det, K, 256, 256, np.arange(2.0), BodyFitConfig(iters_pose=-1), progress=False)


def test_pose_velocity_term_damps_depth_drift(body):
    """A held pose seen with 2D noise: the robust velocity term keeps the fitted limbs from wandering frame to frame
    (the depth of a limb near the image plane is almost free in 2D); a negative weight is rejected."""
    det, K, pose, joints = _scene(body, F=8, seed=3)
    F = det.num_frames
    det.keypoints[:] = det.keypoints[:1]  # the first frame's pose held still (the root as well)
    det.world[:] = det.world[:1]
    det.masks[:] = det.masks[:1]
    rng = np.random.default_rng(0)
    det.keypoints += rng.normal(0.0, 1.5, det.keypoints.shape).astype(np.float32)
    ts = np.arange(F) / 25.0
    cfg = dict(iters_global=40, iters_pose=150, iters_refit=0, iters_shape=0, fit_shape=False, w_3d=0.0)
    spread = {}
    for w in (0.0, 0.2):
        fit = fit_body(body, det, K, 256, 256, ts, BodyFitConfig(**cfg, w_pose_velocity=w), progress=False)
        ids = [body.bone_index(n) for n in DEFAULT_BONES]
        spread[w] = float(fit.pose.rotations[:, ids].std(0).norm(dim=-1).mean())
    assert spread[0.2] < 0.7 * spread[0.0], spread
    with pytest.raises(ValueError, match="w_pose_velocity"):
        BodyFitConfig(w_pose_velocity=-1.0).validate()


def test_optional_world_landmark_pose_stage_runs(body):
    det, K, pose, joints = _scene(body, F=4, seed=4)
    cfg = BodyFitConfig(iters_global=20, iters_pose_3d=20, w_3d_init=1.0, iters_pose=20, iters_refit=0, iters_shape=0,
                        fit_shape=False)
    fit = fit_body(body, det, K, 256, 256, np.arange(4) / 10.0, cfg, progress=False)
    assert "pose from world landmarks" in fit.seconds and torch.isfinite(fit.pose.rotations).all()
    with pytest.raises(ValueError, match="iters_pose_3d"):
        BodyFitConfig(iters_pose_3d=-1).validate()

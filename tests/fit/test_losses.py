import math

import pytest
import torch

from avatar.fit.losses import (
    LossConfig,
    aiap_loss,
    l1_loss,
    mask_bbox,
    mask_loss,
    psnr,
    scale_loss,
    ssim,
    ssim_loss,
    total_loss,
)
from avatar.fit.pose_refine import PoseRefiner, apply_pose_delta, pose_prior
from avatar.geometry import axis_angle_to_matrix
from avatar.types import BodyPose


def test_l1_psnr_mask_values():
    a = torch.zeros(2, 8, 8, 3)
    b = torch.full((2, 8, 8, 3), 0.1)
    assert math.isclose(float(l1_loss(a, b)), 0.1, rel_tol=1e-6)
    assert math.isclose(float(psnr(a, b)), 20.0, rel_tol=1e-5)
    assert math.isclose(float(mask_loss(torch.zeros(8, 8), torch.full((8, 8), 0.5))), 0.25)
    with pytest.raises(ValueError, match="same shape"):
        l1_loss(a, b[0])
    with pytest.raises(ValueError, match=r"\[..., H, W, 3\]"):
        l1_loss(a[..., :2], b[..., :2])
    with pytest.raises(ValueError, match="alpha"):
        mask_loss(torch.zeros(8, 8), torch.zeros(8, 7))


def test_ssim_identical_and_different(gen):
    x = torch.rand(16, 16, 3, generator=gen)
    assert abs(float(ssim(x, x)) - 1.0) < 1e-5
    assert abs(float(ssim_loss(x, x))) < 1e-5
    assert float(ssim_loss(x, torch.rand(16, 16, 3, generator=gen))) > 0.5


def test_scale_loss():
    s = torch.tensor([[0.01, 0.01, 0.01], [0.05, 0.01, 0.01]])
    assert math.isclose(float(scale_loss(s, 0.02)), 0.015, rel_tol=1e-5)
    with pytest.raises(ValueError, match="scales must be"):
        scale_loss(s[:, :2], 0.02)


def test_aiap_rigid_is_zero_and_stretch_is_not(gen):
    x = torch.rand(50, 3, generator=gen)
    nb = torch.randint(0, 50, (50, 4), generator=gen)
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.5]))
    y = x @ R.T + torch.tensor([1.0, 2.0, 3.0])
    assert float(aiap_loss(x, y, nb)) < 1e-5
    assert float(aiap_loss(x, 2 * x, nb)) > 0.1
    # doubling the distances: |d - 2d| = d, the mean neighbour distance
    d = (x[:, None] - x[nb]).norm(dim=-1).mean()
    assert math.isclose(float(aiap_loss(x, 2 * x, nb)), float(d), rel_tol=1e-5)
    with pytest.raises(ValueError, match="neighbours must be"):
        aiap_loss(x, y, nb[:10])


def test_mask_bbox_and_total_loss():
    m = torch.zeros(20, 30)
    m[5:8, 10:15] = 1
    assert mask_bbox(m, margin=2) == (3, 10, 8, 17)
    assert mask_bbox(torch.zeros(4, 4)) == (0, 4, 0, 4)
    pred = torch.zeros(20, 30, 3)
    target = torch.zeros(20, 30, 3)
    target[5:8, 10:15] = 0.5
    cfg = LossConfig(ssim=0.0, aiap=0.0, scale=0.0, crop_to_mask=False)
    t = total_loss(cfg, pred, target, torch.zeros(20, 30), m, torch.zeros(3, 3))
    l1 = 0.5 * 15 / 600
    assert math.isclose(float(t.l1), l1, rel_tol=1e-5)
    assert math.isclose(float(t.mask), 15 / 600, rel_tol=1e-5)
    assert math.isclose(float(t.total), l1 + 0.1 * 15 / 600, rel_tol=1e-5)
    assert float(t.ssim) == 0.0


def test_pose_refiner_and_prior():
    ref = PoseRefiner([3, 1, 3, 7], num_bones=4)
    assert ref.rot_deltas.shape == (3, 4, 3) and ref.frame_ids.tolist() == [1, 3, 7]
    pose = BodyPose(torch.rand(4, 3), torch.rand(3))
    out = ref(pose, 7)
    torch.testing.assert_close(out.rotations, pose.rotations)
    assert float(ref.prior().detach()) == 0.0
    with torch.no_grad():
        ref.rot_deltas[2, 1] = torch.tensor([0.0, 0.3, 0.4])
        ref.trans_deltas[2] = torch.tensor([0.0, 0.0, 0.2])
    out = ref(pose, 7)
    torch.testing.assert_close(out.rotations[1], pose.rotations[1] + torch.tensor([0.0, 0.3, 0.4]))
    assert math.isclose(float(ref.prior(7).detach()), 0.25 / 4 + 0.04, rel_tol=1e-5)
    with pytest.raises(KeyError, match="frame 2"):
        ref(pose, 2)
    with pytest.raises(ValueError, match="deltas"):
        apply_pose_delta(pose, torch.zeros(3, 3), torch.zeros(3))
    assert float(pose_prior(torch.zeros(2, 4, 3), torch.ones(2, 3))) == 3.0

import math

import pytest
import torch

from avatar.geometry import intrinsics_from_fov, look_at
from avatar.represent.avatar import (
    GAUSSIAN_FIELDS,
    AvatarLR,
    GaussianAvatar,
    initial_colors,
    knn,
    sample_surface,
)
from avatar.skinning.weights import ResidualWeightField, residual_skin_weights, sinusoidal_encoding
from avatar.types import BodyPose, Cameras


@pytest.fixture(scope="module")
def body_avatar(anny_body):
    rest = anny_body.rest()
    g = torch.Generator().manual_seed(0)
    av = GaussianAvatar.from_surface(rest.vertices[0].float(), anny_body.faces, anny_body.dense_skin_weights().float(),
                                     300, g)
    return av


def test_init_counts_weights_scales_colors(anny_body, body_avatar):
    av = body_avatar
    assert av.num_gaussians == anny_body.num_vertices + 300
    c = av.canonical()
    torch.testing.assert_close(c.skin_weights.sum(-1), torch.ones(av.num_gaussians), atol=1e-5, rtol=0)
    assert float(c.skin_weights.detach().min()) >= 0
    assert ((c.colors - 0.5).abs() < 1e-3).all()  # no views: grey
    assert 0.002 < float(c.scales.detach().median()) < 0.03  # ~vertex spacing, metres
    torch.testing.assert_close(c.opacities, torch.full((av.num_gaussians,), 0.3), atol=1e-6, rtol=0)
    # vertices come first with the body's own weights
    torch.testing.assert_close(av.base_weights[: anny_body.num_vertices], anny_body.dense_skin_weights().float())
    assert 0.8 < av.extent < 1.2


def test_residual_field_starts_at_base_weights(body_avatar):
    av = body_avatar
    w = av.skin_weights()
    assert (w - av.base_weights).abs().max() < 1e-6
    # moving the head changes the weights, rows still sum to 1
    field = ResidualWeightField(av.num_bones)
    with torch.no_grad():
        field.head.bias[3] = 2.0
    w2 = field(av.means, av.base_weights)
    torch.testing.assert_close(w2.sum(-1), torch.ones(av.num_gaussians))
    assert (w2 - av.base_weights).abs().max() > 1e-3


def test_posed_at_zero_pose_is_canonical(anny_body, body_avatar):
    av = body_avatar
    t, _ = anny_body.bone_transforms(BodyPose.zeros(anny_body.num_bones))
    p = av.posed(t[0].float())
    c = av.canonical()
    assert (p.means - c.means).abs().max() < 1e-5
    q = c.quats / c.quats.norm(dim=-1, keepdim=True)
    assert (p.quats - q).abs().max() < 1e-5
    torch.testing.assert_close(p.scales, c.scales)
    assert p.skin_weights is None
    with pytest.raises(ValueError, match="transforms must be"):
        av.posed(t[0, :5].float())


def test_posed_moves_with_the_root(anny_body, body_avatar):
    pose = BodyPose.zeros(anny_body.num_bones)
    pose = BodyPose(pose.rotations, torch.tensor([0.1, -0.2, 0.3]))
    t, _ = anny_body.bone_transforms(pose)
    p = body_avatar.posed(t[0].float())
    torch.testing.assert_close(p.means - body_avatar.means, torch.tensor([0.1, -0.2, 0.3]).expand_as(p.means),
                               atol=1e-5, rtol=0)


def test_sample_surface_on_triangles(gen):
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    f = torch.tensor([[0, 1, 2], [0, 1, 3]])
    s = sample_surface(v, f, 1000, gen)
    assert s.points.shape == (1000, 3)
    torch.testing.assert_close(s.bary.sum(-1), torch.ones(1000))
    assert float(s.bary.min()) >= 0
    # points lie on the plane of their face: z == 0 on face 0, y == 0 on face 1
    assert s.points[s.face_ids == 0][:, 2].abs().max() < 1e-6
    assert s.points[s.face_ids == 1][:, 1].abs().max() < 1e-6
    # equal areas: about half each
    assert 400 < int((s.face_ids == 0).sum()) < 600
    with pytest.raises(ValueError, match="faces must be"):
        sample_surface(v, f[:, :2], 10, gen)


def test_knn_matches_brute_force(gen):
    p = torch.rand(300, 3, generator=gen)
    d, i = knn(p, 4, chunk=64)
    full = torch.cdist(p, p) + torch.eye(300) * 1e9
    dd, ii = torch.topk(full, 4, largest=False)
    torch.testing.assert_close(d, dd)
    assert (i == ii).all()
    with pytest.raises(ValueError, match="k=400"):
        knn(p, 400)


def test_initial_colors_from_a_view():
    # a 20x20 grid of points on the plane z = 0 seen from z = -2; the mask covers the left half, painted red
    xs = torch.linspace(-0.3, 0.3, 20)
    pts = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    pts = torch.cat([pts, torch.zeros(400, 1)], -1)
    W = H = 64
    vm = look_at(torch.tensor([0.0, 0.0, -2.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    cam = Cameras(vm, intrinsics_from_fov(40.0, W, H), W, H)
    image = torch.zeros(H, W, 3)
    image[..., 0] = 1.0
    mask = torch.zeros(H, W)
    mask[:, : W // 2] = 1.0
    weights = torch.ones(400, 1)
    transforms = torch.eye(4)[None]
    col = initial_colors(pts, weights, [(image, mask, cam, transforms)])
    from avatar.geometry import project_points

    uv, _ = project_points(pts, vm, cam.Ks)
    left = uv[:, 0] < W // 2 - 1
    right = uv[:, 0] > W // 2 + 1
    torch.testing.assert_close(col[left], torch.tensor([1.0, 0, 0]).expand(int(left.sum()), 3))
    # unseen points take the colour of the nearest seen point (here: the red left half)
    torch.testing.assert_close(col[right], torch.tensor([1.0, 0, 0]).expand(int(right.sum()), 3))
    nothing = initial_colors(pts, weights, [(image, torch.zeros(H, W), cam, transforms)])
    torch.testing.assert_close(nothing, torch.full((400, 3), 0.5))  # no view sees anything: grey


def test_param_groups_and_replace(body_avatar):
    av = GaussianAvatar(body_avatar.means[:50], body_avatar.quats[:50], body_avatar.log_scales[:50],
                        body_avatar.opacity_logits[:50], body_avatar.color_logits[:50], body_avatar.base_weights[:50],
                        body_avatar.body_vertices, ResidualWeightField(body_avatar.num_bones))
    groups = av.param_groups(AvatarLR(), scale=2.0)
    names = [g["name"] for g in groups]
    assert names == ["means", "quats", "log_scales", "opacity_logits", "color_logits", "weight_field"]
    assert math.isclose(groups[0]["lr"], 1.6e-4 * av.extent * 2.0)
    assert math.isclose(groups[4]["lr"], 2.5e-3 * 2.0)
    keep = torch.zeros(50, dtype=torch.bool)
    keep[:10] = True
    new = {k: v[:3].detach().clone() for k, v in av.gaussian_tensors().items()}
    swaps = av.replace_gaussians(keep, new)
    assert av.num_gaussians == 13 and av.base_weights.shape == (13, av.num_bones)
    assert set(swaps) == {"means", "quats", "log_scales", "opacity_logits", "color_logits"}
    assert isinstance(av.means, torch.nn.Parameter) and av.means.requires_grad
    with pytest.raises(ValueError, match="keep must be"):
        av.replace_gaussians(torch.ones(12, dtype=torch.bool))
    with pytest.raises(ValueError, match="new must give"):
        av.replace_gaussians(torch.ones(13, dtype=torch.bool), {"means": torch.zeros(1, 3)})
    assert set(GAUSSIAN_FIELDS) == set(new)


def test_weight_helpers_shapes():
    x = torch.rand(7, 3)
    assert sinusoidal_encoding(x, 4).shape == (7, 27)
    with pytest.raises(ValueError, match="same shape"):
        residual_skin_weights(torch.rand(7, 4), torch.rand(7, 5))
    f = ResidualWeightField(4)
    with pytest.raises(ValueError, match="base_weights must be"):
        f(x, torch.rand(7, 5))

import pytest
import torch
import torch.nn.functional as F

from avatar.compress.avatar_codec import (
    AvatarCodecConfig,
    decode_gaussians,
    encode_gaussians,
    gaussian_contributions,
    keep_mask,
    read_compact_avatar,
    select_gaussians,
    write_compact_avatar,
)
from avatar.export.ply import write_splat_ply
from avatar.geometry.projection import intrinsics_from_fov, look_at
from avatar.render.gaussians import rasterize_gaussians
from avatar.types import GaussianSet


def _set(gen, n=2000, bones=10):
    means = (torch.rand(n, 3, generator=gen) - 0.5) * torch.tensor([0.6, 0.6, 1.6])
    quats = F.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    scales = torch.exp(torch.rand(n, 3, generator=gen) * 2.5 - 6.0)
    opac = torch.rand(n, generator=gen) * 0.98 + 0.01
    colors = torch.rand(n, 3, generator=gen)
    w = torch.softmax(torch.randn(n, bones, generator=gen) * 3, -1)
    return GaussianSet(means, quats, scales, opac, colors, w)


def _camera(size=48):
    vm = look_at(torch.tensor([0.0, -3.0, 0.0]), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))[None]
    return vm, intrinsics_from_fov(40.0, size, size)[None], size


def test_round_trip_error_bounds(gen):
    g = _set(gen)
    parts, meta = encode_gaussians(g)
    d = decode_gaussians(parts, meta)
    extent = float((g.means.max(0).values - g.means.min(0).values).max())
    assert float((d.means - g.means).abs().max()) <= extent / 2 * 2 ** -11 + 1e-7  # fp16 half-ulp at the extent
    assert float((d.colors - g.colors).abs().max()) <= 0.5 / 255 + 1e-6
    assert float((d.opacities - g.opacities).abs().max()) <= 0.5 / 256 + 1e-6
    log_range = float(g.scales.log().max() - g.scales.log().min())
    assert float((d.scales.log() - g.scales.log()).abs().max()) <= log_range * 0.5 / 255 + 1e-5
    q = torch.where(g.quats[:, :1] < 0, -g.quats, g.quats)
    assert float((d.quats - q).norm(dim=-1).max()) < 0.01  # ~0.6 degrees
    top = torch.topk(g.skin_weights, 4, dim=1)
    dw = d.skin_weights.gather(1, top.indices)
    ref = top.values / top.values.sum(1, keepdim=True)
    assert float((dw - ref).abs().max()) < 0.005
    assert torch.allclose(d.skin_weights.sum(1), torch.ones(len(g)), atol=1e-5)


def test_file_round_trip_and_size_ratio(tmp_path, gen):
    g = _set(gen)
    no_w = GaussianSet(g.means, g.quats, g.scales, g.opacities, g.colors)
    ply = write_splat_ply(tmp_path / "a.ply", no_w).stat().st_size
    p = write_compact_avatar(tmp_path / "a.safetensors", no_w)
    ratio = ply / p.stat().st_size
    assert ratio > 3.5  # 68 -> 17 bytes per Gaussian plus headers
    back = read_compact_avatar(p)
    again = decode_gaussians(*encode_gaussians(no_w))
    for k in ("means", "quats", "scales", "opacities", "colors"):
        assert torch.equal(getattr(back, k), getattr(again, k)), k
    cb = write_compact_avatar(tmp_path / "cb.safetensors", no_w, AvatarCodecConfig(codebook_size=64))
    assert ply / cb.stat().st_size > 5.0
    dcb = read_compact_avatar(cb)
    assert float((dcb.means - no_w.means).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="not a compact avatar"):
        from avatar.compress.storage import save_compact

        read_compact_avatar(save_compact(tmp_path / "w.safetensors", {"a": torch.zeros(2)}))


def test_contributions_match_alpha_for_single_gaussians_and_torch_reference(gen):
    vm, K, size = _camera()
    g = _set(gen, 60)
    contrib = gaussian_contributions(g.means, g.quats, g.scales * 20, g.opacities, vm, K, size, size, backend="torch")
    cpu = gaussian_contributions(g.means, g.quats, g.scales * 20, g.opacities, vm, K, size, size, backend="cpu")
    torch.testing.assert_close(cpu, contrib, atol=1e-3, rtol=1e-3)
    # one Gaussian alone: its contribution is the sum of its alpha image
    i = int(contrib.argmax())
    sl = slice(i, i + 1)
    one = gaussian_contributions(g.means[sl], g.quats[sl], g.scales[sl] * 20, g.opacities[sl], vm, K, size, size,
                                 backend="torch")
    alpha = rasterize_gaussians(g.means[sl], g.quats[sl], g.scales[sl] * 20, g.opacities[sl], g.colors[sl], vm, K,
                                size, size, backend="torch").alphas.sum()
    torch.testing.assert_close(one[0], alpha, atol=1e-4, rtol=1e-4)
    keep = keep_mask(contrib, 0.5)
    assert int(keep.sum()) == 30 and bool((contrib[keep].min() >= contrib[~keep].max()))
    assert len(select_gaussians(g, keep)) == 30
    with pytest.raises(ValueError, match="keep_fraction"):
        keep_mask(contrib, 0.0)


def _train_psnr(avatar, frames, transforms):
    from avatar.eval.metrics import psnr
    from avatar.render.gaussians import render_gaussian_set

    with torch.no_grad():
        return float(torch.stack([psnr(render_gaussian_set(avatar.posed(t), fr.camera, background=None,
                                                           backend="cpu").colors[0].clamp(0, 1),
                                       fr.image * fr.mask[..., None]) for fr, t in zip(frames, transforms)]).mean())


@pytest.mark.slow
def test_finetune_pruned_keeps_rows_and_recovers_training_psnr(anny_body, tmp_path):
    """A short fit on a tiny synthetic subject, half the Gaussians pruned by importance, then the fine-tune: the
    survivors are exactly the kept rows before it, the original avatar is untouched, and a dozen steps of the
    fitting loss raise the training-view PSNR (above the unpruned avatar's too: that one is only 20 steps in)."""
    from avatar.compress.avatar_codec import finetune_pruned
    from avatar.data.frames import Frame
    from avatar.data.synthetic import SyntheticConfig, make_subject, render_frame
    from avatar.fit import DensifyConfig, FitConfig, fit_subject
    from avatar.types import BodyPose, Cameras

    cfg = SyntheticConfig(seed=3, motion="turn", rig="mono", cameras=(0,), num_frames=3, width=48, height=48,
                          texture_size=64)
    s = make_subject(cfg, anny_body)
    frames = []
    for f in range(3):
        sf = render_frame(s, anny_body, f)
        frames.append(Frame(sf.images[0], sf.masks[0], Cameras(s.cameras.viewmats[0], s.cameras.Ks[0], 48, 48),
                            BodyPose(s.motion.rotations[f], s.motion.translation[f]), s.shape, "anny", f, "0"))
    transforms = s.bone_transforms.float()  # [3, J, 4, 4]
    fit_cfg = FitConfig(steps=20, num_gaussians=1, backend="cpu", checkpoint_every=0, lr_scale=3.0,
                        densify=DensifyConfig(start=1000, stop=1000), background="black", init_color_frames=3)
    avatar = fit_subject(frames, anny_body, fit_cfg, tmp_path, progress=False).avatar
    before = {k: v.clone() for k, v in avatar.state_dict().items()}
    with torch.no_grad():
        c = avatar.canonical()
        imp = torch.zeros(avatar.num_gaussians)
        for fr, t in zip(frames, transforms):
            p = avatar.posed(t)
            imp += gaussian_contributions(p.means, p.quats, p.scales, p.opacities, fr.camera.viewmats[None],
                                          fr.camera.Ks[None], 48, 48)
    keep = keep_mask(imp, 0.5)
    pruned = finetune_pruned(avatar, keep, frames, anny_body, transforms, s.shape, fit_cfg, 0)
    assert pruned.num_gaussians == int(keep.sum()) == (avatar.num_gaussians + 1) // 2
    pc = pruned.canonical()
    for k in ("means", "quats", "scales", "opacities", "colors", "skin_weights"):
        assert torch.equal(getattr(pc, k), getattr(c, k)[keep]), k
    tuned = finetune_pruned(avatar, keep, frames, anny_body, transforms, s.shape, fit_cfg, 12)
    assert tuned.num_gaussians == pruned.num_gaussians
    for k, v in avatar.state_dict().items():
        assert torch.equal(v, before[k]), k
    p_full, p_pruned, p_tuned = (_train_psnr(a, frames, transforms) for a in (avatar, pruned, tuned))
    print(f"training-view PSNR: fitted {p_full:.2f}, pruned {p_pruned:.2f}, fine-tuned {p_tuned:.2f}")
    assert p_tuned > max(p_pruned, p_full) + 0.1, (p_full, p_pruned, p_tuned)
    with pytest.raises(ValueError, match="keep must be a bool"):
        finetune_pruned(avatar, keep[:-1], frames, anny_body, transforms, s.shape, fit_cfg, 1)
    with pytest.raises(ValueError, match="one transform per frame"):
        finetune_pruned(avatar, keep, frames, anny_body, transforms[:2], s.shape, fit_cfg, 1)

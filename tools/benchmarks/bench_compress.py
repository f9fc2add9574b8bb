"""Efficiency: sparse control points vs a per-Gaussian network, pruned / quantized networks, compact avatars.

One run, one synthetic subject (anny, "free" motion, ring of 4 cameras at low resolution) whose clothing has a
*pose-dependent* offset added here through the public functions of ``avatar.data.synthetic`` (a smooth field of the
canonical position times a smooth function of the hip, spine and shoulder rotations, along the rest normals, inside
the garments only). The avatar: the clothed canonical mesh's vertices plus area samples (50k Gaussians), colours
from the training views (``GaussianAvatar.from_surface``), the body's skinning weights.

Compact avatars are measured on a separate, FITTED avatar: ``avatar.fit.fit_subject`` (fast preset, 600 steps at
128 px, 20k initial Gaussians, densification to <= 30k; quick: 100 steps at 64 px on the body's vertices) on the
same subject rendered without the pose-dependent offsets; variants: its uncompressed 3DGS .ply, compact (all kept,
+ codebook), importance pruning keeping 80 / 60 / 50 % (quick: 60 %) before and after a short fine-tune of the
fitting loss (``avatar.compress.avatar_codec.finetune_pruned``); novel-pose PSNR against the held-out frames'
ground truth.

Every deformation network is fitted the same brief way: Adam on the known canonical non-rigid offsets of random
training frames (4096 random Gaussians a step; the control points add a small ARAP term). Novel-pose PSNR renders
the deformed + LBS-skinned Gaussians with the CPU rasterizer in held-out frames against the ground-truth mesh
renders (so the absolute value includes the Gaussians' appearance gap; the deltas between variants are the point).

Variants: dense per-Gaussian MLP (fp32, the baseline), control points (fp32), each compressed (int8 dynamic,
weight-only int8, bf16, structured half width + fine-tune, structured + bf16), the residual skinning-weight field,
the issue-6 skinning-code decoder and depth/skinning predictor when their shipped weights load, and the compact
avatar file against the uncompressed 3DGS .ply of a Gaussian avatar fitted to the subject's images (above). "ms"
is the median CPU time of one frame's deformation of all Gaussians (network + blending), in the same process and
thread setting. Quick mode: 64 px, 30 frames, 20k Gaussians, 60 network steps, a 100-step avatar fit (< 1 min).

    python tools/benchmarks/bench_compress.py [--quick] [--json] [--threads N]
"""

from __future__ import annotations

import os

# idle OpenMP threads of the CPU rasterizer (numba) and of torch spin-wait after each parallel region and steal the
# cores from the timed calls that follow (see avatar/render/gaussians_cpu.py); must be set before torch loads libgomp
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import copy  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from tools.benchmarks.common import parser, row  # noqa: E402


@dataclass
class Variant:
    name: str
    params: int
    file_bytes: int
    ms: object  # float ms, a callable timed at the end (interleaved with the others), or None
    psnr: float | None
    note: str = ""
    group: str = "net"  # ratios and deltas are against the first variant of the same group


def dynamic_offsets(body, subject, poses: Tensor, amplitude: float, seed: int) -> Tensor:
    """Pose-dependent clothing offsets ``[F, V]`` (metres along the rest normals) for axis-angle ``poses [F, J, 3]``:
    inside the garments, ``amplitude * tanh(sum_c field_c(x) * feature_c(pose))`` with 4 smooth plane-wave fields of
    the canonical position and 4 pose features (hip / spine / shoulder rotation components)."""
    from avatar.data.synthetic import _smooth_field
    from avatar.skinning.control import pose_features

    rng = np.random.default_rng([seed, 7])
    canon = subject.canonical_vertices
    fields = torch.stack([_smooth_field(canon, rng, (0.3, 0.8)) for _ in range(4)], -1)  # [V, 4]
    names = [n for n in ("upperleg01.L", "upperleg01.R", "spine03", "upperarm01.L", "upperarm01.R")
             if n in body.bone_names] if hasattr(body, "bone_names") else []
    joints = tuple(body.bone_index(n) for n in names) if names else tuple(range(1, 6))
    feats = pose_features(poses, joints)  # [F, 9 * len]
    proj = torch.as_tensor(rng.normal(size=(feats.shape[1], 4)), dtype=feats.dtype) / math.sqrt(feats.shape[1])
    p = feats @ proj * 3.0  # [F, 4]
    garment = (subject.offsets > 0).to(canon.dtype)
    return amplitude * garment * torch.tanh(p @ fields.T)  # [F, V]


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quick = args.quick
    t_start = time.perf_counter()
    stage: dict[str, float] = {"_t0": t_start}  # wall seconds per part of the run (printed at the end)

    from avatar.body import AnnyBody
    from avatar.compress import (
        bf16_support,
        gaussian_contributions,
        keep_mask,
        prune_sequential_neurons,
        quantize_dynamic_int8,
        quantize_weight_only,
        read_compact_avatar,
        save_compact,
        to_bfloat16,
        write_compact_avatar,
    )
    from avatar.compress.avatar_codec import AvatarCodecConfig
    from avatar.data.synthetic import SyntheticConfig, make_subject, render_views
    from avatar.eval.metrics import psnr
    from avatar.export.ply import write_splat_ply
    from avatar.render.gaussians import rasterize_gaussians
    from avatar.render.mesh import vertex_normals
    from avatar.represent.avatar import GaussianAvatar
    from avatar.skinning.control import (
        ControlPointConfig,
        ControlPointDeformer,
        PerGaussianConfig,
        PerGaussianDeformer,
        knn_points,
        pose_features,
    )
    from avatar.skinning.lbs import skin_gaussians
    from avatar.skinning.weights import ResidualWeightField
    from avatar.types import Cameras, GaussianSet

    gen = torch.Generator().manual_seed(0)
    body = AnnyBody()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # again: importing the body model's stack may reset it
    size = 64 if quick else 128
    n_frames = 30 if quick else 60
    n_test = 5 if quick else 10
    cfg = SyntheticConfig(seed=3, motion="free", num_frames=n_frames, width=size, height=size, rig="ring23",
                          cameras=(0, 6, 12, 17), texture_size=256)
    subject = make_subject(cfg, body)
    V = subject.canonical_vertices.shape[0]
    rest_normals = vertex_normals(subject.canonical_vertices, subject.faces)
    dyn = dynamic_offsets(body, subject, subject.motion.rotations, amplitude=0.025, seed=cfg.seed)  # [F, V]
    canon_f = subject.canonical_vertices[None] + dyn[..., None] * rest_normals[None]  # [F, V, 3]
    train_ids = list(range(0, n_frames - n_test))
    test_ids = list(range(n_frames - n_test, n_frames))
    transforms = subject.bone_transforms  # [F, J, 4, 4]
    from avatar.skinning.lbs import lbs_points

    def gt_images(f: int) -> tuple[Tensor, Tensor]:
        verts = lbs_points(canon_f[f], body.skin_weights, transforms[f], body.skin_indices)
        return render_views(verts, subject.faces, subject.render_mesh, subject.uvs, subject.texture, subject.cameras,
                            cfg.shading, cfg.background)

    with torch.no_grad():
        gts = {f: gt_images(f) for f in train_ids[::8] + test_ids}  # colour init; avatar-file PSNR
    # ---- the avatar: 50k Gaussians on the clothed canonical mesh ------------------------------------------------
    n_gauss = 20_000 if quick else 50_000
    dense_w = body.dense_skin_weights().to(torch.float32)
    views = []
    for f in train_ids[::8]:
        imgs, masks = gts[f]
        for c in range(len(cfg.cameras)):
            cam = Cameras(subject.cameras.viewmats[c], subject.cameras.Ks[c], size, size)
            views.append((imgs[c], masks[c], cam, transforms[f]))
    with torch.no_grad():
        avatar = GaussianAvatar.from_surface(subject.canonical_vertices, subject.faces, dense_w, n_gauss - V, gen,
                                             views=views, opacity=0.9, weight_field=False)
        avatar.log_scales.sub_(math.log(1.5))  # a little sharper than the 3-NN spacing at this density
        canon = avatar.canonical()
    # per-Gaussian ground-truth canonical offsets: vertices exactly, face samples by barycentric interpolation
    means0 = canon.means.detach()
    _, nn_idx = knn_points(means0, subject.canonical_vertices, 3)
    dists = (means0[:, None] - subject.canonical_vertices[nn_idx]).norm(dim=-1).clamp_min(1e-6)
    interp_w = (1 / dists) / (1 / dists).sum(1, keepdim=True)
    disp_v = dyn[..., None] * rest_normals[None]  # [F, V, 3]
    target = (disp_v[:, nn_idx] * interp_w[None, ..., None]).sum(2)  # [F, N, 3]
    target[:, :V] = disp_v[:, :]  # vertices themselves: exact

    pose_joints = None
    feats = pose_features(subject.motion.rotations, pose_joints)  # [F, J*9]
    pose_dim = feats.shape[1]
    scale = float((means0.max(0).values - means0.min(0).values).max())

    # ---- fitting ---------------------------------------------------------------------------------------------
    steps = 60 if quick else 400
    batch = 4096

    def fit(model: nn.Module, deform, steps: int, lr: float, arap_weight: float = 0.0) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(1)
        loss_v = float("nan")
        for it in range(steps):
            f = train_ids[int(torch.randint(len(train_ids), (1,), generator=g))]
            idx = torch.randint(means0.shape[0], (batch,), generator=g)
            opt.zero_grad(set_to_none=True)
            pred, reg = deform(model, idx, feats[f])
            loss = (pred - (means0[idx] + target[f, idx])).square().sum(-1).mean() * 1e4  # cm^2
            if arap_weight:
                loss = loss + arap_weight * reg
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
        return loss_v

    def dense_deform(model, idx, pose):
        return model(means0[idx], pose), None

    cp_cfg = ControlPointConfig(num_nodes=512, k=4, graph_k=8, hidden=128, layers=3, pose_latent=64)

    def cp_deform(model, idx, pose):
        from avatar.skinning.control import Binding

        b = Binding(binding.indices[idx], binding.dist2[idx])
        R, t = model.node_transforms(pose)
        from avatar.skinning.control import blend_deform_points, node_affines

        out = blend_deform_points(means0[idx], node_affines(model.nodes, R, t), b.indices, model.weights(b))
        return out, model.arap(R, t) * 1e4

    t0 = time.perf_counter()
    dense = PerGaussianDeformer(pose_dim, scale, PerGaussianConfig(hidden=128, layers=3, pose_latent=64),
                                generator=torch.Generator().manual_seed(2))
    dense_loss = fit(dense, dense_deform, steps, 1e-3)
    t_dense_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    cp = ControlPointDeformer.from_surface(subject.canonical_vertices, pose_dim, cp_cfg,
                                           generator=torch.Generator().manual_seed(3))
    binding = cp.bind(means0)
    cp_loss = fit(cp, cp_deform, steps, 1e-3, arap_weight=1e-3)
    t_cp_fit = time.perf_counter() - t0

    # ---- evaluation helpers ------------------------------------------------------------------------------------
    weights_all = canon.skin_weights

    def render(g: GaussianSet, means: Tensor, w: Tensor, f: int):
        pm, pq = skin_gaussians(means, g.quats, w, transforms[f])
        return rasterize_gaussians(pm, pq, g.scales, g.opacities, g.colors, subject.cameras.viewmats,
                                   subject.cameras.Ks, size, size, backend="cpu")

    with torch.no_grad():  # reference: the same Gaussians moved by the true pose-dependent offsets
        refs = {f: render(canon, means0 + target[f], weights_all, f) for f in test_ids}

    def render_psnr(deform_fn, gs: GaussianSet | None = None, skin_w: Tensor | None = None) -> float:
        """Mean novel-pose PSNR over test frames and cameras against the reference renders;
        ``deform_fn(frame) -> canonical means`` (None: no deformation)."""
        g = canon if gs is None else gs
        w = weights_all if skin_w is None else skin_w
        vals = []
        with torch.no_grad():
            for f in test_ids:
                m = g.means if deform_fn is None else deform_fn(f)
                out = render(g, m, w, f)
                vals.append(psnr(out.colors.clamp(0, 1), refs[f].colors.clamp(0, 1), refs[f].alphas).mean())
        return float(torch.stack(vals).mean())


    repeats = 5 if quick else 15
    pose_t = feats[test_ids[0]]
    variants: list[Variant] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_compress_"))

    def nbytes_file(name: str, sd: dict[str, Tensor], quantize: bool = False, enc="auto") -> int:
        return save_compact(tmp / f"{name}.safetensors", sd, enc, quantize=quantize).stat().st_size

    def n_params(m: nn.Module) -> int:
        total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for n, b in m.named_buffers()
                                                               if n.endswith(("qweight", "bias")))
        for mod in m.modules():
            if hasattr(mod, "_packed_params") and callable(getattr(mod, "weight", None)):
                total += mod.weight().numel() + (0 if mod.bias() is None else mod.bias().numel())
        return total

    # dense per-Gaussian variants -----------------------------------------------------------------------------
    enc_all = dense.encode(means0)

    def dense_with(model: nn.Module):
        return lambda p: model(means0, p, enc_all)

    with torch.no_grad():
        dense_fn = dense_with(dense)
        ms_dense = (lambda: dense_fn(pose_t))
        psnr_dense = render_psnr(lambda f: dense_fn(feats[f]))
    sd_dense = {k: v for k, v in dense.state_dict().items()}
    bytes_dense = nbytes_file("dense", sd_dense, enc="dense")
    variants.append(Variant("per-Gaussian MLP fp32 (baseline)", n_params(dense), bytes_dense, ms_dense, psnr_dense,
                            f"fit loss {dense_loss:.3f} cm^2, {t_dense_fit:.0f} s"))
    with torch.no_grad():
        psnr_rigid = render_psnr(None)
    variants.append(Variant("no deformation (LBS only)", 0, 0, None, psnr_rigid))

    # control points -------------------------------------------------------------------------------------------
    with torch.no_grad():
        node_feats = cp.node_features()
        W = cp.blend_matrix(binding)

        def cp_with(model):
            return lambda p: model.deform_fast(means0, W, p, node_feats)

        cp_fn = cp_with(cp)
        ms_cp = (lambda: cp_fn(pose_t))
        psnr_cp = render_psnr(lambda f: cp_fn(feats[f]))
    bytes_cp = nbytes_file("cp", dict(cp.state_dict()), enc="dense")
    variants.append(Variant(f"control points K={cp.num_nodes} fp32", n_params(cp), bytes_cp, ms_cp, psnr_cp,
                            f"fit loss {cp_loss:.3f} cm^2, {t_cp_fit:.0f} s"))

    # compressed networks: the same recipe for both deformers --------------------------------------------------
    # structured (narrower) networks: fine-tuned for as many steps again as the original fit (measured: with a
    # quarter of that they lose 0.6-0.8 dB; note that they then have seen twice the training steps of the others)
    ft_steps = steps
    bf_ok, bf_why = bf16_support()

    def compress_variants(label: str, model: nn.Module, make_fn, deform, base_ms: float):
        out = []

        def sd_of(m: nn.Module) -> dict[str, Tensor]:  # node-graph ids fit int16 (K < 32768) in compressed files
            return {k: (v.to(torch.int16) if k == "graph" else v) for k, v in m.state_dict().items()}

        with torch.no_grad():
            m = copy.deepcopy(model)
            m.mlp = quantize_dynamic_int8(model.mlp)
            fn = make_fn(m)
            out.append(Variant(f"{label} int8 dynamic", n_params(m), nbytes_file(f"{label}_i8", sd_of(model),
                                                                              quantize=True),
                               (lambda fn=fn: fn(pose_t)), render_psnr(lambda f: fn(feats[f]))))
            m = copy.deepcopy(model)
            m.mlp = quantize_weight_only(model.mlp)
            fn = make_fn(m)
            out.append(Variant(f"{label} int8 weight-only", n_params(m), nbytes_file(f"{label}_w8", sd_of(model),
                                                                                  quantize=True),
                               (lambda fn=fn: fn(pose_t)), render_psnr(lambda f: fn(feats[f]))))
            if bf_ok:
                m = copy.deepcopy(model)
                m.mlp = to_bfloat16(model.mlp)
                fn = make_fn(m)
                sd16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd_of(model).items()}
                out.append(Variant(f"{label} bf16", n_params(m), nbytes_file(f"{label}_bf", sd16, enc="dense"),
                                   (lambda fn=fn: fn(pose_t)), render_psnr(lambda f: fn(feats[f]))))
        # structured: half the hidden neurons removed, then the same brief fine-tune
        small = copy.deepcopy(model)
        small.mlp = prune_sequential_neurons(model.mlp, 0.5)
        fit(small, deform, ft_steps, 1e-3, arap_weight=1e-3 if isinstance(model, ControlPointDeformer) else 0.0)
        with torch.no_grad():
            fn = make_fn(small)
            out.append(Variant(f"{label} structured 1/2 width + fine-tune", n_params(small),
                               nbytes_file(f"{label}_s", dict(small.state_dict()), enc="dense"),
                               (lambda fn=fn: fn(pose_t)), render_psnr(lambda f: fn(feats[f]))))
            m = copy.deepcopy(small)
            m.mlp = to_bfloat16(small.mlp) if bf_ok else quantize_weight_only(small.mlp)
            fn = make_fn(m)
            out.append(Variant(f"{label} structured 1/2 + int8 file + {'bf16' if bf_ok else 'fp32'} compute",
                               n_params(small), nbytes_file(f"{label}_sq", sd_of(small), quantize=True),
                               (lambda fn=fn: fn(pose_t)), render_psnr(lambda f: fn(feats[f]))))
        return out

    variants += compress_variants("per-Gaussian", dense, dense_with, dense_deform, ms_dense)
    variants += compress_variants("control", cp, cp_with, cp_deform, ms_cp)

    # residual skinning-weight field on the 50k Gaussians (a non-zero head stands in for a trained one) -------
    field = ResidualWeightField(dense_w.shape[1], hidden=64, layers=2, num_freqs=4, scale=scale,
                                generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        field.head.weight.copy_(torch.randn(field.head.weight.shape, generator=gen) * 0.3)
        ref_w = field(means0, weights_all)
        ms_field = (lambda: field(means0, weights_all))
        psnr_field = None
        field_rows = [Variant("weight field fp32", n_params(field), nbytes_file("wf", dict(field.state_dict()), enc="dense"),
                              ms_field, psnr_field, group="field")]
        for label, mk in (("int8 dynamic", lambda m: quantize_dynamic_int8(m)),
                          ("bf16", lambda m: to_bfloat16(m) if bf_ok else None)):
            fm = copy.deepcopy(field)
            body_q, head_q = mk(field.body), mk(field.head)
            if body_q is None:
                continue
            fm.body, fm.head = body_q, head_q
            w_q = fm(means0, weights_all)
            field_rows.append(Variant(f"weight field {label}", n_params(fm),
                                      nbytes_file(f"wf_{label[:4]}", dict(field.state_dict()), quantize=label.startswith("int8"))
                                      if label.startswith("int8") else
                                      nbytes_file("wf_bf", {k: v.bfloat16() for k, v in field.state_dict().items()}),
                                      (lambda fm=fm: fm(means0, weights_all)),
                                      None,
                                      f"max |dw| {float((w_q - ref_w).abs().max()):.4f}", group="field"))
    variants += field_rows

    # issue 6's networks, when their shipped weights load ------------------------------------------------------
    try:
        from avatar.predict.skin_codes import SkinCodec, shipped_codec_path
        from safetensors.torch import load_file

        sd = load_file(str(shipped_codec_path()))
        codec = SkinCodec(dense_w.shape[1])
        codec.load_state_dict(sd)
        codec.eval()
        with torch.no_grad():
            codes = codec.encode(weights_all)  # the avatar's own weights' codes
        with torch.no_grad():
            ref = codec.decode(codes)
            ms_c = (lambda: codec.decode(codes))
            variants.append(Variant("skin-code decoder fp32", n_params(codec.decoder),
                                    nbytes_file("codec", dict(codec.decoder.state_dict()), enc="dense"), ms_c, None,
                                    f"decode of {n_gauss} codes", group="codec"))
            for label, mk in (("int8 dynamic", quantize_dynamic_int8), ("int8 weight-only", quantize_weight_only),
                              ("bf16", to_bfloat16)):
                if label == "bf16" and not bf_ok:
                    continue
                cq = copy.deepcopy(codec)
                cq.decoder = mk(codec.decoder)
                out = cq.decode(codes)
                variants.append(Variant(f"skin-code decoder {label}", n_params(cq.decoder),
                                        nbytes_file(f"codec_{label[:4]}", dict(codec.decoder.state_dict()),
                                                    quantize=label.startswith("int8"))
                                        if label.startswith("int8") else
                                        nbytes_file("codec_bf", {k: v.bfloat16() for k, v in codec.decoder.state_dict().items()}),
                                        (lambda cq=cq: cq.decode(codes)), None,
                                        f"max |dw| {float((out - ref).abs().max()):.4f}", group="codec"))
    except Exception as e:  # the other issue's files may not exist yet; say so instead of failing the benchmark
        variants.append(Variant("skin-code decoder", 0, 0, None, None, f"not measured: {type(e).__name__}: {e}",
                                group="codec"))
    try:
        from avatar.predict.infer import load_predictor
        from avatar.predict.network import DepthSkinNet

        try:
            net, how = load_predictor(), "shipped weights"
        except FileNotFoundError as e:
            net, how = DepthSkinNet(), f"untrained architecture (size/speed only; {e.__class__.__name__})"
        net.eval()
        S = net.cfg.size
        x_in = torch.rand(4, 14, S, S, generator=gen)
        with torch.no_grad():
            ref_out = net(x_in)
            variants.append(Variant("depth/skin predictor fp32 (batch 4)", n_params(net),
                                    nbytes_file("pred", dict(net.state_dict()), enc="dense"),
                                    (lambda: net(x_in)), None, how, group="pred"))
            if bf_ok:
                nb = to_bfloat16(net)
                err = float((nb(x_in) - ref_out).abs().max() / ref_out.abs().max())
                variants.append(Variant("depth/skin predictor bf16", n_params(net),
                                        nbytes_file("pred_bf", {k: v.bfloat16() if v.is_floating_point() else v
                                                                for k, v in net.state_dict().items()}, enc="dense"),
                                        (lambda nb=nb: nb(x_in)), None, f"max rel. output error {err:.4f}",
                                        group="pred"))
            variants.append(Variant("depth/skin predictor int8 file (weights)", n_params(net),
                                    nbytes_file("pred_i8", dict(net.state_dict()), quantize=True), None, None,
                                    "per-channel int8 conv weights; compute stays fp32/bf16", group="pred"))
    except Exception as e:
        variants.append(Variant("depth/skin predictor", 0, 0, None, None, f"not measured: {type(e).__name__}: {e}",
                                group="pred"))

    # compact avatar: a Gaussian avatar FITTED to the subject's images -------------------------------------------
    # The fitting job (``avatar.fit.fit_subject``, the fast CPU preset, shortened) on the same subject rendered
    # WITHOUT the pose-dependent offsets above (a static avatar cannot represent them): every 2nd training frame x
    # 4 cameras. Novel-pose PSNR: the held-out frames' ground-truth renders (image * mask, black background, crop to
    # the mask's box, the bench_fit protocol). Importance: accumulated alpha * T over the fitting frames' views.
    from avatar.compress.avatar_codec import finetune_pruned
    from avatar.data.frames import Frame
    from avatar.data.synthetic import render_frame
    from avatar.fit import DensifyConfig, fast_config, fit_subject
    from avatar.types import BodyPose

    t_avatar = time.perf_counter()
    stage["networks"] = t_avatar - stage.pop("_t0")
    fit_ids = train_ids[::2]
    fit_frames: list[Frame] = []
    static_gt: dict[int, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for f in fit_ids + test_ids:
            sf = render_frame(subject, body, f)
            static_gt[f] = (sf.images, sf.masks)
            if f in test_ids:
                continue
            pose_f = BodyPose(subject.motion.rotations[f], subject.motion.translation[f])
            for c in range(len(cfg.cameras)):
                cam = Cameras(subject.cameras.viewmats[c], subject.cameras.Ks[c], size, size)
                fit_frames.append(Frame(sf.images[c], sf.masks[c], cam, pose_f, subject.shape, "anny", f, str(c)))
    fit_transforms = torch.stack([transforms[fr.frame_id] for fr in fit_frames]).float()  # [T, J, 4, 4]
    fit_steps = 100 if quick else 600
    fit_cfg = fast_config(steps=fit_steps, num_gaussians=1 if quick else 20_000, backend="cpu", checkpoint_every=0,
                          lr_scale=3.0 if quick else 1.0,
                          densify=(DensifyConfig(start=fit_steps + 1, stop=fit_steps + 1) if quick else
                                   DensifyConfig(start=150, stop=450, interval=100, max_gaussians=30_000)))
    fitted = fit_subject(fit_frames, body, fit_cfg, tmp / "fit", progress=False)
    fitted_avatar = fitted.avatar
    stage["avatar fit"] = time.perf_counter() - t_avatar

    def avatar_psnr(g: GaussianSet) -> float:
        """Mean novel-pose PSNR of the canonical set ``g`` (with skinning weights) over held-out frames x cameras."""
        vals = []
        with torch.no_grad():
            for f in test_ids:
                pm, pq = skin_gaussians(g.means, g.quats, g.skin_weights, transforms[f])
                out = rasterize_gaussians(pm, pq, g.scales, g.opacities, g.colors, subject.cameras.viewmats,
                                          subject.cameras.Ks, size, size, backend="cpu")
                imgs, masks = static_gt[f]
                vals.append(psnr(out.colors.clamp(0, 1), imgs * masks[..., None], masks).mean())
        return float(torch.stack(vals).mean())

    with torch.no_grad():
        full_set = fitted_avatar.canonical()
        full_set = GaussianSet(*(t.detach() for t in (full_set.means, full_set.quats, full_set.scales,
                                                      full_set.opacities, full_set.colors, full_set.skin_weights)))
    plain = GaussianSet(full_set.means, full_set.quats, full_set.scales, full_set.opacities, full_set.colors)
    ply_bytes = write_splat_ply(tmp / "avatar.ply", plain).stat().st_size
    fit_train_psnr = float(np.mean([h["psnr"] for h in fitted.history[-20:]]))
    variants.append(Variant("fitted avatar .ply fp32 (3DGS)", len(plain), ply_bytes, None, avatar_psnr(full_set),
                            f"fit {fit_steps} steps, {fitted.seconds:.0f} s, last-20-step train PSNR "
                            f"{fit_train_psnr:.2f} dB", group="avatar"))
    importance = torch.zeros(len(plain))
    with torch.no_grad():
        for f in fit_ids:
            pm, pq = skin_gaussians(plain.means, plain.quats, full_set.skin_weights, transforms[f])
            importance += gaussian_contributions(pm, pq, plain.scales, plain.opacities, subject.cameras.viewmats,
                                                 subject.cameras.Ks, size, size)

    def compact_rows(label: str, g: GaussianSet, note: str) -> None:
        for cb in (0, 256):
            appearance = GaussianSet(g.means, g.quats, g.scales, g.opacities, g.colors)
            size_app = write_compact_avatar(tmp / "a.safetensors", appearance,
                                            AvatarCodecConfig(codebook_size=cb)).stat().st_size
            with_w = write_compact_avatar(tmp / "aw.safetensors", g, AvatarCodecConfig(codebook_size=cb))
            back_w = read_compact_avatar(with_w)  # rendered from the file with its top-4 uint8 skinning weights
            variants.append(Variant(f"compact {label}{' + codebook 256' if cb else ''}", len(g), size_app, None,
                                    avatar_psnr(back_w), f"{note}file with top-4 skin weights "
                                    f"{with_w.stat().st_size} B ({ply_bytes / with_w.stat().st_size:.1f}x)",
                                    group="avatar"))

    compact_rows("keep 100%", full_set, "")
    ft_steps = 30 if quick else 60
    for keep in ((0.6,) if quick else (0.8, 0.6, 0.5)):
        mask = keep_mask(importance, keep)
        for steps_ft in (0, ft_steps):
            t0 = time.perf_counter()
            pruned = finetune_pruned(fitted_avatar, mask, fit_frames, body, fit_transforms, subject.shape, fit_cfg,
                                     steps_ft)
            with torch.no_grad():
                c = pruned.canonical()
                sub = GaussianSet(*(t.detach() for t in (c.means, c.quats, c.scales, c.opacities, c.colors,
                                                         c.skin_weights)))
            how = f" + fine-tune {steps_ft}" if steps_ft else " (no fine-tune)"
            compact_rows(f"keep {keep:.0%}{how}", sub,
                         f"fine-tune {time.perf_counter() - t0:.0f} s; " if steps_ft else "")
    stage["compact avatar"] = time.perf_counter() - t_avatar - stage["avatar fit"]

    # ---- interleaved timing: one call of each variant per round, medians over rounds ----------------------------
    t0_timing = time.perf_counter()
    timed = [v for v in variants if callable(v.ms)]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        for v in timed:
            v.ms()  # warm-up
            v.ms()
        samples: dict[str, list[float]] = {v.name: [] for v in timed}
        for _ in range(repeats):
            for v in timed:
                t0 = time.perf_counter()
                v.ms()
                samples[v.name].append((time.perf_counter() - t0) * 1000.0)
    for v in timed:
        v.ms = float(np.median(samples[v.name]))
    stage["interleaved timing"] = time.perf_counter() - t0_timing

    # ---- output ---------------------------------------------------------------------------------------------------
    rows = []
    group_base: dict[str, Variant] = {}
    for v in variants:
        group_base.setdefault(v.group, v)

    def ref(v: Variant) -> Variant:
        return group_base[v.group]

    for v in variants:
        if v.ms is not None:
            rows.append(row(f"{v.name} | ms/frame", v.ms, "ms", ref(v).ms))
        if v.file_bytes:
            rows.append(row(f"{v.name} | file", v.file_bytes, "B", ref(v).file_bytes))
        if v.psnr is not None:
            rows.append(row(f"{v.name} | novel-pose PSNR", v.psnr, "dB", ref(v).psnr))
    if args.json:
        import json

        print(json.dumps(rows))
        return
    print(f"\nbench_compress: subject seed {cfg.seed}, {size}x{size}, {len(cfg.cameras)} cameras, "
          f"{len(train_ids)} train / {len(test_ids)} novel-pose frames, {n_gauss} Gaussians, "
          f"{torch.get_num_threads()} torch threads; bf16: {bf_why}")
    print("ms = median CPU time of one frame's deformation of all Gaussians (interleaved rounds); network PSNR: "
          "novel poses vs the same Gaussians moved by the true offsets; delta vs the dense fp32 network; avatar "
          "rows: an avatar fitted by avatar.fit.fit_subject, novel-pose PSNR vs the ground-truth renders of held-out "
          "poses, file size (appearance only, as the .ply) and delta vs its uncompressed .ply\n")
    w = max(len(v.name) for v in variants)
    print(f"{'variant':<{w}}  {'params':>9}  {'file B':>9}  {'size x':>6}  {'ms/frame':>9}  {'speed x':>7}  "
          f"{'PSNR dB':>8}  {'delta':>6}  note")
    for v in variants:
        ref_b = ref(v).file_bytes
        sx = f"{ref_b / v.file_bytes:.1f}" if v.file_bytes else ""
        ms = f"{v.ms:.2f}" if v.ms is not None else ""
        spx = f"{ref(v).ms / v.ms:.1f}" if v.ms and ref(v).ms else ""
        ps = f"{v.psnr:.2f}" if v.psnr is not None else ""
        d = f"{v.psnr - ref(v).psnr:+.2f}" if v.psnr is not None and ref(v).psnr is not None else ""
        print(f"{v.name:<{w}}  {v.params:>9}  {v.file_bytes:>9}  {sx:>6}  {ms:>9}  {spx:>7}  {ps:>8}  {d:>6}  {v.note}")
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stage.items()))
    print(f"(total {time.perf_counter() - t_start:.0f} s; size x, speed x and delta are against the first row of "
          f"each group: the dense per-Gaussian fp32 network, the fp32 weight field, decoder, predictor, the .ply)")


if __name__ == "__main__":
    main()

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

Variants, in groups (size x, speed x and delta are against the group's first row, measured in this run):

- net: dense per-Gaussian MLP (fp32, the baseline), control points (fp32; LBS blend through the fused numba pass,
  the older torch CSR path, and the LBS/DQS mix), each compressed (int8 dynamic, weight-only int8, bf16,
  structured half width + fine-tune, + int8 file and bf16 compute). Quality: novel-pose PSNR.
- field: the fitted avatar's residual skinning-weight field (trained by ``avatar.fit`` with the Gaussians; the
  avatar below), PTQ, and 1/4 width + top-8 base bones per Gaussian + distillation (``avatar.compress.distill``).
  Quality: the fitted avatar's novel-pose PSNR with each variant's weights (plus the no-field row: what the
  field itself adds); time: one evaluation on the 50k Gaussians.
- codec: the shipped skinning-code decoder, PTQ, and the shipped compact decoder
  ``data/compressed/skin_decoder_anny.safetensors`` written by ``python -m tools.compress_decoder`` (hidden neurons
  pruned, distilled on the codec's own training points, int8 weights; loaded, not trained here, so quick and full
  mode measure the same network; ``--decoder`` measures other such files), in fp32, bf16 and weight-only int8
  compute. Quality: the 50k avatar skinned with the weights decoded from its weights' codes (novel-pose PSNR); the
  held-out LBS error of ``evaluate_skin_codec`` on the file's recorded held-out set in the note.
- pred: the shipped depth/skin predictor (batch of 4 views at 96 px), channels-last, bf16, and the shipped
  ``data/compressed/depthskin_anny_half.safetensors`` written by ``python -m tools.compress_predictor`` (half the
  channels, distilled on the dense net's training views, int8 conv weights). Quality: held-out depth error (mm,
  mean of front and back; lower is better) on the predictor's validation views; code / weight L1 in the note.
- avatar: the compact avatar file against the uncompressed 3DGS .ply of a Gaussian avatar fitted to the subject's
  images (above).

"ms" is the median CPU time of one frame (interleaved rounds, same process and thread setting). Quick mode: 64 px,
30 frames, 20k Gaussians, 60 network steps, a shorter weight-field distillation, 8 predictor validation views, a
100-step avatar fit (about 1 min on an idle 2-core CPU); the compact decoder and predictor are the shipped files in
both modes. Caveat for the codec group in quick mode: at 64 px and 20k Gaussians its PSNR is dominated by the 57
Gaussians that every decoder (the dense one too) sends to a wrong bone (> 1 cm, up to ~0.4 m; see the note's avatar
LBS error), so its deltas there swing by dB (measured: +3.9 dB for the shipped compact decoder, +0.04 dB in full
mode); the full mode's are the measurement.

    python tools/benchmarks/bench_compress.py [--quick] [--json] [--threads N] [--decoder FILE ...]
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
    psnr: float | None  # the quality measure of the group, in ``unit``
    note: str = ""
    group: str = "net"  # ratios and deltas are against the first variant of the same group
    unit: str = "dB"  # "dB": novel-pose PSNR (higher is better); "mm": held-out depth error (lower is better)


GROUPS = ("net", "field", "codec", "pred", "avatar")  # table order
QUALITY = {"dB": "novel-pose PSNR", "mm": "held-out depth error"}


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
    ap.add_argument("--decoder", type=Path, nargs="*", default=None,
                    help="compact skin-code decoder files to measure (default: the shipped "
                         "data/compressed/skin_decoder_anny.safetensors from `python -m tools.compress_decoder`)")
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
        Binding,
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
        b = Binding(binding.indices[idx], binding.dist2[idx])
        R, t = model.node_transforms(pose)
        return model.blend(means0[idx], b.indices, model.weights(b), R, t), model.arap(R, t) * 1e4

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
    t0 = time.perf_counter()  # the same nodes with DreamMesh4D's LBS/DQS blend (a learnable LBS share per node)
    cp_mix = ControlPointDeformer.from_surface(subject.canonical_vertices, pose_dim,
                                               ControlPointConfig(**{**cp_cfg.__dict__, "blend": "mix"}),
                                               generator=torch.Generator().manual_seed(3))
    cp_mix_loss = fit(cp_mix, cp_deform, steps, 1e-3, arap_weight=1e-3)
    t_cp_mix_fit = time.perf_counter() - t0

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
    # inference: radii frozen, so the kNN indices and normalized RBF weights are computed once (freeze) and each
    # frame runs the node network (K nodes) plus one fused numba pass over the points (blend_deform_frozen)
    with torch.no_grad():
        node_feats = cp.node_features()

        def cp_with(model):
            fz = model.freeze(binding)  # after any fine-tune: the model's own radii
            return lambda p: model.deform_fast(means0, fz, p, node_feats)

        cp_fn = cp_with(cp)
        ms_cp = (lambda: cp_fn(pose_t))
        psnr_cp = render_psnr(lambda f: cp_fn(feats[f]))
        W_csr = cp.blend_matrix(binding)
        ms_cp_csr = (lambda: cp.deform_fast(means0, W_csr, pose_t, node_feats))
        mix_fn = cp_with(cp_mix)
        psnr_mix = render_psnr(lambda f: mix_fn(feats[f]))
    bytes_cp = nbytes_file("cp", dict(cp.state_dict()), enc="dense")
    variants.append(Variant(f"control points K={cp.num_nodes} fp32", n_params(cp), bytes_cp, ms_cp, psnr_cp,
                            f"LBS blend, fused numba pass; fit loss {cp_loss:.3f} cm^2, {t_cp_fit:.0f} s"))
    variants.append(Variant(f"control points K={cp.num_nodes} fp32 (torch CSR blend)", n_params(cp), bytes_cp,
                            ms_cp_csr, psnr_cp, "the previous inference path: sparse CSR product + batched 3x3"))
    variants.append(Variant(f"control points K={cp.num_nodes} LBS/DQS mix fp32", n_params(cp_mix),
                            nbytes_file("cp_mix", dict(cp_mix.state_dict()), enc="dense"), (lambda: mix_fn(pose_t)),
                            psnr_mix, f"a LBS + (1-a) DQS, learnable a per node (mean a {float(cp_mix.mix().detach().mean()):.2f} "
                            f"after the fit); fit loss {cp_mix_loss:.3f} cm^2, {t_cp_mix_fit:.0f} s"))

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

    stage["deformation nets"] = time.perf_counter() - stage.pop("_t0")

    def sd_bytes(name: str, module: nn.Module, how: str) -> int:
        """File bytes of a module's state dict: "fp32" dense, "bf16" dense, "int8" (matrices int8 per channel)."""
        sd = {k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}
        if how == "bf16":
            return nbytes_file(name, {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()},
                               enc="dense")
        return nbytes_file(name, sd, quantize=how == "int8", enc="dense" if how == "fp32" else "auto")

    # skinning-code decoder (issue 6's SkinCodec, shipped weights) -------------------------------------------------
    # quality: the 50k-Gaussian avatar above skinned with the weights decoded from its own weights' codes (the true
    # pose-dependent offsets applied), novel-pose PSNR against the reference renders (true weights); note: the
    # held-out LBS error of the decoded weights (evaluate_skin_codec: a phenotype never trained on, 8 poses)
    try:
        from avatar.compress.distill import codec_with_decoder, load_compact_decoder, shipped_decoder_path
        from avatar.predict.skin_codes import evaluate_skin_codec, load_skin_codec
        from avatar.skinning.lbs import lbs_points as _lbs_pts
        from tools.compress_decoder import CompressDecoderArgs, heldout_set

        codec = load_skin_codec()
        t_codec = time.perf_counter()
        dec_files = args.decoder or [shipped_decoder_path("anny")]
        compact = {}  # path -> loaded decoder (meta attached); a missing shipped file is reported, not retrained
        for path in dec_files:
            try:
                compact[Path(path)] = load_compact_decoder(path)
            except FileNotFoundError as e:
                compact[Path(path)] = e
        # held-out points: the recipe recorded in the (first) compact file, so the note's numbers are comparable
        # with its metadata; CompressDecoderArgs' defaults where no file loaded
        loaded = [d for d in compact.values() if isinstance(d, nn.Module)]
        dflt = CompressDecoderArgs()
        spec = loaded[0].meta["heldout"] if loaded else {
            "shape": dflt.heldout_shape, "samples": dflt.heldout_samples, "seed": dflt.heldout_seed,
            "poses": dflt.heldout_poses, "pose_seed": dflt.heldout_pose_seed}
        test_pts, test_shape = heldout_set(body, spec)
        with torch.no_grad():
            codes = codec.encode(weights_all)  # the avatar's own weights' codes
            w_dec = codec.decode(codes)

        def codec_quality(c) -> tuple[float, str]:
            with torch.no_grad():
                w = c.decode(codes)
                p = render_psnr(lambda f: means0 + target[f], skin_w=w)
                ev = evaluate_skin_codec(c, body, test_pts, test_shape, int(spec["poses"]), int(spec["pose_seed"]))
                # the avatar's own Gaussians under the test poses, against their true weights: PSNR follows the
                # few Gaussians a decoder sends to a wrong bone (cm), not the mean
                mm = torch.stack([(_lbs_pts(means0, w, transforms[f]) - _lbs_pts(means0, weights_all, transforms[f]))
                                  .norm(dim=-1) for f in test_ids]).amax(0) * 1000  # [N] worst test frame
            return p, (f"held-out LBS error {ev['lbs_error_mm_mean']:.3f} mm mean / {ev['lbs_error_mm_p99']:.1f} p99, "
                       f"weight L1 {ev['l1_mean']:.3f}; avatar LBS error {float(mm.mean()):.2f} mm mean, "
                       f"{int((mm > 10).sum())} Gaussians > 1 cm, max {float(mm.max()):.0f} mm; max |dw| vs dense "
                       f"{float((w - w_dec).abs().max()):.3f}")

        dec_variants = [("fp32", codec.decoder, sd_bytes("dec", codec.decoder, "fp32"), ""),
                        ("int8 dynamic", quantize_dynamic_int8(codec.decoder), sd_bytes("dec8", codec.decoder, "int8"),
                         ""),
                        ("int8 weight-only", quantize_weight_only(codec.decoder), sd_bytes("dec8", codec.decoder, "int8"),
                         "")]
        if bf_ok:
            dec_variants.append(("bf16", to_bfloat16(codec.decoder), sd_bytes("dec16", codec.decoder, "bf16"), ""))
        for path, dec in compact.items():
            if not isinstance(dec, nn.Module):
                variants.append(Variant(f"skin-code decoder compact ({path.name})", 0, 0, None, None,
                                        f"not measured: {dec}", group="codec"))
                continue
            m = dec.meta
            widths = "-".join(str(l.out_features) for l in dec if isinstance(l, nn.Linear))  # hidden..., J
            rec = " / ".join(f"{r['lbs_error_mm_mean']:.3f} ({k.rsplit('_', 1)[-1]})"
                             for k, r in m.get("val", {}).items() if k.startswith("student_int8")) or "none"
            how = (f"{path.name}: keep {m.get('keep')}, widths {widths} (last: J), {m.get('steps')} distillation + "
                   f"{m.get('qat_steps', 0)} int8-QAT steps; recorded held-out {rec} mm")
            label = f"{m.get('keep', '?')} width + distill + int8 file"
            dec_variants.append((f"{label}, fp32 compute", dec, path.stat().st_size, how))
            if bf_ok:
                dec_variants.append((f"{label}, bf16 compute", to_bfloat16(dec), path.stat().st_size, how))
            if path == Path(dec_files[0]):  # weight-only int8 kept at run time (dequantized per call)
                dec_variants.append((f"{label}, int8 weight-only fp32 compute", quantize_weight_only(dec),
                                     path.stat().st_size, how))
        for label, dec, nbytes, how in dec_variants:
            c = codec_with_decoder(codec, dec)
            q, note = codec_quality(c)
            variants.append(Variant(f"skin-code decoder {label}", n_params(dec), nbytes,
                                    (lambda c=c: c.decode(codes)), q, f"{note}; {how}" if how else note,
                                    group="codec"))
        stage["codec"] = time.perf_counter() - t_codec
    except FileNotFoundError as e:  # the shipped codec is issue 6's file; say so instead of failing the benchmark
        variants.append(Variant("skin-code decoder", 0, 0, None, None, f"not measured: {e}", group="codec"))

    # depth/skinning predictor (issue 6's DepthSkinNet, shipped weights) ---------------------------------------------
    # quality: held-out depth error (mm, mean of front and back inside the person mask) on the predictor's own
    # validation views (PredictorTrainConfig().val; quick: the first 8); codes / decoded-weight L1 in the note.
    # The compressed net is the shipped data/compressed file written by `python -m tools.compress_predictor`
    # (channel pruning to half width + distillation on the dense net's training views + int8 conv weights).
    try:
        from avatar.body.anny_body import cache_root
        from avatar.compress.predictor import CastPredictor, load_compact_predictor, parameter_count
        from avatar.predict.infer import load_predictor
        from avatar.predict.samples import cached_samples
        from avatar.predict.skin_codes import shipped_codec_path
        from avatar.predict.train import PredictorTrainConfig, evaluate_predictor, file_sha256

        from avatar.predict.skin_codes import load_skin_codec

        t_pred = time.perf_counter()
        net = load_predictor()
        codec = load_skin_codec()
        val_cfg = PredictorTrainConfig().val
        val_set = cached_samples(body, codec, val_cfg, cache_root() / "predictor-samples",
                                 file_sha256(shipped_codec_path("anny")))
        if quick:
            val_set = val_set.select(torch.arange(8))
        S = net.cfg.size
        x_in = torch.rand(4, 14, S, S, generator=gen)

        def pred_row(label: str, model, params: int, file_bytes: int, note: str = "") -> None:
            with torch.no_grad():
                ev = evaluate_predictor(model, val_set, codec)
            err = 0.5 * (ev["depth_front_mm"] + ev["depth_back_mm"])
            variants.append(Variant(f"depth/skin predictor {label}", params, file_bytes, (lambda m=model: m(x_in)),
                                    err, f"depth f/b {ev['depth_front_mm']:.2f}/{ev['depth_back_mm']:.2f} mm, codes L1 "
                                    f"{ev['codes_l1']:.4f}, weights L1 {ev['weights_l1']:.3f}{'; ' + note if note else ''}",
                                    group="pred", unit="mm"))

        pred_row("fp32 (batch 4)", net, parameter_count(net), sd_bytes("pred", net, "fp32"), "shipped weights")
        pred_row("fp32 channels-last", CastPredictor(net, torch.float32), parameter_count(net),
                 sd_bytes("pred", net, "fp32"), "same weights, oneDNN's channels-last layout")
        if bf_ok:
            pred_row("bf16 channels-last", CastPredictor(net), parameter_count(net), sd_bytes("pred_bf", net, "bf16"))
        small_path = Path(__file__).resolve().parents[2] / "data" / "compressed" / "depthskin_anny_half.safetensors"
        if small_path.is_file():
            small = load_compact_predictor(small_path)
            meta = small.meta
            how = f"{small_path.name}: widths {tuple(small.cfg.widths)}, {meta.get('steps')} distillation steps"
            pred_row("1/2 channels + distill + int8 file, fp32 channels-last", CastPredictor(small, torch.float32),
                     parameter_count(small), small_path.stat().st_size, how)
            if bf_ok:
                pred_row("1/2 channels + distill + int8 file, bf16 channels-last", CastPredictor(small),
                         parameter_count(small), small_path.stat().st_size, how)
        else:
            variants.append(Variant("depth/skin predictor 1/2 channels", 0, 0, None, None,
                                    f"not measured: {small_path} missing (python -m tools.compress_predictor)",
                                    group="pred", unit="mm"))
        stage["predictor"] = time.perf_counter() - t_pred
    except FileNotFoundError as e:
        variants.append(Variant("depth/skin predictor", 0, 0, None, None, f"not measured: {e}", group="pred",
                                unit="mm"))

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
    # residual skinning-weight field: the fitted avatar's own (avatar.fit trains it with the Gaussians) -----------
    # quality: the fitted avatar's novel-pose PSNR with each variant's weights (ground-truth renders, as the avatar
    # rows); note: weight L1 and LBS position change (test poses) against the dense field. Time: one evaluation on
    # the 50k-Gaussian set above (the per-step cost in fitting).
    t_field = time.perf_counter()
    from avatar.compress.distill import WeightSupport, densify_weights, distill_weight_field
    from avatar.skinning.lbs import lbs_points as _lbs

    field = fitted_avatar.weight_field
    field_note = "the fitted avatar's field"
    if field is None:  # a fit config without the field: a random non-zero head stands in (speed / size only)
        field = ResidualWeightField(dense_w.shape[1], hidden=64, layers=2, num_freqs=4, scale=scale,
                                    generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            field.head.weight.copy_(torch.randn(field.head.weight.shape, generator=gen) * 0.3)
        field_note = "untrained stand-in (the fit had no field)"
    field = copy.deepcopy(field).float().eval()
    fa_means = fitted_avatar.means.detach()
    fa_base = fitted_avatar.base_weights.detach()
    with torch.no_grad():
        w_field = field(fa_means, fa_base)

    def field_quality(w: Tensor) -> tuple[float, str]:
        g = GaussianSet(full_set.means, full_set.quats, full_set.scales, full_set.opacities, full_set.colors, w)
        with torch.no_grad():
            mm = torch.cat([(_lbs(fa_means, w, transforms[f]) - _lbs(fa_means, w_field, transforms[f])).norm(dim=-1)
                            for f in test_ids]) * 1000
        return avatar_psnr(g), (f"weight L1 vs dense field {float((w - w_field).abs().sum(-1).mean()):.2e}, LBS "
                                f"change {float(mm.mean()):.3f} mm mean / {float(mm.max()):.2f} max")

    q_base, n_base = field_quality(fa_base)
    variants.append(Variant("weight field fp32", n_params(field), sd_bytes("wf", field, "fp32"),
                            (lambda: field(means0, weights_all)), avatar_psnr(full_set),
                            f"{field_note}; its own effect: mean weight L1 vs base "
                            f"{float((w_field - fa_base).abs().sum(-1).mean()):.2e}", group="field"))
    variants.append(Variant("no weight field (base weights)", 0, 0, None, q_base, n_base, group="field"))
    for label, mk, how in (("int8 dynamic", quantize_dynamic_int8, "int8"), ("bf16", to_bfloat16, "bf16")):
        if how == "bf16" and not bf_ok:
            continue
        fm = copy.deepcopy(field)
        fm.body, fm.head = mk(field.body), mk(field.head)
        with torch.no_grad():
            q, note = field_quality(fm(fa_means, fa_base))
        variants.append(Variant(f"weight field {label}", n_params(field), sd_bytes(f"wf_{how}", field, how),
                                (lambda fm=fm: fm(means0, weights_all)), q, note, group="field"))
    k_sup = 8
    t0 = time.perf_counter()
    small_field, fa_support = distill_weight_field(field, fa_means, fa_base, keep=0.25, k=k_sup,
                                                   steps=100 if quick else 400, seed=0)
    t_dist = time.perf_counter() - t0
    support_50k = WeightSupport.from_base(weights_all, k_sup)  # once per Gaussian set, like a binding
    lost = float(fa_support.outside_mass(fa_base).mean())
    for label, sf, how in (("fp32", small_field, "fp32"),
                           (f"int8 file + {'bf16' if bf_ok else 'fp32'} compute",
                            to_bfloat16(small_field) if bf_ok else quantize_weight_only(small_field), "int8")):
        with torch.no_grad():
            ws, wi = sf(fa_means, fa_support)
            q, note = field_quality(densify_weights(ws, wi, fa_base.shape[1]))
        variants.append(Variant(f"weight field 1/4 width + top-{k_sup} bones + distill, {label}", n_params(small_field),
                                sd_bytes(f"wfs_{how}", small_field, how),
                                (lambda sf=sf: sf(means0, support_50k)), q,
                                f"{note}; base mass outside the top {k_sup}: {lost:.1e}; distilled {t_dist:.0f} s",
                                group="field"))
    stage["weight field"] = time.perf_counter() - t_field

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
    stage["compact avatar"] = time.perf_counter() - t_avatar - stage["avatar fit"] - stage["weight field"]

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
    variants.sort(key=lambda v: GROUPS.index(v.group))  # stable: the order within a group is kept
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
            rows.append(row(f"{v.name} | {QUALITY[v.unit]}", v.psnr, v.unit, ref(v).psnr))
    if args.json:
        import json

        print(json.dumps(rows))
        return
    print(f"\nbench_compress: subject seed {cfg.seed}, {size}x{size}, {len(cfg.cameras)} cameras, "
          f"{len(train_ids)} train / {len(test_ids)} novel-pose frames, {n_gauss} Gaussians, "
          f"{torch.get_num_threads()} torch threads; bf16: {bf_why}")
    print("ms = median CPU time of one frame (interleaved rounds): deformation of all Gaussians (net), one field "
          f"evaluation on the {n_gauss} Gaussians (field), decoding {n_gauss} codes (codec), a batch of 4 views "
          "(pred). quality: novel-pose PSNR in dB (net: vs the same Gaussians moved by the true offsets; field: the "
          "fitted avatar vs ground truth; codec: the deformation avatar skinned with decoded weights) or the held-out "
          "depth error in mm (pred, lower is better). size x, speed x and delta are against the first row of each "
          "group (its dense fp32 network, or the avatar's .ply)\n")
    w = max(len(v.name) for v in variants)
    print(f"{'variant':<{w}}  {'params':>9}  {'file B':>9}  {'size x':>6}  {'ms/frame':>9}  {'speed x':>7}  "
          f"{'quality':>11}  {'delta':>6}  note")
    last = None
    for v in variants:
        if last is not None and v.group != last:
            print()
        last = v.group
        ref_b = ref(v).file_bytes
        sx = f"{ref_b / v.file_bytes:.1f}" if v.file_bytes and ref_b else ""
        ms = f"{v.ms:.2f}" if v.ms is not None else ""
        spx = f"{ref(v).ms / v.ms:.1f}" if v.ms and ref(v).ms else ""
        ps = f"{v.psnr:.2f} {v.unit}" if v.psnr is not None else ""
        d = f"{v.psnr - ref(v).psnr:+.2f}" if v.psnr is not None and ref(v).psnr is not None else ""
        print(f"{v.name:<{w}}  {v.params:>9}  {v.file_bytes:>9}  {sx:>6}  {ms:>9}  {spx:>7}  {ps:>11}  {d:>6}  {v.note}")
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stage.items()))
    print(f"(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()

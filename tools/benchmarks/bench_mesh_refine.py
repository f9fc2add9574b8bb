"""Mesh-refinement targets on a synthetic subject: Chamfer distance of the refined canonical mesh, novel-view PSNR of
the posed refined mesh, and joint-angle correction of poses perturbed by 10 degrees per joint.

    python -m tools.benchmarks.bench_mesh_refine [--quick] [--json] [--start oracle|predicted] [--pose-noise-deg 10]
        [--steps 50,50,100,150] [--pose-lr 5e-3] [--res 384]

Setup: subject seed 3 ("free" motion, shirt and trousers, flat albedo: ``shading=False``). The fused mesh is the
fusion (``avatar.fusion``) of frame 17 in cameras 0, 6, 12, 17 of the 23-camera ring at 128x128 (``--quick``: 96),
from oracle input (ground-truth depth layers and skinning codes) or, with ``--start predicted``, from the shipped
predictor's layers (what ``fit_avatar --images`` makes). The refinement starts from the subject's body template
wrapped onto the fused mesh (``wrap_template``: offsets along the template normals, the SMPL+D form, which drops the
fused mesh's sheets of wrongly canonicalized points) and sees the images and masks (no depth: predicted depth is
biased) of every ring camera except the held-out camera 3, frames 5 and 17, rendered at 384x384 (``--quick``: 192;
``--res``), 8 random views per step; each frame's pose is shared by its 22 views. The input poses are the true ones
with every *anatomical joint* turned by ``--pose-noise-deg`` about a random axis (seeded; see below). The
refinement runs pose-only stages (shape frozen; soft silhouette + photometric terms, colours free; no rim term) on a
coarse-to-fine pyramid (1/4, 1/2, full size), then the shape stage (smooth offsets, rim + photometric terms) with
the pose still free at a lower rate; the pose unknowns are one rotation per anatomical joint
(``MeshRefineConfig.merge_twin_bones``) with a weak prior towards the input.

Why 384 px for the refinement (measured, see avatar/fit/design.md): at 128 px one pixel is about 13 mm on this
subject (it fills about a third of the image height), so a 3 mm surface correction is invisible; at 384 px the shape
stage lowers the Chamfer distance of the wrapped start instead of leaving it. The fusion keeps its own image size:
it is the baseline being compared against (not a handicapped one: the same predictor and fusion on four 256 px views of this subject, as ``fit_avatar --images`` runs them, gave 4.51 mm, against 4.16 mm at 128 px). Full mode takes about 3 minutes of refinement on 2 CPU cores, ``--quick``
about 30 seconds (too coarse and short to improve the shape: it checks the pose stages).

Which joints, and why this error measure: anny splits limbs and the spine into twin bones (``upperarm01/02``,
``lowerarm01/02``, ``upperleg01/02``, ``lowerleg01/02``, ``spine05..01``, ``neck01..03``) that move one visible
segment; images determine the product of such a chain's rotations, not how it is split, so the per-bone local angle
of a twin is not a well-posed target (the old ``angle_*`` rows: a perfect fit of the images can leave them at any
split). The anatomical joints are ``avatar.fit.mesh_refine.joint_groups``: each twin chain merged into one joint,
every other bone its own. Fingers, metacarpals, toes and eyes (a few pixels, or inside the head, at these sizes) are
neither perturbed nor corrected nor measured: nothing in the images constrains them. The perturbation turns each
remaining joint's composed rotation by exactly ``--pose-noise-deg`` (``apply_joint_deltas``: the chain's product
turns by the noise, each twin by an even share), so every measured joint starts at that error.

Rows:
- ``chamfer_*`` (mm, vs the ground-truth canonical clothed mesh; ``ratio = fused / value``, target >= 1.43, i.e. at
  least 30% lower than the fused mesh): the naked template, the fused mesh, the wrapped template (the refinement's
  start), the refined mesh;
- ``psnr_heldout_*`` (dB, held-out camera, both frames, at the refinement's image size, so not comparable across
  ``--res``; ``ratio = value / start``): the fused mesh with colours projected from the refinement's views posed by
  the input poses, and the refined mesh posed by the corrected poses;
- ``joint_angle_*`` (degrees; the target, under 3): mean over the perturbed anatomical joints and both frames of
  the geodesic angle between the composed true and estimated rotations of the joint's chain (``joint_rotations``);
  ``joint_angle_max_after``: the largest of them; ``ratio = before / value``;
- ``bone_dir_*`` (degrees): angle between the true and estimated posed world-space direction of each joint's segment
  (from the chain's first head to the farthest child head of its last bone; root excluded, it has no length): what a
  keypoint-based evaluation sees (it ignores twist about the segment);
- for comparison with earlier runs, the old per-bone rows: ``angle_all_*`` / ``angle_major_*`` (local rotation of
  each of the 104 bones / of the 36 major bones) and ``orient_major_*`` (posed world orientation of the major bones);
- ``refine_seconds``: wall time of the refinement.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from tools.benchmarks.common import emit, parser, row

TRAIN_CAMERAS = (0, 6, 12, 17)  # the fusion's input views
REFINE_CAMERAS = tuple(c for c in range(23) if c != 3)  # the refinement's views: every ring camera but the held-out one
HELDOUT_CAMERA = 3
FRAMES = (5, 17)
MINOR = ("toe", "finger", "metacarpal", "eye")
STEPS = (50, 50, 100, 150)  # pose at 1/4, 1/2, full size; then shape + pose (60 shape steps: 2.80 mm, see design.md)
STEPS_QUICK = (30, 30, 30, 20)
FUSION_RES, FUSION_RES_QUICK = 128, 96  # image size of the prediction-and-fusion stage (its baseline mesh)
REFINE_RES, REFINE_RES_QUICK = 384, 192  # image size the refinement sees


def _angles(Ra, Rb):
    c = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(c.clamp(-1, 1)))


def _psnr(a, b):
    mse = float((a - b).square().mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _predicted_fusion(sub, body, frame, cams, codec, fcfg, template):
    """The prediction-and-fusion pipeline on the subject's rendered images (what ``fit_avatar --images`` runs): the
    shipped predictor's layers fused in canonical space. Returns the fused mesh and the per-view predictions."""
    from avatar.data.synthetic import posed_vertices, render_views
    from avatar.fusion import fuse_views
    from avatar.predict.infer import load_predictor, predict_views
    from avatar.predict.views import render_depth_layers
    from avatar.types import BodyPose

    with torch.no_grad():
        images, masks = render_views(posed_vertices(sub, body, frame), sub.faces, sub.render_mesh, sub.uvs,
                                     sub.texture, cams, True, sub.config.background)
        naked = body(BodyPose(sub.motion.rotations[frame], sub.motion.translation[frame]), sub.shape).vertices[0]
        codes = codec.encode(body.dense_skin_weights().float())
        priors = [render_depth_layers(naked, body.faces, cams.viewmats[c], cams.Ks[c], cams.width, cams.height,
                                      vertex_attrs=codes) for c in range(cams.viewmats.shape[0])]
        preds = predict_views(load_predictor(), images, masks > 0.5, priors)
        return fuse_views(preds, cams, sub.bone_transforms[frame], codec, fcfg, template), preds


def _segment_ends(body, joints, rest_heads):
    """Per joint: (first bone, farthest child of the last bone) or None where the segment has no length."""
    out = []
    for chain in joints:
        kids = [j for j, p in enumerate(body.bone_parents) if p == chain[-1]]
        if not kids:
            out.append(None)
            continue
        far = max(kids, key=lambda j: float((rest_heads[j] - rest_heads[chain[0]]).norm()))
        out.append((chain[0], far) if float((rest_heads[far] - rest_heads[chain[0]]).norm()) > 0.01 else None)
    return out


def run(quick: bool, pose_noise_deg: float = 10.0, steps: tuple[int, ...] | None = None,
        pose_lr: float = 5e-3, start: str = "oracle", res: int | None = None) -> tuple[list[dict], list[str]]:
    from avatar.body import AnnyBody
    from avatar.data.synthetic import SyntheticConfig, make_subject, posed_vertices, render_frame
    from avatar.fit.mesh_refine import (MINOR_BONES, MeshRefineConfig, MeshStage, RefineView, apply_joint_deltas,
                                        joint_groups, joint_rotations, refine_mesh, wrap_template)
    from avatar.fusion import FusionConfig, body_template, fuse_views, mesh_quality, oracle_views
    from avatar.geometry.rotations import axis_angle_to_matrix
    from avatar.predict.skin_codes import load_skin_codec
    from avatar.render.mesh import render_mesh, vertex_normals
    from avatar.represent.avatar import initial_colors
    from avatar.skinning.lbs import lbs_points
    from avatar.types import BodyPose, Cameras

    torch.set_num_threads(2)
    notes = []
    body = AnnyBody()
    fres = FUSION_RES_QUICK if quick else FUSION_RES
    res = res or (REFINE_RES_QUICK if quick else REFINE_RES)
    cams_all = REFINE_CAMERAS + (HELDOUT_CAMERA,)

    def subject(size):  # the same subject (seeded) rendered at another image size
        return make_subject(SyntheticConfig(seed=3, motion="free", num_frames=max(FRAMES) + 1, width=size, height=size,
                                            rig="ring23", cameras=cams_all, texture_size=256, shading=False), body)

    sub = subject(res)
    sub_f = sub if fres == res else subject(fres)
    C = len(REFINE_CAMERAS)
    refine_cams = Cameras(sub.cameras.viewmats[:C], sub.cameras.Ks[:C], res, res)
    fi = [REFINE_CAMERAS.index(c) for c in TRAIN_CAMERAS]
    train_cams = Cameras(sub_f.cameras.viewmats[fi], sub_f.cameras.Ks[fi], fres, fres)
    held = Cameras(sub.cameras.viewmats[C:], sub.cameras.Ks[C:], res, res)
    gt_v, gt_f = sub.canonical_vertices, sub.faces
    weights = body.dense_skin_weights()

    # starting mesh: fusion of frame 17 in the training cameras, from oracle layers or from the shipped predictor
    codec = load_skin_codec()
    template = body_template(body, sub.shape)
    fcfg = FusionConfig(voxel_size=0.012 if quick else 0.01)
    with torch.no_grad():
        if start == "predicted":  # the predicted depth is not a refinement target (biased; see avatar/fit/design.md)
            fused, _ = _predicted_fusion(sub_f, body, 17, train_cams, codec, fcfg, template)
        else:
            posed17 = posed_vertices(sub_f, body, 17)
            fused = fuse_views(oracle_views(posed17, gt_f, weights, train_cams, codec), train_cams,
                               sub.bone_transforms[17], codec, fcfg, template)
    notes.append(f"fused mesh: {start} fusion (avatar.fusion) of frame 17 in cameras {TRAIN_CAMERAS}, "
                 f"{fused.vertices.shape[0]} vertices, {fused.faces.shape[0]} faces; the refinement starts from the body "
                 f"template wrapped onto it (wrap_template) and sees images and masks (no depth) of cameras "
                 f"{REFINE_CAMERAS[0]}..{REFINE_CAMERAS[-1]} but {HELDOUT_CAMERA}, frames {FRAMES}")
    offsets = wrap_template(template.vertices, template.faces, fused.vertices, fused.faces)
    start_v = template.vertices + offsets[:, None] * vertex_normals(template.vertices, template.faces)
    start_w = template.skin_weights.float()

    # views with perturbed poses: every anatomical joint (twin chains merged; no fingers, toes, eyes) turned by
    # pose_noise_deg about a random axis
    groups = joint_groups(body.bone_names, body.bone_parents, MINOR_BONES)
    # anny's root bone carries no skinning weight and its three children (pelvis.L/R, spine05) turn about its head:
    # a root rotation is the same as turning the three children, so the root is no joint of its own; it is folded
    # into its children's chains for the error and gets no noise of its own (the children's noise moves the body).
    joints = [((0,) if body.bone_parents[c[0]] == 0 else ()) + c for c in groups if c[0] != 0]
    g = torch.Generator().manual_seed(0)
    views, true_rot, noisy_rot, heldout = [], [], [], []
    for f in FRAMES:
        fr = render_frame(sub, body, f)
        rot = sub.motion.rotations[f]
        axis = torch.randn(len(groups), 3, generator=g)
        axis = axis / axis.norm(dim=-1, keepdim=True)
        axis[[k for k, c in enumerate(groups) if c[0] == 0]] = 0.0
        noisy = apply_joint_deltas(rot, axis * math.radians(pose_noise_deg), groups)
        true_rot.append(rot)
        noisy_rot.append(noisy)
        for c in range(C):
            views.append(RefineView(fr.images[c], fr.masks[c], Cameras(refine_cams.viewmats[c], refine_cams.Ks[c], res, res),
                                    BodyPose(noisy, sub.motion.translation[f]), f))
        heldout.append(fr.images[C:])
    true_rot, noisy_rot = torch.stack(true_rot), torch.stack(noisy_rot)
    if steps is None:
        steps = STEPS_QUICK if quick else STEPS
    pose_only = dict(vertices=False, w_silhouette=1.0, w_rim=0.0)
    mcfg = MeshRefineConfig(stages=(MeshStage(steps[0], lr_pose=pose_lr, scale=0.25, **pose_only),
                                    MeshStage(steps[1], lr_pose=pose_lr * 0.6, scale=0.5, **pose_only),
                                    MeshStage(steps[2], lr_pose=pose_lr * 0.6, **pose_only),
                                    MeshStage(steps[3], smooth=20.0, lr_vertices=1e-3, lr_pose=pose_lr * 0.06)),
                            views_per_step=8, progress=not quick)
    t0 = time.perf_counter()
    out = refine_mesh((start_v, template.faces), start_w, views, body, mcfg, shape=sub.shape)
    seconds = time.perf_counter() - t0

    q_t = mesh_quality(template.vertices, template.faces, gt_v, gt_f, seed=3)
    q_f = mesh_quality(fused.vertices, fused.faces, gt_v, gt_f, seed=3)
    q_w = mesh_quality(start_v, template.faces, gt_v, gt_f, seed=3)
    q_r = mesh_quality(out.vertices, out.faces, gt_v, gt_f, seed=3)

    # novel view: held-out camera, both frames
    with torch.no_grad():
        T_in, _ = body.bone_transforms(BodyPose(noisy_rot, sub.motion.translation[list(FRAMES)]), sub.shape)
        T_out, _ = body.bone_transforms(out.poses, sub.shape)
        T_true = sub.bone_transforms[list(FRAMES)]
        start_colors = initial_colors(fused.vertices, fused.skin_weights,
                                      [(v.image, v.mask, v.camera, T_in[FRAMES.index(v.frame_id)]) for v in views])
        ps_start, ps_ref = [], []
        for i in range(len(FRAMES)):
            a = render_mesh(lbs_points(fused.vertices, fused.skin_weights, T_in[i]), fused.faces, start_colors,
                            held.viewmats, held.Ks, res, res, shading=False).image
            b = render_mesh(lbs_points(out.vertices, out.skin_weights, T_out[i]), out.faces, out.colors,
                            held.viewmats, held.Ks, res, res, shading=False).image
            ps_start.append(_psnr(a, heldout[i]))
            ps_ref.append(_psnr(b, heldout[i]))

    # anatomical joints: composed rotations of each chain, and world-space segment directions
    Jt, Jin, Jout = (joint_rotations(r, joints) for r in (true_rot, noisy_rot, out.poses.rotations))  # [N, K, 3, 3]
    j_before, j_after = _angles(Jin, Jt), _angles(Jout, Jt)  # [N, K]
    rest_heads = body.rest(sub.shape).bone_heads[0]  # [J, 3]

    def heads(T):  # posed bone heads [N, J, 3] from bone transforms [N, J, 4, 4]
        return (T[..., :3, :3] @ rest_heads[..., None])[..., 0] + T[..., :3, 3]

    h_in, h_out, h_true = heads(T_in), heads(T_out), heads(T_true)
    seg = [e for e in _segment_ends(body, joints, rest_heads) if e is not None]

    def seg_err(h):
        a = torch.tensor([e[0] for e in seg])
        b = torch.tensor([e[1] for e in seg])
        d, dt = h[:, b] - h[:, a], h_true[:, b] - h_true[:, a]
        c = (d * dt).sum(-1) / (d.norm(dim=-1) * dt.norm(dim=-1))
        return torch.rad2deg(torch.arccos(c.clamp(-1, 1)))  # [N, S]

    d_before, d_after = seg_err(h_in), seg_err(h_out)

    major = [j for j, n in enumerate(body.bone_names) if not any(k in n for k in MINOR)]
    Rt = axis_angle_to_matrix(true_rot)
    e_before = _angles(axis_angle_to_matrix(noisy_rot), Rt)  # [N, J]
    e_after = _angles(axis_angle_to_matrix(out.poses.rotations), Rt)
    o_before = _angles(T_in[:, major, :3, :3], T_true[:, major, :3, :3])
    o_after = _angles(T_out[:, major, :3, :3], T_true[:, major, :3, :3])

    rows = [row("chamfer_template", q_t.chamfer_mm, "mm", q_f.chamfer_mm),
            row(f"chamfer_fused_{start}", q_f.chamfer_mm, "mm", q_f.chamfer_mm),
            row("chamfer_wrapped", q_w.chamfer_mm, "mm", q_f.chamfer_mm),
            row("chamfer_refined", q_r.chamfer_mm, "mm", q_f.chamfer_mm)]
    s0, s1 = sum(ps_start) / len(ps_start), sum(ps_ref) / len(ps_ref)
    for name, v in (("psnr_heldout_start", s0), ("psnr_heldout_refined", s1)):
        r = row(name, v, "dB", s0)
        r["ratio"] = round(v / s0, 3)
        rows.append(r)
    for name, before, after in (("joint_angle", j_before.mean(), j_after.mean()),
                                ("bone_dir", d_before.mean(), d_after.mean())):
        rows.append(row(f"{name}_before", float(before), "deg", float(before)))
        rows.append(row(f"{name}_after", float(after), "deg", float(before)))
    rows.append(row("joint_angle_max_after", float(j_after.max()), "deg", float(j_before.max())))
    for name, before, after in (("angle_all", e_before.mean(), e_after.mean()),
                                ("angle_major", e_before[:, major].mean(), e_after[:, major].mean()),
                                ("orient_major", o_before.mean(), o_after.mean())):
        rows.append(row(f"{name}_before", float(before), "deg", float(before)))
        rows.append(row(f"{name}_after", float(after), "deg", float(before)))
    rows.append(row("refine_seconds", seconds, "s", None))
    def jname(chain):
        chain = [b for b in chain if b != 0]
        return "+".join(body.bone_names[b] for b in chain) if len(chain) < 3 else \
            f"{body.bone_names[chain[0]]}..{body.bone_names[chain[-1]]}"

    worst = sorted(((float(j_after[:, k].mean()), jname(c)) for k, c in enumerate(joints)), reverse=True)[:6]
    notes.append("largest remaining joint errors (deg, mean of the frames): " + ", ".join(f"{n} {e:.1f}" for e, n in worst))
    notes.append(f"input poses: each of the {len(joints)} anatomical joints (twin chains merged; fingers, metacarpals, "
                 f"toes, eyes untouched) turned by {pose_noise_deg:g} degrees about a random axis")
    notes.append(f"fusion at {fres}x{fres}, refinement and held-out PSNR at {res}x{res}, fused cameras {TRAIN_CAMERAS} "
                 f"(held out {HELDOUT_CAMERA}), frames {FRAMES}, stages "
                 f"{steps} steps, refined mesh {out.vertices.shape[0]} vertices; one subject (seed 3)")
    return rows, notes


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pose-noise-deg", type=float, default=10.0,
                   help="rotation added to every joint of the input poses (0: exact poses, shape only)")
    p.add_argument("--steps", default=None, help="steps of the four stages (pose at 1/4, 1/2, full size; shape + pose); "
                   f"default {','.join(map(str, STEPS))} (--quick: {','.join(map(str, STEPS_QUICK))})")
    p.add_argument("--pose-lr", type=float, default=5e-3, help="learning rate of the joint angles in the first stage "
                   "(x 0.6 at the two finer levels, x 0.06 in the shape stage)")
    p.add_argument("--res", type=int, default=None, help=f"image size of the refinement's views (default {REFINE_RES}, "
                   f"--quick: {REFINE_RES_QUICK}); the fusion stays at {FUSION_RES} ({FUSION_RES_QUICK})")
    p.add_argument("--start", choices=("oracle", "predicted"), default="oracle",
                   help="starting mesh: fusion of ground-truth layers, or of the shipped predictor's (fit_avatar --images)")
    args = p.parse_args()
    steps = None if args.steps is None else tuple(int(x) for x in args.steps.split(","))
    if steps is not None and len(steps) != 4:
        p.error(f"--steps must give 4 stage lengths, got {args.steps!r}")
    rows, notes = run(args.quick, args.pose_noise_deg, steps, args.pose_lr, args.start, args.res)
    emit(rows, args.json, "Mesh refinement: Chamfer vs the fused mesh, held-out PSNR, joint-angle correction",
         f"fused mesh ({args.start} input) for chamfer, start for PSNR and angles; chamfer/angle ratio = baseline / value")
    for n in notes:
        print(f"note: {n}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()

"""Sparse-view fusion targets: Chamfer distance and normal consistency of the fused canonical mesh against the
ground-truth canonical clothed mesh of synthetic subjects, for 1, 2 and 4 views.

    python -m tools.benchmarks.bench_fusion [--quick] [--json] [--predictor PATH]

Rows per view count (medians over subjects):
- ``template``: the naked body model in the rest pose for the subject's shape (the baseline);
- ``oracle``: fused from ground-truth depth layers of the posed clothed mesh and the codes of its true weights
  (``codec.encode``), i.e. a perfect predictor: the upper bound;
- ``predicted``: fused from the network's depth and codes (``avatar.predict.infer.predict_views`` on the rendered
  images); left out, with the reason printed, while no trained predictor is available.

Chamfer rows: ``ratio = template / value`` (> 1: better than the template; the target for 4 views is >= 1.43, i.e.
at least 30% lower). Normal-consistency rows: ``ratio = value / template`` (higher is better).
Cameras of the synthetic 23-camera ring (camera 0 in front): 1 view (0), 2 views (0, 6: front and side), 4 views
(0, 6, 12, 17: about 90 degrees apart). Pose: frame 17 of the "free" motion (legs and arms bent, torso turned).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from tools.benchmarks.common import emit, parser, row

VIEW_SETS = {1: (0,), 2: (0, 6), 4: (0, 6, 12, 17)}
FRAME = 17


def _predicted_views(sub, frame, body, cams, model, codec):
    """Run the network on the subject's rendered images; priors are the posed naked body's depth layers with the
    codes of its weights (what ``fit_avatar --images`` gives the network)."""
    from avatar.data.synthetic import posed_vertices, render_views
    from avatar.predict.infer import predict_views
    from avatar.predict.views import render_depth_layers
    from avatar.types import BodyPose

    with torch.no_grad():
        verts = posed_vertices(sub, body, frame)
        images, masks = render_views(verts, sub.faces, sub.render_mesh, sub.uvs, sub.texture, cams, True,
                                     sub.config.background)
        pose = BodyPose(sub.motion.rotations[frame], sub.motion.translation[frame])
        naked = body(pose, sub.shape).vertices[0]
        codes = codec.encode(body.dense_skin_weights().float())
        priors = [render_depth_layers(naked, body.faces, cams.viewmats[c], cams.Ks[c], cams.width, cams.height,
                                      vertex_attrs=codes) for c in range(cams.viewmats.shape[0])]
        return predict_views(model, images, masks > 0.5, priors)


def run(quick: bool, predictor: str | None = None) -> tuple[list[dict], list[str]]:
    from avatar.body import AnnyBody
    from avatar.data.synthetic import SyntheticConfig, make_subject, posed_vertices
    from avatar.fusion import FusionConfig, body_template, fuse_views, mesh_quality, oracle_views
    from avatar.predict.skin_codes import load_skin_codec
    from avatar.types import Cameras

    torch.set_num_threads(2)
    body = AnnyBody()
    codec = load_skin_codec()
    notes = []
    model = None
    try:
        from avatar.predict.infer import load_predictor

        model = load_predictor(predictor)
    except (ImportError, FileNotFoundError, ValueError) as err:
        notes.append(f"predicted rows left out: no trained predictor ({type(err).__name__}: {err})")
    seeds = (3,) if quick else (3, 11, 29)
    res = 192 if quick else 384
    fcfg = FusionConfig(voxel_size=0.015 if quick else 0.01)
    results: dict[tuple[int, str], list] = {}
    seconds: dict[int, list[float]] = {}
    for seed in seeds:
        cfg = SyntheticConfig(seed=seed, motion="free", num_frames=FRAME + 1, width=res, height=res, rig="ring23",
                              cameras=VIEW_SETS[4], texture_size=256)
        sub = make_subject(cfg, body)
        verts = posed_vertices(sub, body, FRAME)
        template = body_template(body, sub.shape)
        gt_v, gt_f = sub.canonical_vertices, sub.faces
        transforms = sub.bone_transforms[FRAME]
        q_t = mesh_quality(template.vertices, template.faces, gt_v, gt_f, seed=seed)
        for n, cam_ids in VIEW_SETS.items():
            idx = [VIEW_SETS[4].index(c) for c in cam_ids]
            cams = Cameras(sub.cameras.viewmats[idx], sub.cameras.Ks[idx], res, res)
            results.setdefault((n, "template"), []).append(q_t)
            t0 = time.perf_counter()
            fused = fuse_views(oracle_views(verts, sub.faces, body.dense_skin_weights(), cams, codec), cams,
                               transforms, codec, fcfg, template)
            seconds.setdefault(n, []).append(time.perf_counter() - t0)
            results.setdefault((n, "oracle"), []).append(mesh_quality(fused.vertices, fused.faces, gt_v, gt_f, seed=seed))
            if model is not None:
                preds = _predicted_views(sub, FRAME, body, cams, model, codec)
                fused = fuse_views(preds, cams, transforms, codec, fcfg, template)
                results.setdefault((n, "predicted"), []).append(
                    mesh_quality(fused.vertices, fused.faces, gt_v, gt_f, seed=seed))
    rows = []
    for n in VIEW_SETS:
        base_c = statistics.median(q.chamfer_mm for q in results[(n, "template")])
        base_n = statistics.median(q.normal_consistency for q in results[(n, "template")])
        for kind in ("template", "predicted", "oracle"):
            if (n, kind) not in results:
                continue
            qs = results[(n, kind)]
            c = statistics.median(q.chamfer_mm for q in qs)
            nc = statistics.median(q.normal_consistency for q in qs)
            rows.append(row(f"{n}view_{kind}_chamfer", c, "mm", base_c))
            r = row(f"{n}view_{kind}_normal_consistency", nc, "", base_n)
            r["ratio"] = round(nc / base_n, 3)  # higher is better
            rows.append(r)
        rows.append(row(f"{n}view_oracle_fusion_seconds", statistics.median(seconds[n]), "s", None))
    notes.append(f"{len(seeds)} subject(s) at {res}x{res}, voxel {fcfg.voxel_size * 1000:.0f} mm, frame {FRAME} of "
                 "the 'free' motion; medians over subjects")
    return rows, notes


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--predictor", default=None, help="predictor .safetensors (default: the shipped one)")
    args = p.parse_args()
    rows, notes = run(args.quick, args.predictor)
    emit(rows, args.json, "Sparse-view fusion vs the naked template (Chamfer mm, normal consistency)",
         "naked template; chamfer ratio = template / value, >1 means closer to the clothed ground truth")
    for n in notes:
        print(f"note: {n}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()

"""Forward LBS of 100k points / Gaussians with the anny rig (104 bones), beside anny's own forward pass.

Baseline: ``anny.Anny`` forward (rest shape + kinematics + its default skinning) on its 13,718 vertices, run in the
same process. Rows report median milliseconds per call; ``fwd+bwd`` includes the backward to points and transforms.

    python tools/benchmarks/bench_skinning.py [--quick] [--json]
"""

from __future__ import annotations

import json
import time

import torch

from tools.benchmarks.common import emit, median_ms, parser, row


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    repeats = 5 if args.quick else 20
    torch.manual_seed(0)

    from avatar.body import AnnyBody, ensure_anny_export
    from avatar.skinning import dqs_points, inverse_lbs_points, lbs_points, skin_gaussians
    from avatar.types import BodyPose

    export = ensure_anny_export()
    start = time.perf_counter()
    body = AnnyBody()
    load_ms = (time.perf_counter() - start) * 1000.0
    first_build_s = json.loads((export / "meta.json").read_text()).get("build_seconds")

    import anny

    from anny.models.model_data import ModelData

    meta = json.loads((export / "meta.json").read_text())
    anny_default = anny.Anny.from_model_data(
        ModelData.load_safetensors(export / "model_data.safetensors"),
        pose_parameterization=meta["pose_parameterization"],
        bone_orientation=meta["bone_orientation"],
        root_identity_orientation=meta["root_identity_orientation"],
    )  # anny's default skinning (warp LBS)

    g = torch.Generator().manual_seed(0)
    pose = BodyPose(0.3 * torch.randn(1, body.num_bones, 3, generator=g), torch.zeros(1, 3))
    shape = body.default_shape()[None]
    rest = body.rest(shape)
    deltas = body.anny_deltas(pose, rest)
    with torch.no_grad():
        base = median_ms(lambda: anny_default(pose_parameters=deltas, phenotype_kwargs=shape), repeats)
        ours_body = median_ms(lambda: body(pose, shape), repeats)

    transforms, _ = body.bone_transforms(pose, shape)
    transforms = transforms[0]
    N = 100_000
    # 100k canonical points on the body surface with the weights of their nearest vertex
    src = torch.randint(0, body.num_vertices, (N,), generator=g)
    pts = rest.vertices[0, src] + 0.01 * torch.randn(N, 3, generator=g)
    w_sparse, idx = body.skin_weights[src], body.skin_indices[src]
    w_dense = body.dense_skin_weights()[src]
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    posed = lbs_points(pts, w_dense, transforms)

    def fwd_bwd(fn):
        def run():
            p = pts.clone().requires_grad_()
            T = transforms.clone().requires_grad_()
            out = fn(p, T)
            loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
            loss.backward()
        return run

    rows = [row("anny forward, 13,718 vertices (baseline)", base, "ms", base)]
    rows.append(row("our body forward (rest+FK+LBS), 13,718 vertices", ours_body, "ms", base))
    with torch.no_grad():
        rows.append(row("lbs_points 100k, dense weights, fwd", median_ms(lambda: lbs_points(pts, w_dense, transforms), repeats), "ms", base))
        rows.append(row("lbs_points 100k, sparse K=9, fwd", median_ms(lambda: lbs_points(pts, w_sparse, transforms, idx), repeats), "ms", base))
        rows.append(row("skin_gaussians 100k, dense, fwd", median_ms(lambda: skin_gaussians(pts, quats, w_dense, transforms), repeats), "ms", base))
        rows.append(row("inverse_lbs_points 100k, dense, fwd", median_ms(lambda: inverse_lbs_points(posed, w_dense, transforms), repeats), "ms", base))
        rows.append(row("dqs_points 100k, sparse K=9, fwd", median_ms(lambda: dqs_points(pts, w_sparse, transforms, idx), repeats), "ms", base))
    rows.append(row("lbs_points 100k, dense, fwd+bwd", median_ms(fwd_bwd(lambda p, T: lbs_points(p, w_dense, T)), repeats), "ms", base))
    rows.append(row("lbs_points 100k, sparse K=9, fwd+bwd", median_ms(fwd_bwd(lambda p, T: lbs_points(p, w_sparse, T, idx)), repeats), "ms", base))
    rows.append(row("skin_gaussians 100k, dense, fwd+bwd", median_ms(fwd_bwd(lambda p, T: skin_gaussians(p, quats, w_dense, T)), repeats), "ms", base))
    rows.append(row("AnnyBody() load from the float32 export", load_ms, "ms", None))
    if first_build_s is not None:
        rows.append(row("first use on a machine: anny build + export", float(first_build_s) * 1000.0, "ms", None))
    emit(rows, args.json, f"bench_skinning (torch {torch.__version__}, {torch.get_num_threads()} threads)",
         "anny's own forward on its 13,718 vertices")


if __name__ == "__main__":
    main()

"""The viewer's posing pipeline for 50k Gaussians on the anny rig: pose -> bone transforms -> skinned splats ->
viser's client buffer, median ms per pose update (target <= 20 ms: >= 30 pose updates per second on 2 cores).

Baseline, run in the same process: the straightforward torch float32 path (``body.bone_transforms(pose, shape)``,
``avatar.skinning.skin_gaussians`` with dense [N, 104] weights, covariance from the posed quaternion and scales,
then viser's own numpy packing of ``add_gaussian_splats``). Ours: ``viewer.posing.AvatarPoser`` (cached rest state,
the numba sparse-LBS + polar + ``R Sigma_c R^T`` kernel, the numba packer). The Gaussians sit on anny's surface with
skin weights passed through a residual softmax, so every bone keeps ~1e-9 as a fitted weight field leaves them.

    python tools/benchmarks/bench_viewer.py [--quick] [--json] [--num N]
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from tools.benchmarks.common import emit, median_cpu_ms, median_ms, parser, row


def synthetic_avatar(body, n: int, seed: int = 0):
    """``n`` Gaussians on anny's rest surface, weights from the surface with a residual-softmax perturbation."""
    from avatar.represent.avatar import sample_surface
    from avatar.types import GaussianSet

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rest = body.rest()
        s = sample_surface(rest.vertices[0], body.faces, n, g)
        w = (body.dense_skin_weights()[body.faces[s.face_ids]] * s.bary[..., None]).sum(1)
        w = torch.softmax(torch.log(w + 1e-9) + 0.1 * torch.randn(w.shape, generator=g), dim=-1)
    return GaussianSet(s.points.float(), torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.01 + 2e-3,
                       torch.rand(n, generator=g), torch.rand(n, 3, generator=g), w.float())


def viser_packing(centers, covariances, rgbs, opacities) -> np.ndarray:
    """What ``viser.SceneApi.add_gaussian_splats`` does with its arrays (viser 1.1), as the baseline's packing."""
    from viser._assignable_props_api import colors_to_uint8

    n = centers.shape[0]
    cov_triu = covariances.reshape((-1, 9))[:, np.array([0, 1, 2, 4, 5, 8])]
    return np.concatenate([np.ascontiguousarray(centers, dtype=np.float32).view(np.uint8),
                           np.zeros((n, 4), dtype=np.uint8),
                           np.ascontiguousarray(cov_triu, dtype=np.float16).view(np.uint8),
                           colors_to_uint8(rgbs), colors_to_uint8(opacities)], axis=-1).view(np.uint32)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=50_000, help="number of Gaussians (default 50,000)")
    args = p.parse_args()
    repeats = 7 if args.quick else 30

    from avatar.body import AnnyBody
    from avatar.export.bundle import Bundle
    from avatar.types import BodyPose
    from viewer.posing import AvatarPoser, pack_viser_buffer, pose_splats_reference

    body = AnnyBody()
    gaussians = synthetic_avatar(body, args.num)
    shape = body.default_shape()
    bundle = Bundle(gaussians, body.name, body.bone_names, body.bone_parents, shape, body.shape_names, {}, {}, {})
    t0 = time.perf_counter()
    poser = AvatarPoser(bundle, body)
    prepare_ms = (time.perf_counter() - t0) * 1000.0
    g = torch.Generator().manual_seed(1)
    poses = [BodyPose(0.3 * torch.randn(body.num_bones, 3, generator=g), 0.1 * torch.randn(3, generator=g))
             for _ in range(8)]
    counter = iter(range(10**9))

    def next_pose() -> BodyPose:
        return poses[next(counter) % len(poses)]

    t0 = time.perf_counter()
    T = poser.transforms(poses[0])
    pack_viser_buffer(poser.splats(T))
    first_ms = (time.perf_counter() - t0) * 1000.0  # numba: compile on a fresh machine, cache load afterwards

    def baseline():
        with torch.no_grad():
            T, _ = body.bone_transforms(next_pose(), shape)
            s = pose_splats_reference(gaussians, T[0].float())
        return viser_packing(s.centers, s.covariances, s.rgbs, s.opacities)

    def ours():
        T = poser.transforms(next_pose())
        return pack_viser_buffer(poser.splats(T))

    # the two paths give the same client buffer up to float rounding and the dropped ~1e-9 weights
    T = poser.transforms(poses[0])
    with torch.no_grad():
        s = pose_splats_reference(gaussians, T)
    b = viser_packing(s.centers, s.covariances, s.rgbs, s.opacities)
    a = pack_viser_buffer(poser.splats(T))
    center_err = float(np.abs(a[:, :3].view(np.float32) - b[:, :3].view(np.float32)).max())

    base = median_ms(baseline, repeats)
    full = median_ms(ours, repeats)
    base_cpu = median_cpu_ms(baseline, max(3, repeats // 3))
    full_cpu = median_cpu_ms(ours, repeats)
    load = os.getloadavg()[0]
    T = poser.transforms(poses[1])
    splats = poser.splats(T)
    with torch.no_grad():
        base_T = median_ms(lambda: body.bone_transforms(next_pose(), shape), repeats)
        base_skin = median_ms(lambda: pose_splats_reference(gaussians, T), repeats)
    rows = [
        row(f"pose update, {args.num:,} Gaussians: straightforward torch path (baseline)", base, "ms", base),
        row(f"pose update, {args.num:,} Gaussians: viewer.posing (ours)", full, "ms", base),
        row("  bone transforms: body.bone_transforms (baseline part)", base_T, "ms", None),
        row("  bone transforms: AvatarPoser.transforms (cached rest)", median_ms(lambda: poser.transforms(next_pose()), repeats), "ms", base_T),
        row("  skinning + covariances: torch skin_gaussians path", base_skin, "ms", None),
        row("  skinning + covariances: numba kernel", median_ms(lambda: poser.splats(T), repeats), "ms", base_skin),
        row("  packing: viser's numpy packing", median_ms(lambda: viser_packing(splats.centers, splats.covariances, splats.rgbs, splats.opacities), repeats), "ms", None),
        row("  packing: pack_viser_buffer (numba)", median_ms(lambda: pack_viser_buffer(splats), repeats), "ms", None),
        row("pose update CPU time, all threads: baseline", base_cpu, "ms", base_cpu),
        row("pose update CPU time, all threads: ours", full_cpu, "ms", base_cpu),
        row("pose updates per second (ours)", 1000.0 / full, "1/s", None),
        row("1-min load average during the run (2 cores)", load, "", None),
        row("bones per Gaussian after thresholding (max)", float(poser.prepared.num_bones_per_gaussian), "count", None),
        row("max |center difference| ours vs baseline", center_err * 1e6, "um", None),
        row("prepare (once per bundle)", prepare_ms, "ms", None),
        row("first pose update in this process (numba compile or cache load)", first_ms, "ms", None),
    ]
    emit(rows, args.json, f"bench_viewer (torch {torch.__version__}, {torch.get_num_threads()} threads)",
         "torch float32 skin_gaussians path + viser's packing")


if __name__ == "__main__":
    main()

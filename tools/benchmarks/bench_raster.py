"""Gaussian rasterization on CPU: the numba backend beside the torch reference, forward and forward+backward.

Scene: N Gaussians with means uniform in a 0.5 x 1.7 x 0.3 m box 3 m in front of one pinhole camera (the box fills
~85 % of the image height), scales 5-15 mm, random rotations, opacities in (0.1, 0.9), RGB colours. Rows report the
median milliseconds per call; ``fwd+bwd`` includes the backward to all Gaussian parameters. Baseline: the torch
reference (``backend="torch"``) timed in the same process (fewer repetitions for the large cases).

The machine's 1-minute load average is reported before and after (the benchmark machine is shared; compare
ratios, which are measured in the same process, rather than absolute times across runs); for the two target cases,
``process time`` rows give the median CPU time of a call summed over its threads, which other processes change
little (run with ``OMP_WAIT_POLICY=passive``; on two idle cores the wall time is about half of it plus the serial
glue). ``--stages`` adds one row per stage of the CPU backend (projection, sort + binning, compositing forward and
backward, slot reduction, projection backward), timed by calling its kernels directly; the rest of a call is glue.

    python tools/benchmarks/bench_raster.py [--quick] [--json] [--stages]
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from tools.benchmarks.common import emit, median_cpu_ms, median_ms, parser, row


def make_scene(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.5, 1.7, 0.3])
    quats = torch.randn(n, 4, generator=g)
    scales = 0.005 + 0.01 * torch.rand(n, 3, generator=g)
    opacities = 0.1 + 0.8 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    viewmat = torch.eye(4)
    viewmat[2, 3] = 3.0
    f = 0.85 * size * 3.0 / 1.7
    K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    return (means, quats, scales, opacities, colors), viewmat[None], K[None]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stages", action="store_true", help="also time each stage of the CPU backend")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    from avatar.render.gaussians import rasterize_gaussians

    cases = [(10_000, 256), (10_000, 512), (50_000, 256), (50_000, 512)]
    reps = 5 if args.quick else 20

    def fns(params, vm, K, size, backend):
        def fwd():
            with torch.no_grad():
                return rasterize_gaussians(*params, vm, K, size, size, backend=backend)

        leaves = [p.clone().requires_grad_(True) for p in params]

        def fwd_bwd():
            r = rasterize_gaussians(*leaves, vm, K, size, size, backend=backend)
            (r.colors.sum() + r.alphas.sum() + 0.1 * r.depths.sum()).backward()
            for p in leaves:
                p.grad = None

        return fwd, fwd_bwd

    # compile (or load the numba cache) outside the timings
    p, vm, K = make_scene(1000, 64)
    fns(p, vm, K, 64, "cpu")[1]()

    rows = []
    for n, size in cases:
        params, vm, K = make_scene(n, size)
        cpu_fwd, cpu_fb = fns(params, vm, K, size, "cpu")
        ref_fwd, ref_fb = fns(params, vm, K, size, "torch")
        big = n * size * size > 10_000 * 256 * 256
        ref_reps = 1 if (args.quick or big) else 3
        ref_warm = 0 if big else 1
        if args.quick and n == 50_000 and size == 512:
            ref_t = (None, None)  # the torch reference needs tens of seconds here; skipped in --quick
        else:
            ref_t = (median_ms(ref_fwd, ref_reps, ref_warm), median_ms(ref_fb, ref_reps, ref_warm))
        cpu_t = (median_ms(cpu_fwd, reps), median_ms(cpu_fb, reps))
        name = f"{n // 1000}k@{size}"
        rows.append(row(f"cpu fwd {name}", cpu_t[0], "ms", ref_t[0]))
        rows.append(row(f"cpu fwd+bwd {name}", cpu_t[1], "ms", ref_t[1]))
        if n == 50_000 and size == 512:
            rows.append(row(f"cpu fwd {name} fps", 1000.0 / cpu_t[0], "fps", None))
        if (n, size) in ((10_000, 256), (50_000, 512)):  # the work itself, whatever else runs on the machine
            rows.append(row(f"cpu fwd {name} process time", median_cpu_ms(cpu_fwd, reps), "ms cpu", None))
            rows.append(row(f"cpu fwd+bwd {name} process time", median_cpu_ms(cpu_fb, reps), "ms cpu", None))
        if args.stages and size * size * n in (10_000 * 256 * 256, 50_000 * 512 * 512):
            rows.extend(stage_rows(params, vm, K, size, name, reps))
    rows.extend(mesh_rows(5 if args.quick else 20))
    rows.append(row("load average (1 min) at start", load0, "load", None))
    rows.append(row("load average (1 min) at end", os.getloadavg()[0], "load", None))
    emit(rows, args.json, __doc__.splitlines()[0],
         "torch reference backend (same process); mesh rows: the Pillow painter's-algorithm preview of the same mesh")


def stage_rows(params, vm, K, size: int, name: str, reps: int) -> list[dict]:
    """Milliseconds per stage of the CPU backend on one scene, each kernel called directly on the arrays the glue of
    ``gaussians_cpu`` would pass (so ``fwd`` / ``fwd+bwd`` minus the stages is the glue: conversions, allocations,
    autograd)."""
    from avatar.render import gaussians_cpu as G
    from avatar.render.gaussians_torch import ALPHA_MAX, ALPHA_MIN, EPS2D, EXTEND_MAX, FAR, NEAR, T_MIN

    k = G._kernels()
    means, quats, scales, opac, colors = params
    C, N, W = 1, means.shape[0], size
    tw = math.ceil(W / G.TILE_W)
    m2d, con = np.empty((C, N, 2), np.float32), np.empty((C, N, 3), np.float32)
    dep, rad = np.empty((C, N), np.float32), np.empty((C, N, 2), np.int32)
    a64 = [G._np(x, np.float64) for x in (means, quats, scales, opac, vm, K)]

    def project():
        k["project_fwd"](*a64, float(W), float(W), NEAR, FAR, EPS2D, ALPHA_MIN, EXTEND_MAX, m2d, con, dep, rad)

    project()
    key, nvalid = np.empty((C, N), np.float32), np.empty(C, np.int64)

    def sort_bin():
        k["depth_keys"](rad, dep, key, nvalid)
        order = np.argsort(key, axis=1).astype(np.int64, copy=False)
        return k["bin_tiles"](m2d, rad, order, nvalid, tw, tw, G.TILE_W, G.TILE_H, True)  # with the slots

    offsets, gids, gstart, slots = sort_bin()
    ft = np.concatenate([colors.numpy()[None], dep[..., None]], -1).astype(np.float32)
    op, bg = np.ascontiguousarray(opac.numpy()[None], np.float32), np.zeros(3, np.float32)
    out, zimg = np.empty((C, W, W, 3), np.float32), np.empty((C, W, W), np.float32)
    alphas, tfinal = np.empty((C, W, W), np.float32), np.empty((C, W, W), np.float32)
    ncon = np.empty((C, W, W), np.int32)
    lanes = G.LANE_KERNELS  # what the glue runs for RGB + depth
    amin, tmin = np.float32(ALPHA_MIN), np.float32(T_MIN)
    boxes = np.empty((C, N, 3), np.float32)  # ellipse box of each Gaussian, computed by the forward (as in the glue)

    def fwd():
        if lanes:
            k["ellipse_boxes"](con, op, amin, boxes)
            k["raster_fwd4"](m2d, con, op, ft, boxes, offsets, gids, W, W, tw, tw, amin, ALPHA_MAX, tmin, bg, out,
                             zimg, alphas, tfinal, ncon)
        else:
            k["raster_fwd"](m2d, con, op, ft, offsets, gids, W, W, tw, tw, G.TILE_W, G.TILE_H, amin, ALPHA_MAX, tmin,
                            bg, out, zimg, alphas, tfinal, ncon)

    fwd()
    g_out, g_one = np.ones((C, W, W, 3), np.float32), np.ones((C, W, W), np.float32)
    gslot = np.zeros((len(gids), 10), np.float32)

    def bwd():
        if lanes:
            k["raster_bwd4"](m2d, con, op, ft, boxes, offsets, gids, W, W, tw, tw, amin, ALPHA_MAX, bg, tfinal, ncon,
                             g_out, g_one, g_one, gslot)
        else:
            k["raster_bwd"](m2d, con, op, ft, offsets, gids, W, W, tw, tw, G.TILE_W, G.TILE_H, amin, ALPHA_MAX, bg,
                            tfinal, ncon, g_out, g_one, g_one, gslot)

    g_m2d, g_con = np.empty((C, N, 2), np.float32), np.empty((C, N, 3), np.float32)
    g_op, g_ft = np.empty((C, N), np.float32), np.empty((C, N, 4), np.float32)

    def reduce():
        k["reduce_slots"](gslot, gstart, slots, N, g_m2d, g_con, g_op, g_ft)

    gm, gq, gs = np.empty((N, 3)), np.empty((N, 4)), np.empty((N, 3))
    g2, g3, g1 = np.ones((C, N, 2)), np.ones((C, N, 3)), np.ones((C, N))

    def project_bwd():
        k["project_bwd"](a64[0], a64[1], a64[2], a64[4], a64[5], float(W), float(W), EPS2D, rad, g2, g3, g1, gm, gq, gs)

    kind = "8-lane" if lanes else "per-pixel"
    return [row(f"  stage {label} {name}", median_ms(f, reps), "ms", None) for label, f in (
        ("projection", project), ("sort+binning", sort_bin), (f"composite fwd ({kind})", fwd),
        (f"composite bwd ({kind})", bwd), ("slot reduce", reduce), ("projection bwd", project_bwd))]


def mesh_rows(reps: int) -> list[dict]:
    """The mesh rasterizer on the anny body (27,420 faces) at 512x512, camera 3 m away, body filling the height."""
    from avatar.body import AnnyBody
    from avatar.geometry import intrinsics_from_fov, look_at
    from avatar.render import rasterize, rasterize_visibility, render_mesh, render_mesh_preview

    body = AnnyBody()
    verts = body.rest().vertices[0]
    faces = body.faces
    center = verts.mean(0)
    viewmat = look_at(center + torch.tensor([0.0, -3.0, 0.0]), center, torch.tensor([0.0, 0.0, 1.0]))
    K = intrinsics_from_fov(35.0, 512, 512)
    pix = (verts @ viewmat[:3, :3].T + viewmat[:3, 3]) @ K.T
    z = pix[:, 2:].clone()
    pix = (pix[:, :2] / z).double().numpy()[None]
    zz = z[:, 0].double().numpy()[None]
    f = faces.numpy()
    rasterize_visibility(pix, zz, f, 512, 512)  # compile / load the cache
    base = median_ms(lambda: render_mesh_preview(verts, faces, viewmat, K, 512, 512), max(3, reps // 4))
    vis = median_ms(lambda: rasterize_visibility(pix, zz, f, 512, 512), reps)
    full = median_ms(lambda: rasterize(verts, faces, viewmat[None], K[None], 512, 512), reps)
    colors = torch.rand(verts.shape[0], 3, generator=torch.Generator().manual_seed(0))
    rend = median_ms(lambda: render_mesh(verts, faces, colors, viewmat[None], K[None], 512, 512), max(3, reps // 2))
    return [
        row("mesh preview (Pillow) 27k faces@512 (baseline)", base, "ms", base),
        row("mesh visibility pass 27k faces@512", vis, "ms", base),
        row("mesh rasterize (visibility + torch barycentrics)", full, "ms", base),
        row("mesh render_mesh (colour, alpha, depth, normals)", rend, "ms", base),
    ]


if __name__ == "__main__":
    main()

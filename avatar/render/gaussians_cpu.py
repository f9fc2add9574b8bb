"""Compiled, multi-threaded CPU backend for 3D Gaussian splatting with a hand-written backward.

Why hand-written: no installable library rasterizes Gaussians fast on CPU *with gradients* (gsplat's per-pixel
rasterization step is CUDA only; its torch fallback materialises pixel x Gaussian tensors and is slow), so the
forward and backward are written here as numba kernels, wrapped in two ``torch.autograd.Function``s:

* ``_ProjectFn``: EWA projection of ``means/quats/scales`` to ``means2d``, ``conics``, ``depths`` (+ integer radii);
  backward gives gradients to means, quats (through normalization) and scales. Parallel over Gaussians, so the
  sum over cameras needs no atomics; the small per-Gaussian matrices live in stack arrays (a heap array per
  matrix cost more than the arithmetic: 1.9x slower backward).
* ``_CompositeFn``: 16x16 tiles; Gaussians sorted by depth once per camera (numpy), per-tile lists built in
  parallel (each camera's sorted list cut into chunks that are counted, prefix-summed and filled in depth order).
  Each tile (``numba.prange``) loops over its Gaussians front to back and, for each, only over the pixels of the box
  where alpha can reach 1/255 clipped to the tile; it stops once all its pixels reached the transmittance floor. The
  backward re-traverses each tile back to front from the saved final transmittance and per-pixel contributor count
  (3DGS paper), writes one gradient slot per (Gaussian, tile) pair from the thread owning the tile, then reduces
  slots per Gaussian (no races, no atomics). It returns the colour image (background composited in the kernel), the
  alpha image and the depth image as three separate arrays, and takes opacities and colours shared by all cameras,
  so that no torch op runs on image-sized or N-sized tensors between or around the kernels (no slice, ``cat``,
  ``expand`` backward, dtype conversion or background blend in torch; numpy does the little glue there is, on the
  calling thread).

  Two kernel families: for 4 channels (RGB + depth, what ``rasterize`` renders) ``raster_fwd4`` / ``raster_bwd4``
  process each (Gaussian, tile row) as one or two groups of 8 branch-free float32 lanes (one 256-bit register), only
  the halves of the row that the ellipse's box touches, with all per-tile state in stack arrays (``stack_array``):
  LLVM then vectorizes each group without run-time overlap checks, which it refuses for loops shorter than 16
  (heap arrays made the same loops scalar). Any other channel count runs on the per-pixel ``raster_fwd`` /
  ``raster_bwd``, 2-3x slower. See ``avatar/render/design.md`` for what was measured.

Why the glue avoids torch: torch's intra-op pool and numba's parallel kernels run on OpenMP threads, and an idle
libgomp thread spin-waits (up to ~300k ``pause`` instructions, milliseconds on recent Xeons) before it sleeps. On
the 2-core benchmark machine every torch op on more than ~32k elements between two kernels paid for that: at 50k
Gaussians @ 512x512 torch's ``isfinite``/``any``/``to`` in the old glue took ~10-15 ms each after a kernel instead of
~0.2 ms, ~20 % of a fwd+bwd call on an otherwise idle machine and 2-4x the whole call when other processes load it.
On a shared machine also set ``OMP_WAIT_POLICY=passive`` in the environment before Python starts (setting it from
this module, before numba starts its threads, measured no effect); see ``avatar/render/design.md``.

Conventions are those of ``gaussians_torch`` (gsplat v1.5). numba is imported lazily and kernels are compiled on
first use (``cache=True`` keeps them on disk), so ``import avatar`` compiles nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from avatar.render.gaussians_torch import ALPHA_MAX, ALPHA_MIN, EPS2D, EXTEND_MAX, FAR, NEAR, T_MIN

# Tile shape of this backend (gsplat's 16x16). Any shape gives the same image: a pixel where alpha can reach 1/255
# always lies inside the Gaussian's radius box, hence in a tile that the box overlaps (32x8, 64x4 measured no faster).
TILE_W = 16
TILE_H = 16
LANE_KERNELS = True  # 4 channels on the 8-lane kernels (False: the per-pixel ones, which take any channel count)
BIN_CHUNKS = 8  # parallel chunks of each camera's depth-sorted list in the binning
_KERNELS = None
_fexp = None  # numba fast exp, set by _kernels()
_vexp = None  # the same, vectorizable (float floor + bitcast), set by _kernels()
_ellipse_rows = None  # per-Gaussian row range and per-row column span of the alpha >= 1/255 ellipse
_ellipse_span = None
_bits_to_f32 = None
_fwd_group = None  # 8-lane pieces of the compositing kernels, set by _kernels()
_bwd_group = None
_stack_array = None  # np.zeros on the stack, set by _kernels()
_stack_matrix = None


def _kernels():  # noqa: C901 - one place that defines all numba kernels
    """Define (once) and return the numba kernels. They take no closure variables, so ``cache=True`` works."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import numba
    from numba import prange

    pjit = numba.njit(parallel=True, cache=True, fastmath=True)

    @numba.njit(cache=True, fastmath=True, inline="always")
    def fexp(x):
        """exp for float32 via 2^x = 2^k * 2^t, |t| <= 1/2 (degree-6 polynomial, ~1e-7 relative error)."""
        y = min(max(x * np.float32(1.4426950408889634), np.float32(-126.0)), np.float32(126.0))
        k = math.floor(y + np.float32(0.5))
        t = y - np.float32(k)
        p = np.float32(1.0) + t * (np.float32(0.6931471805599453) + t * (np.float32(0.2402265069591007) + t * (
            np.float32(0.05550410866482158) + t * (np.float32(0.009618129107628477) + t * (
                np.float32(0.0013333558146428443) + t * np.float32(0.00015403530393381606))))))
        return p * np.int32((int(k) + 127) << 23).view(np.float32)

    global _fexp
    _fexp = fexp  # the kernels below call it as a module global (closures would defeat cache=True)

    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def bits_to_f32(typingctx, x):
        """Reinterpret int32 bits as float32 (an LLVM bitcast, so loops using it still vectorize)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.int32), codegen

    @numba.njit(cache=True, fastmath=True, inline="always")
    def vexp(x):
        """``fexp`` written with float floor and a bitcast only, so that LLVM vectorizes loops calling it."""
        y = min(max(x * np.float32(1.4426950408889634), np.float32(-126.0)), np.float32(126.0))
        k = np.floor(y + np.float32(0.5))
        t = y - k
        p = np.float32(1.0) + t * (np.float32(0.6931471805599453) + t * (np.float32(0.2402265069591007) + t * (
            np.float32(0.05550410866482158) + t * (np.float32(0.009618129107628477) + t * (
                np.float32(0.0013333558146428443) + t * np.float32(0.00015403530393381606))))))
        return p * _bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))

    def _stack_codegen(arrty, shape):
        def codegen(context, builder, signature, args):
            from numba.core import cgutils
            from numba.np.arrayobj import make_array, populate_array

            lty = context.get_data_type(arrty.dtype)
            size = 1
            for d in shape:
                size *= d
            ptr = cgutils.alloca_once(builder, lty, size=size)
            isz = context.get_abi_sizeof(lty)
            cgutils.memset(builder, ptr, context.get_constant(types.intp, size * isz), 0)  # zeros where called
            ary = make_array(arrty)(context, builder)
            strides = [isz * math.prod(shape[i + 1:]) for i in range(len(shape))]
            intp = context.get_value_type(types.intp)
            populate_array(ary, data=ptr, shape=cgutils.pack_array(builder, [intp(d) for d in shape]),
                           strides=cgutils.pack_array(builder, [intp(st) for st in strides]), itemsize=intp(isz),
                           meminfo=None)
            return ary._getvalue()
        return codegen

    @intrinsic
    def stack_array(typingctx, n, dtype):
        """``np.zeros(n, dtype)`` for a literal ``n``, in the calling function's stack frame (an LLVM ``alloca`` in
        its entry block, zero-filled where called: evaluated again, e.g. in a loop, it re-zeroes the same memory; not
        reference counted, so it must not outlive the call). Unlike a
        heap array, LLVM knows that an alloca aliases nothing else: loops over several of them vectorize without
        run-time overlap checks (which LLVM refuses for trip counts under 16), and small per-item scratch arrays
        cost no allocation."""
        if not isinstance(n, types.IntegerLiteral) or not isinstance(dtype, types.NumberClass):
            return None
        arrty = types.Array(dtype.instance_type, 1, "C")
        return arrty(n, dtype), _stack_codegen(arrty, (n.literal_value,))

    @intrinsic
    def stack_matrix(typingctx, n0, n1, dtype):
        """``np.zeros((n0, n1), dtype)`` on the stack, as ``stack_array``."""
        if not (isinstance(n0, types.IntegerLiteral) and isinstance(n1, types.IntegerLiteral)
                and isinstance(dtype, types.NumberClass)):
            return None
        arrty = types.Array(dtype.instance_type, 2, "C")
        return arrty(n0, n1, dtype), _stack_codegen(arrty, (n0.literal_value, n1.literal_value))

    global _stack_array, _stack_matrix
    _stack_array = stack_array
    _stack_matrix = stack_matrix

    global _bits_to_f32, _vexp
    _bits_to_f32 = bits_to_f32
    _vexp = vexp

    @numba.njit(cache=True, fastmath=True, inline="always")
    def ellipse_rows(A, B, Cc, op, my, amin, ty0, bh):
        """Pixels where a Gaussian's alpha reaches ``amin``: sigma = 0.5 d^T conic d <= lvl, an ellipse. Returns
        ``(lim, y0, y1)``: twice the level (slightly widened) and the tile rows [y0, y1) it spans (empty if none)."""
        lvl = np.float32(math.log(op / amin))
        det = A * Cc - B * B
        if lvl <= 0 or det <= 0 or A <= 0:
            return np.float32(0.0), 0, 0
        lim = np.float32(2.0) * (lvl * np.float32(1.0001) + np.float32(1e-4))
        hy = np.float32(math.sqrt(lim * A / det)) + np.float32(0.01)
        y0 = max(ty0, int(math.ceil(my - hy - np.float32(0.5))))
        y1 = min(ty0 + bh, int(math.floor(my + hy - np.float32(0.5))) + 1)
        return lim, y0, y1

    @numba.njit(cache=True, fastmath=True, inline="always")
    def ellipse_span(A, B, Cc, lim, mx, dy, tx0, bw):
        """The pixel columns [x0, x1) of the ellipse of ``ellipse_rows`` on the row at ``dy = my - y_centre``:
        centre mx - dxc with dxc = -B dy / A, half width sqrt(lim / A - det dy^2 / A^2)."""
        invA = np.float32(1.0) / A
        h2 = lim * invA - (A * Cc - B * B) * invA * invA * dy * dy
        if h2 < 0:
            return 0, 0
        hw = np.float32(math.sqrt(h2))
        xc = mx + B * invA * dy - np.float32(0.5)
        return max(tx0, int(math.ceil(xc - hw))), min(tx0 + bw, int(math.floor(xc + hw)) + 1)

    global _ellipse_rows, _ellipse_span
    _ellipse_rows = ellipse_rows
    _ellipse_span = ellipse_span

    @numba.njit(cache=True, fastmath=True, inline="always")
    def fwd_group(l0, Trow, rn, r0, r1, r2, r3, lanef, mx, nha, bdy, cst, op, f0, f1, f2, f3, amax, amin, tmin, jn):
        """Blend one Gaussian (4 channels) into the 8 lanes ``l0 .. l0 + 7`` of a tile row, branch-free: one AVX
        register of float32. ``l0`` is a literal 0 or 8 at the call sites, so after inlining the loop has a fixed
        trip count, and all arrays are stack arrays, so LLVM vectorizes it without overlap checks. Finished lanes
        carry a negative transmittance. Returns whether this Gaussian finished a lane."""
        one = np.float32(1.0)
        zero = np.float32(0.0)
        anyfin = False
        for q in range(8):
            lx = l0 + q
            dx = mx - lanef[lx]
            al = min(amax, op * _vexp(nha * dx * dx + bdy * dx + cst))
            Tc = Trow[lx]
            nT = Tc * (one - al)
            ok = (al >= amin) & (Tc > zero)
            fin = ok & (nT <= tmin)
            con = ok & (nT > tmin)
            w = al * Tc if con else zero
            r0[lx] += f0 * w
            r1[lx] += f1 * w
            r2[lx] += f2 * w
            r3[lx] += f3 * w
            Trow[lx] = nT if con else (-Tc if fin else Tc)
            rn[lx] = jn if con else rn[lx]
            anyfin |= fin
        return anyfin

    @numba.njit(cache=True, fastmath=True, inline="always")
    def bwd_group(l0, jj32, Trow, nrow, trow, c0, c1, c2, c3, prow, lanef, gacc,
                  mx, dy, A, B, Cc, nha, bdy, cst, op, f0, f1, f2, f3, amax, amin):
        """The backward of ``fwd_group`` on the same 8 lanes in one branch-free pass: un-blends the transmittance
        (``Trow`` goes from behind to in front of this Gaussian), updates ``prow`` = sum_k dL/dout_k * (channel k
        composited behind the current Gaussian) and adds the per-lane gradients to ``gacc`` [10 x 8]: 4 channels,
        opacity, mx, my, and conic a, b, c without their factor 1/2 (summed over the lanes once per Gaussian and
        tile). ``c0..c3`` are dL/dout of the 4 channels."""
        one = np.float32(1.0)
        zero = np.float32(0.0)
        for q in range(8):
            lx = l0 + q
            dx = mx - lanef[lx]
            G = _vexp(nha * dx * dx + bdy * dx + cst)
            raw = op * G
            al = min(amax, raw)
            v = (jj32 < nrow[lx]) & (al >= amin)
            inv = one / (one - al)
            Tb = Trow[lx] * inv  # transmittance in front of this Gaussian
            w = al * Tb if v else zero
            Trow[lx] = Tb if v else Trow[lx]
            g0 = c0[lx]
            g1 = c1[lx]
            g2 = c2[lx]
            g3 = c3[lx]
            gdf = g0 * f0 + g1 * f1 + g2 * f2 + g3 * f3
            pb = prow[lx]
            gacc[q] += g0 * w
            gacc[8 + q] += g1 * w
            gacc[16 + q] += g2 * w
            gacc[24 + q] += g3 * w
            # dL/dalpha = T_final dL/dalpha_pixel / (1 - alpha) + sum_k g_k (T f_k - S_k / (1 - alpha))
            ga = trow[lx] * inv + Tb * gdf - pb * inv
            prow[lx] = pb + gdf * w
            ga = ga if (v & (raw < amax)) else zero  # alpha clamped at amax: no gradient through it
            gacc[32 + q] += ga * G
            gs = -ga * raw
            gacc[40 + q] += gs * (A * dx + B * dy)
            gacc[48 + q] += gs * (Cc * dy + B * dx)
            gacc[56 + q] += gs * dx * dx
            gacc[64 + q] += gs * dx * dy
            gacc[72 + q] += gs * dy * dy

    global _fwd_group, _bwd_group
    _fwd_group = fwd_group
    _bwd_group = bwd_group

    @pjit
    def project_fwd(means, quats, scales, opac, viewmats, Ks, W, H, near, far, eps2d, amin, emax,
                    means2d, conics, depths, radii):
        N = means.shape[0]
        C = viewmats.shape[0]
        for n in prange(N):
            qw, qx, qy, qz = (np.float64(quats[n, 0]), np.float64(quats[n, 1]), np.float64(quats[n, 2]),
                              np.float64(quats[n, 3]))  # float64 arithmetic for float32 input too
            qn = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
            w, x, y, z = qw / qn, qx / qn, qy / qn, qz / qn
            R = _stack_matrix(3, 3, np.float64)
            R[0, 0] = 1 - 2 * (y * y + z * z); R[0, 1] = 2 * (x * y - w * z); R[0, 2] = 2 * (x * z + w * y)  # noqa
            R[1, 0] = 2 * (x * y + w * z); R[1, 1] = 1 - 2 * (x * x + z * z); R[1, 2] = 2 * (y * z - w * x)  # noqa
            R[2, 0] = 2 * (x * z - w * y); R[2, 1] = 2 * (y * z + w * x); R[2, 2] = 1 - 2 * (x * x + y * y)  # noqa
            S = _stack_matrix(3, 3, np.float64)  # world covariance M M^T, M = R diag(s)
            for i in range(3):
                for j in range(3):
                    acc = 0.0
                    for k in range(3):
                        acc += R[i, k] * R[j, k] * scales[n, k] * scales[n, k]
                    S[i, j] = acc
            op = opac[n]
            for c in range(C):
                radii[c, n, 0] = 0
                radii[c, n, 1] = 0
                means2d[c, n, 0] = 0.0; means2d[c, n, 1] = 0.0  # noqa
                conics[c, n, 0] = 0.0; conics[c, n, 1] = 0.0; conics[c, n, 2] = 0.0  # noqa
                depths[c, n] = 0.0
                V = viewmats[c]
                p = _stack_array(3, np.float64)
                for i in range(3):
                    p[i] = V[i, 0] * means[n, 0] + V[i, 1] * means[n, 1] + V[i, 2] * means[n, 2] + V[i, 3]
                tz = p[2]
                if not (tz >= near and tz <= far) or op < amin:
                    continue
                Sc = _stack_matrix(3, 3, np.float64)  # V S V^T
                for i in range(3):
                    for j in range(3):
                        acc = 0.0
                        for k in range(3):
                            for m in range(3):
                                acc += V[i, k] * S[k, m] * V[j, m]
                        Sc[i, j] = acc
                fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
                tfx, tfy = 0.5 * W / fx, 0.5 * H / fy
                ux = min(max(p[0] / tz, -(cx / fx + 0.3 * tfx)), (W - cx) / fx + 0.3 * tfx)
                uy = min(max(p[1] / tz, -(cy / fy + 0.3 * tfy)), (H - cy) / fy + 0.3 * tfy)
                j00, j02, j11, j12 = fx / tz, -fx * ux / tz, fy / tz, -fy * uy / tz
                a = j00 * j00 * Sc[0, 0] + 2 * j00 * j02 * Sc[0, 2] + j02 * j02 * Sc[2, 2] + eps2d
                b = j00 * j11 * Sc[0, 1] + j00 * j12 * Sc[0, 2] + j02 * j11 * Sc[2, 1] + j02 * j12 * Sc[2, 2]
                cc = j11 * j11 * Sc[1, 1] + 2 * j11 * j12 * Sc[1, 2] + j12 * j12 * Sc[2, 2] + eps2d
                det = a * cc - b * b
                if not det > 0:
                    continue
                mx = fx * p[0] / tz + cx
                my = fy * p[1] / tz + cy
                ext = min(emax, math.sqrt(2.0 * math.log(op / amin)))
                rx = math.ceil(ext * math.sqrt(a))
                ry = math.ceil(ext * math.sqrt(cc))
                if rx <= 0 and ry <= 0:
                    continue
                if mx + rx <= 0 or mx - rx >= W or my + ry <= 0 or my - ry >= H:
                    continue
                radii[c, n, 0] = int(rx)
                radii[c, n, 1] = int(ry)
                means2d[c, n, 0] = mx
                means2d[c, n, 1] = my
                conics[c, n, 0] = cc / det
                conics[c, n, 1] = -b / det
                conics[c, n, 2] = a / det
                depths[c, n] = tz

    @pjit
    def project_bwd(means, quats, scales, viewmats, Ks, W, H, eps2d, radii, g_m2d, g_con, g_dep,
                    g_means, g_quats, g_scales):
        N = means.shape[0]
        C = viewmats.shape[0]
        for n in prange(N):
            qw, qx, qy, qz = (np.float64(quats[n, 0]), np.float64(quats[n, 1]), np.float64(quats[n, 2]),
                              np.float64(quats[n, 3]))  # float64 arithmetic for float32 input too
            qn = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
            w, x, y, z = qw / qn, qx / qn, qy / qn, qz / qn
            R = _stack_matrix(3, 3, np.float64)
            R[0, 0] = 1 - 2 * (y * y + z * z); R[0, 1] = 2 * (x * y - w * z); R[0, 2] = 2 * (x * z + w * y)  # noqa
            R[1, 0] = 2 * (x * y + w * z); R[1, 1] = 1 - 2 * (x * x + z * z); R[1, 2] = 2 * (y * z - w * x)  # noqa
            R[2, 0] = 2 * (x * z - w * y); R[2, 1] = 2 * (y * z + w * x); R[2, 2] = 1 - 2 * (x * x + y * y)  # noqa
            M = _stack_matrix(3, 3, np.float64)
            for i in range(3):
                for k in range(3):
                    M[i, k] = R[i, k] * scales[n, k]
            S = _stack_matrix(3, 3, np.float64)  # M M^T (explicit loops: numba's @ needs scipy/BLAS)
            for i in range(3):
                for j in range(3):
                    for k in range(3):
                        S[i, j] += M[i, k] * M[j, k]
            GS = _stack_matrix(3, 3, np.float64)  # dL/dSigma (world), symmetric
            gp = _stack_array(3, np.float64)
            for c in range(C):
                if radii[c, n, 0] == 0 and radii[c, n, 1] == 0:
                    continue
                V = _stack_matrix(3, 3, np.float64)
                for i in range(3):
                    for j in range(3):
                        V[i, j] = viewmats[c, i, j]
                p = _stack_array(3, np.float64)
                for i in range(3):
                    p[i] = V[i, 0] * means[n, 0] + V[i, 1] * means[n, 1] + V[i, 2] * means[n, 2] + viewmats[c, i, 3]
                tx, ty, tz = p[0], p[1], p[2]
                Sc = _stack_matrix(3, 3, np.float64)  # V S V^T
                for i in range(3):
                    for j in range(3):
                        for k in range(3):
                            for m in range(3):
                                Sc[i, j] += V[i, k] * S[k, m] * V[j, m]
                fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
                tfx, tfy = 0.5 * W / fx, 0.5 * H / fy
                rx0, rx1 = -(cx / fx + 0.3 * tfx), (W - cx) / fx + 0.3 * tfx
                ry0, ry1 = -(cy / fy + 0.3 * tfy), (H - cy) / fy + 0.3 * tfy
                ux, uy = tx / tz, ty / tz
                clip_x = ux < rx0 or ux > rx1
                clip_y = uy < ry0 or uy > ry1
                ux = min(max(ux, rx0), rx1)
                uy = min(max(uy, ry0), ry1)
                J = _stack_matrix(2, 3, np.float64)
                J[0, 0] = fx / tz; J[0, 2] = -fx * ux / tz; J[1, 1] = fy / tz; J[1, 2] = -fy * uy / tz  # noqa
                S2 = _stack_matrix(2, 2, np.float64)  # J Sc J^T
                JS = _stack_matrix(2, 3, np.float64)  # J Sc
                for i in range(2):
                    for j in range(3):
                        for k in range(3):
                            JS[i, j] += J[i, k] * Sc[k, j]
                for i in range(2):
                    for j in range(2):
                        for k in range(3):
                            S2[i, j] += JS[i, k] * J[j, k]
                a = S2[0, 0] + eps2d
                b = 0.5 * (S2[0, 1] + S2[1, 0])
                cc = S2[1, 1] + eps2d
                det = a * cc - b * b
                iA, iB, iC = cc / det, -b / det, a / det
                gA, gB, gC = g_con[c, n, 0], 0.5 * g_con[c, n, 1], g_con[c, n, 2]
                # dL/dSigma2D = -inv G inv with G = [[gA, gB], [gB, gC]]
                t00 = iA * gA + iB * gB; t01 = iA * gB + iB * gC  # noqa
                t10 = iB * gA + iC * gB; t11 = iB * gB + iC * gC  # noqa
                G2 = _stack_matrix(2, 2, np.float64)
                G2[0, 0] = -(t00 * iA + t01 * iB)
                G2[0, 1] = -(t00 * iB + t01 * iC)
                G2[1, 0] = -(t10 * iA + t11 * iB)
                G2[1, 1] = -(t10 * iB + t11 * iC)
                GSc = _stack_matrix(3, 3, np.float64)  # J^T G2 J
                for i in range(3):
                    for j in range(3):
                        for k in range(2):
                            for m in range(2):
                                GSc[i, j] += J[k, i] * G2[k, m] * J[m, j]
                GJ = _stack_matrix(2, 3, np.float64)  # 2 G2 J Sc
                for i in range(2):
                    for j in range(3):
                        for k in range(2):
                            GJ[i, j] += 2.0 * G2[i, k] * JS[k, j]
                gtx = 0.0
                gty = 0.0
                gtz = g_dep[c, n]
                gtz += GJ[0, 0] * (-fx / (tz * tz)) + GJ[1, 1] * (-fy / (tz * tz))
                gtz += GJ[0, 2] * (fx * ux / (tz * tz)) + GJ[1, 2] * (fy * uy / (tz * tz))
                if not clip_x:
                    gux = GJ[0, 2] * (-fx / tz)
                    gtx += gux / tz
                    gtz += -gux * tx / (tz * tz)
                if not clip_y:
                    guy = GJ[1, 2] * (-fy / tz)
                    gty += guy / tz
                    gtz += -guy * ty / (tz * tz)
                gmx, gmy = g_m2d[c, n, 0], g_m2d[c, n, 1]
                gtx += gmx * fx / tz
                gty += gmy * fy / tz
                gtz += -(gmx * fx * tx + gmy * fy * ty) / (tz * tz)
                for i in range(3):
                    gp[i] += V[0, i] * gtx + V[1, i] * gty + V[2, i] * gtz
                for i in range(3):  # GS += V^T GSc V
                    for j in range(3):
                        for k in range(3):
                            for m in range(3):
                                GS[i, j] += V[k, i] * GSc[k, m] * V[m, j]
            GM = _stack_matrix(3, 3, np.float64)  # 2 GS M
            for i in range(3):
                for j in range(3):
                    for k in range(3):
                        GM[i, j] += 2.0 * GS[i, k] * M[k, j]
            GR = _stack_matrix(3, 3, np.float64)
            for k in range(3):
                acc = 0.0
                for i in range(3):
                    acc += GM[i, k] * R[i, k]
                    GR[i, k] = GM[i, k] * scales[n, k]
                g_scales[n, k] = acc
            gw = 2 * (-z * GR[0, 1] + y * GR[0, 2] + z * GR[1, 0] - x * GR[1, 2] - y * GR[2, 0] + x * GR[2, 1])
            gx = 2 * (y * GR[0, 1] + z * GR[0, 2] + y * GR[1, 0] - 2 * x * GR[1, 1] - w * GR[1, 2]
                      + z * GR[2, 0] + w * GR[2, 1] - 2 * x * GR[2, 2])
            gy = 2 * (-2 * y * GR[0, 0] + x * GR[0, 1] + w * GR[0, 2] + x * GR[1, 0] + z * GR[1, 2]
                      - w * GR[2, 0] + z * GR[2, 1] - 2 * y * GR[2, 2])
            gz = 2 * (-2 * z * GR[0, 0] - w * GR[0, 1] + x * GR[0, 2] + w * GR[1, 0] - 2 * z * GR[1, 1]
                      + y * GR[1, 2] + x * GR[2, 0] + y * GR[2, 1])
            dot = w * gw + x * gx + y * gy + z * gz
            g_quats[n, 0] = (gw - w * dot) / qn
            g_quats[n, 1] = (gx - x * dot) / qn
            g_quats[n, 2] = (gy - y * dot) / qn
            g_quats[n, 3] = (gz - z * dot) / qn
            for i in range(3):
                g_means[n, i] = gp[i]

    @pjit
    def depth_keys(radii, depths, key, nvalid):
        """Sort keys: the depth of each (camera, Gaussian), +inf where culled (radii 0); ``nvalid`` counts the rest."""
        C, N = depths.shape
        for c in range(C):
            nv = 0
            for n in prange(N):
                vis = radii[c, n, 0] != 0 or radii[c, n, 1] != 0
                key[c, n] = depths[c, n] if vis else np.float32(np.inf)
                nv += 1 if vis else 0
            nvalid[c] = nv

    @pjit
    def bin_tiles(means2d, radii, order, nvalid, tw, th, tilew, tileh, with_slots):
        """Per-tile depth-ordered Gaussian lists and, if ``with_slots`` (a backward will follow), per (camera,
        Gaussian) the slots of its (Gaussian, tile) pairs for the gradient reduction (else ``gstart`` and ``slots``
        come back empty). The depth-sorted list of each camera is cut into ``BIN_CHUNKS`` chunks, counted
        and filled in parallel; a chunk's pairs go after those of the chunks in front of it in every tile, so each
        tile's list stays in depth order."""
        C, N = radii.shape[0], radii.shape[1]
        T = tw * th
        P = BIN_CHUNKS
        rng = np.zeros((C, N, 4), np.int32)
        counts = np.zeros((C, P, T), np.int64)
        gcount = np.zeros(C * N if with_slots else 0, np.int64)
        for cp in prange(C * P):
            c = cp // P
            p = cp - c * P
            for k in range(nvalid[c] * p // P, nvalid[c] * (p + 1) // P):
                g = order[c, k]
                mx, my = means2d[c, g, 0] / tilew, means2d[c, g, 1] / tileh
                rx, ry = radii[c, g, 0] / tilew, radii[c, g, 1] / tileh
                x0 = min(max(0, int(math.floor(mx - rx))), tw)
                x1 = min(max(0, int(math.ceil(mx + rx))), tw)
                y0 = min(max(0, int(math.floor(my - ry))), th)
                y1 = min(max(0, int(math.ceil(my + ry))), th)
                rng[c, g, 0] = x0; rng[c, g, 1] = x1; rng[c, g, 2] = y0; rng[c, g, 3] = y1  # noqa
                for ty in range(y0, y1):
                    for tx in range(x0, x1):
                        counts[c, p, ty * tw + tx] += 1
                if with_slots:
                    gcount[c * N + g] = (x1 - x0) * (y1 - y0)
        offsets = np.zeros(C * T + 1, np.int64)
        cursor = np.empty((C, P, T), np.int64)  # where chunk p of camera c writes next in tile t
        for c in range(C):
            for t in range(T):
                i = c * T + t
                o = offsets[i]
                for p in range(P):
                    cursor[c, p, t] = o
                    o += counts[c, p, t]
                offsets[i + 1] = o
        gstart = np.zeros(C * N + 1 if with_slots else 0, np.int64)
        if with_slots:
            for i in range(C * N):
                gstart[i + 1] = gstart[i] + gcount[i]
        total = offsets[C * T]
        gids = np.empty(total, np.int32)
        slots = np.empty(total if with_slots else 0, np.int64)
        for cp in prange(C * P):
            c = cp // P
            p = cp - c * P
            for k in range(nvalid[c] * p // P, nvalid[c] * (p + 1) // P):
                g = order[c, k]
                e = gstart[c * N + g] if with_slots else 0
                for ty in range(rng[c, g, 2], rng[c, g, 3]):
                    for tx in range(rng[c, g, 0], rng[c, g, 1]):
                        t = ty * tw + tx
                        pos = cursor[c, p, t]
                        cursor[c, p, t] = pos + 1
                        gids[pos] = g
                        if with_slots:
                            slots[e] = pos
                            e += 1
        return offsets, gids, gstart, slots

    @pjit
    def raster_fwd(means2d, conics, opac, feats, offsets, gids, W, H, tw, th, tilew, tileh, amin, amax, tmin, bg,
                   out, zimg, alphas, tfinal, ncontrib):
        """out [C,H,W,K-1] = composited channels 0..K-2 + T_final * bg; zimg [C,H,W] = the last channel (no bg)."""
        C = means2d.shape[0]
        K = feats.shape[2]
        T = tw * th
        amax32 = np.float32(amax)
        one = np.float32(1.0)
        half = np.float32(0.5)
        for it in prange(C * T):
            c = it // T
            t = it - c * T
            tx0 = (t % tw) * tilew
            ty0 = (t // tw) * tileh
            bw = min(tilew, W - tx0)
            bh = min(tileh, H - ty0)
            npix = bw * bh
            Tp = np.ones(tilew * tileh, np.float32)
            acc = np.zeros((tilew * tileh, K), np.float32)
            ncon = np.zeros(tilew * tileh, np.int32)
            done = np.zeros(tilew * tileh, np.bool_)
            rowdone = np.zeros(tileh, np.int32)
            ndone = 0
            start = offsets[it]
            end = offsets[it + 1]
            for j in range(start, end):
                if ndone >= npix:
                    break
                g = gids[j]
                mx, my = means2d[c, g, 0], means2d[c, g, 1]
                A, B, Cc = conics[c, g, 0], conics[c, g, 1], conics[c, g, 2]
                op = opac[c, g]
                lim, y0, y1 = _ellipse_rows(A, B, Cc, op, my, amin, ty0, bh)
                if y0 >= y1:
                    continue
                qA = _fexp(-A)
                for py in range(y0, y1):
                    ly = py - ty0
                    if rowdone[ly] >= bw:
                        continue
                    dy = my - (py + half)
                    x0, x1 = _ellipse_span(A, B, Cc, lim, mx, dy, tx0, bw)
                    if x0 >= x1:
                        continue
                    # exp(-sigma) along the row by recurrence: sigma is quadratic in x, so the ratios of
                    # consecutive values form a geometric sequence (two multiplies per pixel instead of an exp)
                    dx0 = mx - (x0 + half)
                    G = _fexp(-(half * (A * dx0 * dx0 + Cc * dy * dy) + B * dx0 * dy))
                    r = _fexp(A * dx0 - half * A + B * dy)
                    row = ly * tilew - tx0
                    for px in range(x0, x1):
                        Gc = G
                        G = G * r
                        r = r * qA
                        p = row + px
                        if done[p]:
                            continue
                        al = min(amax32, op * Gc)
                        if al < amin:
                            continue
                        Tcur = Tp[p]
                        nT = Tcur * (one - al)
                        if nT <= tmin:  # gsplat: the pixel is done, this Gaussian excluded
                            done[p] = True
                            ndone += 1
                            rowdone[ly] += 1
                            continue
                        wgt = al * Tcur
                        for k in range(K):
                            acc[p, k] += feats[c, g, k] * wgt
                        Tp[p] = nT
                        ncon[p] = j - start + 1
            for ly in range(bh):
                for lx in range(bw):
                    p = ly * tilew + lx
                    Tv = Tp[p]
                    for k in range(K - 1):
                        out[c, ty0 + ly, tx0 + lx, k] = acc[p, k] + Tv * bg[k]
                    zimg[c, ty0 + ly, tx0 + lx] = acc[p, K - 1]
                    alphas[c, ty0 + ly, tx0 + lx] = 1.0 - Tp[p]
                    tfinal[c, ty0 + ly, tx0 + lx] = Tp[p]
                    ncontrib[c, ty0 + ly, tx0 + lx] = ncon[p]

    @pjit
    def raster_bwd(means2d, conics, opac, feats, offsets, gids, W, H, tw, th, tilew, tileh, amin, amax, bg,
                   tfinal, ncontrib, g_out, g_z, g_alpha, gslot):
        """gslot[j] = [d mx, d my, d conic a, b, c, d opacity, d feats...] of the (Gaussian, tile) pair j."""
        C = means2d.shape[0]
        K = feats.shape[2]
        T = tw * th
        amax32 = np.float32(amax)
        one = np.float32(1.0)
        half = np.float32(0.5)
        for it in prange(C * T):
            c = it // T
            t = it - c * T
            tx0 = (t % tw) * tilew
            ty0 = (t // tw) * tileh
            bw = min(tilew, W - tx0)
            bh = min(tileh, H - ty0)
            Tp = np.ones(tilew * tileh, np.float32)
            Tf = np.ones(tilew * tileh, np.float32)
            ncon = np.zeros(tilew * tileh, np.int32)
            rowmax = np.zeros(tileh, np.int32)
            gc = np.zeros((tilew * tileh, K), np.float32)
            ga = np.zeros(tilew * tileh, np.float32)
            Sacc = np.zeros((tilew * tileh, K), np.float32)
            gf = np.zeros(K, np.float32)
            jmax = 0
            for ly in range(bh):
                for lx in range(bw):
                    p = ly * tilew + lx
                    Tp[p] = tfinal[c, ty0 + ly, tx0 + lx]
                    Tf[p] = Tp[p]
                    ncon[p] = ncontrib[c, ty0 + ly, tx0 + lx]
                    rowmax[ly] = max(rowmax[ly], ncon[p])
                    gav = g_alpha[c, ty0 + ly, tx0 + lx]
                    for k in range(K - 1):
                        gk = g_out[c, ty0 + ly, tx0 + lx, k]
                        gc[p, k] = gk
                        gav -= gk * bg[k]  # out = ... + (1 - alpha) bg
                    gc[p, K - 1] = g_z[c, ty0 + ly, tx0 + lx]
                    ga[p] = gav
                jmax = max(jmax, rowmax[ly])
            start = offsets[it]
            for jj in range(jmax - 1, -1, -1):  # back to front
                j = start + jj
                g = gids[j]
                mx, my = means2d[c, g, 0], means2d[c, g, 1]
                A, B, Cc = conics[c, g, 0], conics[c, g, 1], conics[c, g, 2]
                op = opac[c, g]
                lim, y0, y1 = _ellipse_rows(A, B, Cc, op, my, amin, ty0, bh)
                if y0 >= y1:
                    continue
                qA = _fexp(-A)
                gmx = np.float32(0.0)
                gmy = np.float32(0.0)
                gA = np.float32(0.0)
                gB = np.float32(0.0)
                gC = np.float32(0.0)
                gop = np.float32(0.0)
                for k in range(K):
                    gf[k] = 0.0
                for py in range(y0, y1):
                    ly = py - ty0
                    if jj >= rowmax[ly]:
                        continue
                    dy = my - (py + half)
                    x0, x1 = _ellipse_span(A, B, Cc, lim, mx, dy, tx0, bw)
                    if x0 >= x1:
                        continue
                    dx0 = mx - (x0 + half)
                    G = _fexp(-(half * (A * dx0 * dx0 + Cc * dy * dy) + B * dx0 * dy))
                    r = _fexp(A * dx0 - half * A + B * dy)
                    row = ly * tilew - tx0
                    for px in range(x0, x1):
                        Gc = G
                        G = G * r
                        r = r * qA
                        p = row + px
                        if jj >= ncon[p]:
                            continue
                        raw = op * Gc
                        al = min(amax32, raw)
                        if al < amin:
                            continue
                        dx = mx - (px + half)
                        inv = one / (one - al)
                        Tb = Tp[p] * inv  # transmittance in front of this Gaussian
                        wgt = al * Tb
                        gal = ga[p] * Tf[p] * inv
                        for k in range(K):
                            f = feats[c, g, k]
                            gck = gc[p, k]
                            gf[k] += gck * wgt
                            gal += gck * (Tb * f - Sacc[p, k] * inv)
                            Sacc[p, k] += f * wgt
                        Tp[p] = Tb
                        if raw < amax32:
                            gop += gal * Gc
                            gs = -gal * raw
                            gmx += gs * (A * dx + B * dy)
                            gmy += gs * (Cc * dy + B * dx)
                            gA += gs * half * dx * dx
                            gB += gs * dx * dy
                            gC += gs * half * dy * dy
                gslot[j, 0] = gmx
                gslot[j, 1] = gmy
                gslot[j, 2] = gA
                gslot[j, 3] = gB
                gslot[j, 4] = gC
                gslot[j, 5] = gop
                for k in range(K):
                    gslot[j, 6 + k] = gf[k]

    @pjit
    def reduce_slots(gslot, gstart, slots, N, g_m2d, g_con, g_op, g_feat):
        C = g_m2d.shape[0]
        K = g_feat.shape[2]
        for i in prange(C * N):  # scalar accumulators: no per-Gaussian heap array
            c = i // N
            g = i - c * N
            s0 = np.float32(0.0); s1 = np.float32(0.0); s2 = np.float32(0.0)  # noqa: E702
            s3 = np.float32(0.0); s4 = np.float32(0.0); s5 = np.float32(0.0)  # noqa: E702
            for k in range(K):
                g_feat[c, g, k] = 0.0
            for e in range(gstart[i], gstart[i + 1]):
                s = slots[e]
                s0 += gslot[s, 0]; s1 += gslot[s, 1]; s2 += gslot[s, 2]  # noqa: E702
                s3 += gslot[s, 3]; s4 += gslot[s, 4]; s5 += gslot[s, 5]  # noqa: E702
                for k in range(K):
                    g_feat[c, g, k] += gslot[s, 6 + k]
            g_m2d[c, g, 0] = s0
            g_m2d[c, g, 1] = s1
            g_con[c, g, 0] = s2
            g_con[c, g, 1] = s3
            g_con[c, g, 2] = s4
            g_op[c, g] = s5


    @pjit
    def ellipse_boxes(conics, opac, amin, boxes):
        """Per (camera, Gaussian): ``[lim, hy, hx]``, the ellipse where alpha >= ``amin`` is d^T conic d <= lim
        (slightly widened) and its half height and half width in pixels; lim = 0 where alpha never reaches amin."""
        C, N = opac.shape
        for i in prange(C * N):
            c = i // N
            g = i - c * N
            A = conics[c, g, 0]
            B = conics[c, g, 1]
            Cc = conics[c, g, 2]
            op = opac[c, g]
            det = A * Cc - B * B
            boxes[c, g, 0] = 0.0
            boxes[c, g, 1] = -1.0
            boxes[c, g, 2] = -1.0
            if not (op > amin and det > 0 and A > 0):
                continue
            lim = np.float32(2.0) * (np.float32(math.log(op / amin)) * np.float32(1.0001) + np.float32(1e-4))
            boxes[c, g, 0] = lim
            boxes[c, g, 1] = np.float32(math.sqrt(lim * A / det)) + np.float32(0.01)
            boxes[c, g, 2] = np.float32(math.sqrt(lim * Cc / det)) + np.float32(0.01)

    @pjit
    def raster_fwd4(means2d, conics, opac, feats, boxes, offsets, gids, W, H, tw, th, amin, amax, tmin, bg,
                    out, zimg, alphas, tfinal, ncontrib):
        """``raster_fwd`` for 16x16 tiles and exactly 4 channels (RGB + depth), vectorized: each (Gaussian, tile
        row) is processed as one or two groups of 8 branch-free lanes (``fwd_group``), only those that the ellipse's
        bounding box touches."""
        C = means2d.shape[0]
        T = tw * th
        amax32 = np.float32(amax)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        half = np.float32(0.5)
        for it in prange(C * T):
            c = it // T
            t = it - c * T
            tx0 = (t % tw) * 16
            ty0 = (t // tw) * 16
            bw = min(16, W - tx0)
            bh = min(16, H - ty0)
            Tp = _stack_array(256, np.float32)  # [row * 16 + lane]
            a0 = _stack_array(256, np.float32)
            a1 = _stack_array(256, np.float32)
            a2 = _stack_array(256, np.float32)
            a3 = _stack_array(256, np.float32)
            ncon = _stack_array(256, np.int32)
            lanef = _stack_array(16, np.float32)
            rowdone = _stack_array(16, np.int32)
            for i in range(256):  # the stack arrays start at zero
                Tp[i] = one
            for lx in range(16):
                lanef[lx] = np.float32(tx0 + lx) + half
                if lx >= bw:
                    for ly in range(16):
                        Tp[ly * 16 + lx] = -one  # outside the image: never contributes
            ndone = 0  # lanes with a negative transmittance: finished or outside the image
            for ly in range(16):
                rowdone[ly] = 16 - bw if ly < bh else 16
                ndone += rowdone[ly]
            start = offsets[it]
            end = offsets[it + 1]
            for j in range(start, end):
                if ndone >= 256:
                    break
                g = gids[j]
                hy = boxes[c, g, 1]
                mx = means2d[c, g, 0]
                my = means2d[c, g, 1]
                y0 = max(ty0, int(math.ceil(my - hy - half)))
                y1 = min(ty0 + bh, int(math.floor(my + hy - half)) + 1)
                if y0 >= y1:
                    continue
                hx = boxes[c, g, 2]
                x0 = max(tx0, int(math.ceil(mx - hx - half)))
                x1 = min(tx0 + bw, int(math.floor(mx + hx - half)) + 1)
                if x0 >= x1:
                    continue
                lo = x0 < tx0 + 8  # the ellipse's box touches lanes 0-7 / 8-15
                hi = x1 > tx0 + 8
                A = conics[c, g, 0]
                B = conics[c, g, 1]
                Cc = conics[c, g, 2]
                op = opac[c, g]
                f0 = feats[c, g, 0]; f1 = feats[c, g, 1]; f2 = feats[c, g, 2]; f3 = feats[c, g, 3]  # noqa: E702
                jn = np.int32(j - start + 1)
                nha = -half * A
                for py in range(y0, y1):
                    ly = py - ty0
                    if rowdone[ly] >= 16:
                        continue
                    dy = my - (np.float32(py) + half)
                    cst = -half * Cc * dy * dy
                    bdy = -B * dy
                    r = ly * 16
                    Trow = Tp[r:r + 16]
                    rn = ncon[r:r + 16]
                    r0 = a0[r:r + 16]; r1 = a1[r:r + 16]; r2 = a2[r:r + 16]; r3 = a3[r:r + 16]  # noqa: E702
                    fin = False
                    if lo:
                        fin = _fwd_group(0, Trow, rn, r0, r1, r2, r3, lanef, mx, nha, bdy, cst, op, f0, f1, f2, f3,
                                         amax32, amin, tmin, jn)
                    if hi:
                        fin |= _fwd_group(8, Trow, rn, r0, r1, r2, r3, lanef, mx, nha, bdy, cst, op, f0, f1, f2, f3,
                                          amax32, amin, tmin, jn)
                    if fin:  # rare (once per pixel at most): recount the row's finished lanes
                        nd = 0
                        for lx in range(16):
                            nd += Trow[lx] < zero
                        ndone += nd - rowdone[ly]
                        rowdone[ly] = nd
            for ly in range(bh):
                for lx in range(bw):
                    y = ty0 + ly; x = tx0 + lx  # noqa: E702
                    p = ly * 16 + lx
                    Tv = abs(Tp[p])
                    out[c, y, x, 0] = a0[p] + Tv * bg[0]
                    out[c, y, x, 1] = a1[p] + Tv * bg[1]
                    out[c, y, x, 2] = a2[p] + Tv * bg[2]
                    zimg[c, y, x] = a3[p]
                    alphas[c, y, x] = 1.0 - Tv
                    tfinal[c, y, x] = Tv
                    ncontrib[c, y, x] = ncon[p]

    @pjit
    def raster_bwd4(means2d, conics, opac, feats, boxes, offsets, gids, W, H, tw, th, amin, amax, bg,
                    tfinal, ncontrib, g_out, g_z, g_alpha, gslot):
        """``raster_bwd`` for the tiles of ``raster_fwd4``: the same (Gaussian, tile) traversal back to front, each
        row group un-blended by ``bwd_group``; same slots, same values."""
        C = means2d.shape[0]
        T = tw * th
        amax32 = np.float32(amax)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        half = np.float32(0.5)
        for it in prange(C * T):
            c = it // T
            t = it - c * T
            tx0 = (t % tw) * 16
            ty0 = (t // tw) * 16
            bw = min(16, W - tx0)
            bh = min(16, H - ty0)
            Tp = _stack_array(256, np.float32)  # [row * 16 + lane]
            TfGa = _stack_array(256, np.float32)  # T_final * dL/dalpha
            ncon = _stack_array(256, np.int32)
            gc0 = _stack_array(256, np.float32)  # dL/d(channel k) of each pixel
            gc1 = _stack_array(256, np.float32)
            gc2 = _stack_array(256, np.float32)
            gc3 = _stack_array(256, np.float32)
            pb = _stack_array(256, np.float32)  # sum_k dL/dout_k * (channel k composited behind the Gaussian)
            lanef = _stack_array(16, np.float32)
            rowmax = _stack_array(16, np.int32)
            gacc = _stack_array(80, np.float32)  # per-lane gradient sums [quantity * 8 + lane], see bwd_group
            for i in range(256):  # the stack arrays start at zero
                Tp[i] = one
            for lx in range(16):
                lanef[lx] = np.float32(tx0 + lx) + half
            jmax = 0
            for ly in range(bh):
                for lx in range(bw):
                    y = ty0 + ly; x = tx0 + lx  # noqa: E702
                    p = ly * 16 + lx
                    Tp[p] = tfinal[c, y, x]
                    o0 = g_out[c, y, x, 0]; o1 = g_out[c, y, x, 1]; o2 = g_out[c, y, x, 2]  # noqa: E702
                    gc0[p] = o0; gc1[p] = o1; gc2[p] = o2  # noqa: E702
                    gc3[p] = g_z[c, y, x]
                    gav = g_alpha[c, y, x] - (o0 * bg[0] + o1 * bg[1] + o2 * bg[2])  # out = ... + (1 - alpha) bg
                    TfGa[p] = tfinal[c, y, x] * gav
                    ncon[p] = ncontrib[c, y, x]
                    rowmax[ly] = max(rowmax[ly], ncon[p])
                jmax = max(jmax, rowmax[ly])
            start = offsets[it]
            for jj in range(jmax - 1, -1, -1):  # back to front
                j = start + jj
                g = gids[j]
                hy = boxes[c, g, 1]
                mx = means2d[c, g, 0]
                my = means2d[c, g, 1]
                y0 = max(ty0, int(math.ceil(my - hy - half)))
                y1 = min(ty0 + bh, int(math.floor(my + hy - half)) + 1)
                hx = boxes[c, g, 2]
                x0 = max(tx0, int(math.ceil(mx - hx - half)))
                x1 = min(tx0 + bw, int(math.floor(mx + hx - half)) + 1)
                if y0 >= y1 or x0 >= x1:
                    continue
                lo = x0 < tx0 + 8
                hi = x1 > tx0 + 8
                A = conics[c, g, 0]
                B = conics[c, g, 1]
                Cc = conics[c, g, 2]
                op = opac[c, g]
                nha = -half * A
                f0 = feats[c, g, 0]; f1 = feats[c, g, 1]; f2 = feats[c, g, 2]; f3 = feats[c, g, 3]  # noqa: E702
                jj32 = np.int32(jj)
                touched = False
                for py in range(y0, y1):
                    ly = py - ty0
                    if jj >= rowmax[ly]:
                        continue
                    touched = True
                    dy = my - (np.float32(py) + half)
                    cst = -half * Cc * dy * dy
                    bdy = -B * dy
                    r = ly * 16
                    Trow = Tp[r:r + 16]
                    nrow = ncon[r:r + 16]
                    trow = TfGa[r:r + 16]
                    c0 = gc0[r:r + 16]; c1 = gc1[r:r + 16]; c2 = gc2[r:r + 16]; c3 = gc3[r:r + 16]  # noqa: E702
                    prow = pb[r:r + 16]
                    if lo:
                        _bwd_group(0, jj32, Trow, nrow, trow, c0, c1, c2, c3, prow, lanef, gacc,
                                   mx, dy, A, B, Cc, nha, bdy, cst, op, f0, f1, f2, f3, amax32, amin)
                    if hi:
                        _bwd_group(8, jj32, Trow, nrow, trow, c0, c1, c2, c3, prow, lanef, gacc,
                                   mx, dy, A, B, Cc, nha, bdy, cst, op, f0, f1, f2, f3, amax32, amin)
                if not touched:
                    continue  # the slot stays 0
                for k in range(10):  # sum the lanes: channels 0-3, opacity, mx, my, conic a, b, c
                    sm = zero
                    for q in range(8):
                        sm += gacc[k * 8 + q]
                        gacc[k * 8 + q] = zero
                    gslot[j, k + 6 if k < 4 else (5 if k == 4 else k - 5)] = sm if k != 7 and k != 9 else half * sm


    _KERNELS = dict(project_fwd=project_fwd, project_bwd=project_bwd, depth_keys=depth_keys, bin_tiles=bin_tiles,
                    raster_fwd=raster_fwd, raster_bwd=raster_bwd, reduce_slots=reduce_slots,
                    raster_fwd4=raster_fwd4, raster_bwd4=raster_bwd4, ellipse_boxes=ellipse_boxes)
    return _KERNELS


def _np(x: Tensor, dtype=np.float32) -> np.ndarray:
    """A contiguous numpy array of ``x`` (no copy when it already is one of ``dtype``). Everything between the kernels
    is numpy on purpose: numpy runs on the calling thread, while a torch op on more than ~32k elements runs on OpenMP
    threads that spin-wait around the numba kernels and compete with them for the cores (see module docstring)."""
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)


def _np_dtype(dtype: torch.dtype):
    """float64 for float64 tensors, float32 for the others (the projection kernels take and return both)."""
    return np.float64 if dtype == torch.float64 else np.float32


def _npf(x: Tensor) -> np.ndarray:
    """``_np`` in float32 or float64 as ``x`` is (no conversion copy for float32 input: the projection kernels
    compute in float64 either way)."""
    return _np(x, _np_dtype(x.dtype))


def _out(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """numpy result -> torch tensor of ``dtype`` (the dtype conversion done by numpy, on this thread)."""
    t = torch.from_numpy(a)
    if t.dtype == dtype:
        return t
    if dtype in (torch.float32, torch.float64):
        return torch.from_numpy(a.astype(np.float32 if dtype == torch.float32 else np.float64))
    return t.to(dtype)  # half precision: numpy has no bfloat16


class _ProjectFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height):
        k = _kernels()
        C, N = viewmats.shape[0], means.shape[0]
        m2d = np.empty((C, N, 2), np.float32)
        con = np.empty((C, N, 3), np.float32)
        dep = np.empty((C, N), np.float32)
        rad = np.empty((C, N, 2), np.int32)
        args = (_npf(means), _npf(quats), _npf(scales), _npf(opacities), _np(viewmats, np.float64),
                _np(Ks, np.float64))
        k["project_fwd"](*args, float(width), float(height), NEAR, FAR, EPS2D, ALPHA_MIN, EXTEND_MAX,
                         m2d, con, dep, rad)
        radii = torch.from_numpy(rad)
        ctx.saved = args[:3] + args[4:] + (rad,)
        ctx.size = (width, height)
        ctx.dtypes = (means.dtype, quats.dtype, scales.dtype)
        ctx.mark_non_differentiable(radii)
        return torch.from_numpy(m2d), torch.from_numpy(con), torch.from_numpy(dep), radii

    @staticmethod
    def backward(ctx, g_m2d, g_con, g_dep, _g_radii):
        means, quats, scales, viewmats, Ks, rad = ctx.saved
        k = _kernels()
        C, N = rad.shape[0], means.shape[0]
        dm, dq, ds = ctx.dtypes
        g_means = np.empty((N, 3), _np_dtype(dm))  # the kernel computes in float64 and stores in these dtypes
        g_quats = np.empty((N, 4), _np_dtype(dq))
        g_scales = np.empty((N, 3), _np_dtype(ds))

        def grad(g, shape):
            return np.zeros(shape, np.float32) if g is None else _npf(g)

        k["project_bwd"](means, quats, scales, viewmats, Ks, float(ctx.size[0]), float(ctx.size[1]), EPS2D, rad,
                         grad(g_m2d, (C, N, 2)), grad(g_con, (C, N, 3)), grad(g_dep, (C, N)),
                         g_means, g_quats, g_scales)
        return _out(g_means, dm), _out(g_quats, dq), _out(g_scales, ds), None, None, None, None, None


class _CompositeFn(torch.autograd.Function):
    """Tile compositing of projected Gaussians: ``D`` colour channels (+ background) and one extra channel ``z`` (the
    camera depth for ``rasterize_gaussians``) written to its own image, so that no output is a slice of another (a
    slice's backward would zero-fill and copy a full image in torch)."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, zfeat, background, radii, sort_depths, width, height,
                need_grad):
        # means2d [C,N,2], conics [C,N,3], opacities [N] or [C,N], colors [N,D] or [C,N,D], zfeat [C,N],
        # background [D] or None, radii [C,N,2] int32, sort_depths [C,N] (the compositing order), need_grad: whether
        # a backward can follow (``_need_grad``; without, the binning skips the slots of the gradient reduction)
        k = _kernels()
        C, N = zfeat.shape
        D = colors.shape[-1]
        K = D + 1
        tw, th = math.ceil(width / TILE_W), math.ceil(height / TILE_H)
        rad = np.ascontiguousarray(radii.numpy(), np.int32)
        key = np.empty((C, N), np.float32)
        nvalid = np.empty(C, np.int64)
        k["depth_keys"](rad, _np(sort_depths), key, nvalid)
        order = np.argsort(key, axis=1).astype(np.int64, copy=False)  # numpy's SIMD sort; culled (inf) last
        m2d, con = _np(means2d), _np(conics)
        op = np.ascontiguousarray(np.broadcast_to(_np(opacities), (C, N)))
        ft = np.empty((C, N, K), np.float32)
        ft[..., :D] = _np(colors)
        ft[..., D] = _np(zfeat)
        bg = np.zeros(D, np.float32) if background is None else _np(background)
        offsets, gids, gstart, slots = k["bin_tiles"](m2d, rad, order, nvalid, tw, th, TILE_W, TILE_H, need_grad)
        out = np.empty((C, height, width, D), np.float32)
        zimg = np.empty((C, height, width), np.float32)
        alphas = np.empty((C, height, width), np.float32)
        tfinal = np.empty((C, height, width), np.float32)
        ncon = np.empty((C, height, width), np.int32)
        # RGB + depth (the case of ``rasterize``) runs on the 8-lane kernels; other channel counts on the per-pixel ones
        ctx.lanes = K == 4 and LANE_KERNELS and (TILE_W, TILE_H) == (16, 16)
        if ctx.lanes:
            boxes = np.empty((C, N, 3), np.float32)
            k["ellipse_boxes"](con, op, np.float32(ALPHA_MIN), boxes)
            k["raster_fwd4"](m2d, con, op, ft, boxes, offsets, gids, width, height, tw, th, np.float32(ALPHA_MIN),
                             ALPHA_MAX, np.float32(T_MIN), bg, out, zimg, alphas, tfinal, ncon)
        else:
            boxes = None
            k["raster_fwd"](m2d, con, op, ft, offsets, gids, width, height, tw, th, TILE_W, TILE_H,
                            np.float32(ALPHA_MIN), ALPHA_MAX, np.float32(T_MIN), bg, out, zimg, alphas, tfinal, ncon)
        ctx.saved = (m2d, con, op, ft, bg, boxes, offsets, gids, gstart, slots, tfinal, ncon, width, height, tw, th)
        ctx.shapes = (tuple(opacities.shape), tuple(colors.shape))
        ctx.dtypes = (means2d.dtype, conics.dtype, opacities.dtype, colors.dtype, zfeat.dtype,
                      None if background is None else background.dtype)
        dt = colors.dtype
        return _out(out, dt), _out(alphas, dt), _out(zimg, dt)

    @staticmethod
    def backward(ctx, g_out, g_alpha, g_z):
        k = _kernels()
        m2d, con, op, ft, bg, boxes, offsets, gids, gstart, slots, tfinal, ncon, width, height, tw, th = ctx.saved
        if len(slots) != len(gids):
            raise RuntimeError("rasterize: backward through a forward that ran with need_grad=False")
        C, N, K = ft.shape
        D = K - 1
        g_out = np.zeros((C, height, width, D), np.float32) if g_out is None else _np(g_out)
        g_alpha = np.zeros((C, height, width), np.float32) if g_alpha is None else _np(g_alpha)
        g_z = np.zeros((C, height, width), np.float32) if g_z is None else _np(g_z)
        gslot = np.zeros((len(gids), 6 + K), np.float32)  # pairs behind a tile's last contributor stay 0
        if ctx.lanes:
            k["raster_bwd4"](m2d, con, op, ft, boxes, offsets, gids, width, height, tw, th, np.float32(ALPHA_MIN),
                             ALPHA_MAX, bg, tfinal, ncon, g_out, g_z, g_alpha, gslot)
        else:
            k["raster_bwd"](m2d, con, op, ft, offsets, gids, width, height, tw, th, TILE_W, TILE_H,
                            np.float32(ALPHA_MIN), ALPHA_MAX, bg, tfinal, ncon, g_out, g_z, g_alpha, gslot)
        g_m2d = np.empty((C, N, 2), np.float32)
        g_con = np.empty((C, N, 3), np.float32)
        g_op = np.empty((C, N), np.float32)
        g_ft = np.empty((C, N, K), np.float32)
        k["reduce_slots"](gslot, gstart, slots, N, g_m2d, g_con, g_op, g_ft)
        op_shape, col_shape = ctx.shapes
        d_m2d, d_con, d_op, d_col, d_z, d_bg = ctx.dtypes
        g_opac = g_op if len(op_shape) == 2 else g_op.sum(0)
        g_col = g_ft[..., :D] if len(col_shape) == 3 else g_ft[..., :D].sum(0)
        g_bg = None
        if d_bg is not None and ctx.needs_input_grad[5]:
            g_bg = _out(np.einsum("chw,chwd->d", tfinal, g_out), d_bg)  # out = ... + T_final bg
        return (_out(g_m2d, d_m2d), _out(g_con, d_con), _out(np.ascontiguousarray(g_opac), d_op),
                _out(np.ascontiguousarray(g_col), d_col), _out(np.ascontiguousarray(g_ft[..., D]), d_z), g_bg,
                None, None, None, None, None)


def _need_grad(*tensors) -> bool:
    """Whether autograd will record a call on ``tensors`` (``Function.forward`` runs with grad mode off and its
    ``ctx.needs_input_grad`` ignores ``torch.no_grad``, so the caller decides)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def project_gaussians(means, quats, scales, opacities, viewmats, Ks, width: int, height: int):
    """Numba EWA projection; same outputs as ``gaussians_torch.project_gaussians`` minus ``covars2d``:
    ``means2d [C,N,2]``, ``conics [C,N,3]``, ``depths [C,N]`` (differentiable) and ``radii [C,N,2]`` (int32)."""
    return _ProjectFn.apply(means, quats, scales, opacities.detach(), viewmats.detach(), Ks.detach(), width, height)


def rasterize_projected(means2d, conics, opacities, feats, radii, depths, width: int, height: int):
    """Numba tile rasterizer; same contract as ``gaussians_torch.rasterize_projected`` (no background):
    returns ``feats [C,H,W,K]`` and ``alphas [C,H,W]``."""
    K = feats.shape[-1]
    out, alphas, last = _CompositeFn.apply(means2d, conics, opacities, feats[..., :K - 1], feats[..., K - 1], None,
                                           radii, depths.detach(), width, height,
                                           _need_grad(means2d, conics, opacities, feats))
    return torch.cat([out, last[..., None]], dim=-1), alphas


def rasterize(
    means: Tensor,  # [N, 3] world
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    background: Tensor | None,  # [D]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Projection + compositing for ``rasterize_gaussians`` (inputs checked there): ``colors [C,H,W,D]`` (with the
    background), ``alphas [C,H,W]``, accumulated ``depths [C,H,W]``, ``means2d [C,N,2]``, ``radii [C,N,2]``. No torch
    op runs between the kernels (see ``_np``)."""
    means2d, conics, depths, radii = project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height)
    rgb, alphas, depth = _CompositeFn.apply(means2d, conics, opacities, colors, depths, background, radii,
                                            depths.detach(), width, height,
                                            _need_grad(means2d, conics, opacities, colors, depths, background))
    return rgb, alphas, depth, means2d, radii

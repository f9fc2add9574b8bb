"""Forward-skinning refinement of a canonical clothed mesh against posed views, with per-frame joint-angle correction.

The back half of CanonicalFusion: a canonical mesh (the fused mesh of ``avatar.fusion``, or the naked body template)
with dense skinning weights is re-posed into every view by forward LBS (``avatar.skinning.lbs_points`` over the body
model's bone transforms of the view's pose), rendered with the differentiable mesh rasterizer
(``avatar.render.mesh.render_mesh``: colour, soft silhouette, depth, camera-space normals) and fitted to the images,
masks and, where given, predicted depth and normals. The unknowns are

- per-vertex offsets of the canonical mesh (regularized by a Laplacian of the offsets and the normal consistency of
  adjacent faces, so the surface moves as a smooth sheet and keeps its detail),
- per-vertex colours (logits, ``sigmoid`` -> RGB),
- per frame, one world-axis rotation per anatomical joint (:func:`joint_groups`: twin bones of one segment share
  it, :func:`apply_joint_deltas`) and a root translation delta (the table is an ``avatar.fit.pose_refine.PoseRefiner``
  with one row per joint): a pose error of the input is then corrected instead of being baked into the shape as a
  smear.

The shape signal from the masks is the rim term (:func:`mask_sdf`, :func:`rim_vertices`, :func:`rim_loss`): the
rendered outer-silhouette vertices against the signed distance of the mask boundary (the soft-silhouette L2 is
biased against binary masks; see design.md). Offsets can be optimized in the smooth "large steps" parameterization
(:class:`SmoothSolver`) with :class:`UniformAdam`. :func:`wrap_template` turns a fused mesh into the body template
plus offsets along its normals (SMPL+D), a cleaner start than the fused mesh itself.

Optimization runs in stages (:class:`MeshStage`); before a stage the mesh can be subdivided (trimesh midpoint
subdivision: every face splits in four, the mesh stays manifold, weights and colours are interpolated onto the new
vertices). The loop (:func:`refine_mesh`) owns the optimizer and the stage schedule; the losses and mesh operators
are pure functions (:func:`laplacian_loss`, :func:`normal_consistency_loss`, :func:`mesh_edges`,
:func:`face_adjacency`, :func:`image_losses`), tested on their own.

Written here rather than taken from a library: pytorch3d (which has ``mesh_laplacian_smoothing`` and
``mesh_normal_consistency``) is not installable on this platform (see ARCHITECTURE.md), and the refinement needs our
rasterizer, body models and pose table anyway.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar.fit.pose_refine import PoseRefiner
from avatar.render.mesh import MeshRenderOutput, render_mesh
from avatar.geometry.projection import project_points
from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from avatar.skinning.lbs import lbs_points
from avatar.types import BodyPose, Cameras

__all__ = [
    "MINOR_BONES", "MeshRefineConfig", "MeshStage", "apply_joint_deltas", "joint_groups", "joint_rotations", "RefineView", "RefinedMesh", "SmoothSolver", "UniformAdam", "face_adjacency",
    "image_losses", "laplacian_loss", "mask_sdf", "mesh_edges", "rim_loss", "rim_vertices", "smoothing_matrix", "normal_consistency_loss", "refine_mesh", "subdivide_mesh", "uniform_laplacian", "wrap_template",
]


# ----------------------------------------------------------------------------------------------------------------
# pure mesh operators and regularizers


def _check_mesh(name: str, vertices: Tensor, faces: Tensor) -> None:
    if not isinstance(vertices, Tensor) or vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{name}: vertices must be a [V, 3] tensor, got {getattr(vertices, 'shape', type(vertices))}")
    if not isinstance(faces, Tensor) or faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: faces must be an integer [F, 3] tensor, got {getattr(faces, 'shape', type(faces))}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise ValueError(f"{name}: faces index vertices outside [0, {vertices.shape[0]})")


def mesh_edges(faces: Tensor) -> Tensor:
    """Unique undirected edges ``[E, 2]`` (int64, ``i < j``) of a triangle mesh ``faces [F, 3]``."""
    f = faces.to(torch.int64)
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = torch.sort(e, dim=1).values
    return torch.unique(e, dim=0)


def face_adjacency(faces: Tensor) -> Tensor:
    """Pairs of faces sharing an edge ``[P, 2]`` (int64). An edge shared by k > 2 faces (non-manifold) gives the
    k - 1 consecutive pairs; boundary edges give none."""
    f = faces.detach().cpu().numpy().astype(np.int64)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)  # [3F, 2]
    owner = np.tile(np.arange(len(f)), 3)
    key = e[:, 0] * (int(e.max(initial=0)) + 1) + e[:, 1]
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    same = key[1:] == key[:-1]
    pairs = np.stack([owner[:-1][same], owner[1:][same]], 1)
    return torch.from_numpy(pairs).to(faces.device)


def uniform_laplacian(vertices: Tensor, edges: Tensor) -> Tensor:
    """Uniform (umbrella) Laplacian ``[V, 3]``: each vertex minus the mean of its edge neighbours
    (``vertices [V, 3]``, ``edges [E, 2]`` undirected). Isolated vertices get 0."""
    i = torch.cat([edges[:, 0], edges[:, 1]])
    j = torch.cat([edges[:, 1], edges[:, 0]])
    V = vertices.shape[0]
    total = vertices.new_zeros(V, 3).index_add(0, i, vertices[j])
    deg = torch.zeros(V, dtype=vertices.dtype, device=vertices.device).index_add(
        0, i, torch.ones_like(i, dtype=vertices.dtype))
    lap = vertices - total / deg.clamp(min=1)[:, None]
    return torch.where(deg[:, None] > 0, lap, torch.zeros_like(lap))


def laplacian_loss(vertices: Tensor, faces: Tensor, reference: Tensor | None = None, edges: Tensor | None = None) -> Tensor:
    """Mean squared uniform Laplacian of ``vertices [V, 3]`` (m²), or of the displacement ``vertices - reference``
    when ``reference [V, 3]`` is given (then a rigid or zero displacement costs nothing and the reference's own detail
    is kept). ``edges`` (from :func:`mesh_edges`) can be passed to skip recomputing them."""
    _check_mesh("laplacian_loss", vertices, faces)
    if reference is not None and reference.shape != vertices.shape:
        raise ValueError(f"laplacian_loss: reference must be {tuple(vertices.shape)}, got {tuple(reference.shape)}")
    e = mesh_edges(faces) if edges is None else edges
    x = vertices if reference is None else vertices - reference
    return uniform_laplacian(x, e).square().sum(-1).mean()


def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit face normals ``[F, 3]`` (counter-clockwise = outward)."""
    tri = vertices[faces]  # [F, 3, 3]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def normal_consistency_loss(vertices: Tensor, faces: Tensor, adjacency: Tensor | None = None) -> Tensor:
    """Mean over pairs of adjacent faces of ``1 - cos`` of the angle between their normals (0 for a plane, 2 for a
    folded-over pair). ``adjacency [P, 2]`` from :func:`face_adjacency` can be passed to skip recomputing it."""
    _check_mesh("normal_consistency_loss", vertices, faces)
    adj = face_adjacency(faces) if adjacency is None else adjacency
    if adj.shape[0] == 0:
        return vertices.new_zeros(())
    n = face_normals(vertices, faces.to(torch.int64))
    return (1.0 - (n[adj[:, 0]] * n[adj[:, 1]]).sum(-1)).mean()


def subdivide_mesh(vertices: Tensor, faces: Tensor, attributes: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Midpoint subdivision (trimesh): every face splits in four, shared edges get one new vertex, so a manifold
    mesh stays manifold. ``attributes`` (``{name: [V, D]}``) are interpolated linearly onto the new vertices.
    Returns ``(vertices [V', 3], faces [4F, 3], attributes [V', D])`` on the input's device and dtypes."""
    import trimesh.remesh

    _check_mesh("subdivide_mesh", vertices, faces)
    attrs = {k: v.detach().cpu().double().numpy() for k, v in attributes.items()}
    for k, v in attrs.items():
        if v.ndim != 2 or v.shape[0] != vertices.shape[0]:
            raise ValueError(f"subdivide_mesh: attribute {k!r} must be [V, D] with V = {vertices.shape[0]}, got {v.shape}")
    v_new, f_new, a_new = trimesh.remesh.subdivide(vertices.detach().cpu().double().numpy(),
                                                   faces.cpu().numpy().astype(np.int64), vertex_attributes=attrs)
    dev = vertices.device
    out = {k: torch.from_numpy(np.asarray(a_new[k])).to(device=dev, dtype=attributes[k].dtype) for k in attributes}
    return (torch.from_numpy(np.asarray(v_new)).to(device=dev, dtype=vertices.dtype),
            torch.from_numpy(np.asarray(f_new, dtype=np.int64)).to(dev), out)


def smoothing_matrix(num_vertices: int, edges: Tensor, lam: float):
    """``I + lam * L`` as a scipy CSC matrix ``[V, V]``, ``L = D - A`` the combinatorial graph Laplacian of the mesh
    ``edges [E, 2]``: the operator of the "large steps" parameterization (Nicolet et al. 2021). It is symmetric
    positive definite for ``lam >= 0``."""
    import scipy.sparse as sp

    if not lam >= 0:
        raise ValueError(f"smoothing_matrix: lam must be >= 0, got {lam}")
    e = edges.detach().cpu().numpy().astype(np.int64)
    rows, cols = np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]])
    A = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(num_vertices, num_vertices)).tocsr()
    L = sp.diags(np.asarray(A.sum(1)).ravel()) - A
    return (sp.identity(num_vertices, format="csr") + lam * L).tocsc()


class SmoothSolver:
    """A factorization (``scipy.sparse.linalg.splu``) of ``M = I + lam L`` (:func:`smoothing_matrix`): ``solve(u)``
    is ``M^-1 u`` (differentiable: ``M`` is symmetric, so the backward pass is one more solve) and ``apply(x)`` is
    ``M x``. Displacements ``x = M^-1 u`` with the optimizer acting on ``u`` move the mesh by smooth, low-frequency
    steps: the gradient reaching ``u`` is the vertex gradient smoothed over about ``sqrt(lam)`` rings."""

    def __init__(self, num_vertices: int, edges: Tensor, lam: float) -> None:
        from scipy.sparse.linalg import splu

        self.lam = float(lam)
        self.matrix = smoothing_matrix(num_vertices, edges, lam)
        self._lu = splu(self.matrix)

    def _solve_np(self, x: Tensor) -> Tensor:
        out = self._lu.solve(x.detach().cpu().double().numpy())
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)

    def solve(self, u: Tensor) -> Tensor:
        """``M^-1 u`` for ``u [V, D]``, differentiable."""
        return _SmoothSolve.apply(u, self)

    def apply(self, x: Tensor) -> Tensor:
        """``M x`` for ``x [V, D]`` (no gradient)."""
        out = self.matrix @ x.detach().cpu().double().numpy()
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


class _SmoothSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, solver: SmoothSolver) -> Tensor:
        ctx.solver = solver
        return solver._solve_np(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.solver._solve_np(grad), None


class UniformAdam(torch.optim.Optimizer):
    """Adam whose second-moment estimate is the maximum over each parameter tensor (one scalar per tensor), as in the
    "large steps" paper: every element's step is proportional to its gradient, so vertices with a tiny gradient
    (nothing sees them) stay put instead of being moved at the full learning rate like per-element Adam does."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["v"].max() / (1 - b2**t)).sqrt() + group["eps"]
                p.add_(st["m"] / denom, alpha=-group["lr"] / (1 - b1**t))
        return None


def wrap_template(
    template_vertices: Tensor,  # [V, 3] the naked body's canonical surface
    template_faces: Tensor,  # [F, 3]
    target_vertices: Tensor,  # [M, 3] e.g. a fused canonical mesh
    target_faces: Tensor,  # [G, 3]
    search: tuple[float, float] = (-0.03, 0.08),
    step: float = 0.002,
    smooth_iters: int = 10,
    num_samples: int = 300_000,
    seed: int = 0,
    pick: str = "nearest",
) -> Tensor:
    """Offsets ``[V]`` (metres, along the template's area-weighted vertex normals) that move the template onto the
    target surface: the "body model + displacements" (SMPL+D) form of a clothed mesh, which keeps the template's
    topology, detail and skinning weights and drops what the target has that no offset reaches (sheets of wrongly
    canonicalized points, loose fragments).

    For each vertex the target's signed distance (point-to-plane distance of the nearest of ``num_samples``
    area-uniform samples of the target, outward normals) is evaluated along the normal line at ``step`` spacing over
    ``search`` (metres, inward, outward); the offset is the zero crossing nearest to the template (0 where there is
    none), then outliers are replaced by the median of their edge neighbours and the field is smoothed by
    ``smooth_iters`` passes of neighbour averaging (half weight to the vertex itself)."""
    import trimesh
    from scipy.spatial import cKDTree

    from avatar.render.mesh import vertex_normals

    _check_mesh("wrap_template (template)", template_vertices, template_faces)
    _check_mesh("wrap_template (target)", target_vertices, target_faces)
    if not (search[0] <= 0 <= search[1] and step > 0):
        raise ValueError(f"wrap_template: search must bracket 0 and step be > 0, got {search}, {step}")
    dev, dt = template_vertices.device, template_vertices.dtype
    tgt = trimesh.Trimesh(target_vertices.detach().cpu().double().numpy(), target_faces.cpu().numpy(), process=False)
    pts, fid = trimesh.sample.sample_surface(tgt, num_samples, seed=seed)
    nrm = tgt.face_normals[fid]
    tree = cKDTree(pts)
    v = template_vertices.detach().cpu().double()
    n = vertex_normals(v, template_faces.cpu().to(torch.int64)).numpy()
    v = v.numpy()
    ts = np.arange(search[0], search[1] + step / 2, step)  # [T]
    q = v[:, None, :] + ts[None, :, None] * n[:, None, :]  # [V, T, 3]
    _, idx = tree.query(q.reshape(-1, 3), workers=-1)
    sd = ((q.reshape(-1, 3) - pts[idx]) * nrm[idx]).sum(-1).reshape(len(v), len(ts))  # > 0 outside the target
    # zero crossings between consecutive samples: inside -> outside when moving outward
    a, b = sd[:, :-1], sd[:, 1:]
    cross = (a <= 0) & (b > 0)
    t_cross = ts[:-1] + step * a / np.where(cross, a - b, -1.0)  # linear interpolation of the zero
    t_cross = np.where(cross, t_cross, np.inf)
    best = np.argmin(np.abs(t_cross), axis=1) if pick == "nearest" else np.where(cross, np.arange(len(ts) - 1), -1).argmax(1)
    off = t_cross[np.arange(len(v)), best]
    found = np.isfinite(off)
    off = np.where(found, off, 0.0)
    e = mesh_edges(template_faces.cpu()).numpy()
    import scipy.sparse as sp

    A = sp.coo_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])),
                      shape=(len(v), len(v))).tocsr()
    # outliers: differ from the neighbours' median by more than 1.5 cm (or not found) -> the median
    indptr, nbr = A.indptr, A.indices
    med = np.array([np.median(off[nbr[indptr[i]:indptr[i + 1]]]) if indptr[i + 1] > indptr[i] else off[i]
                    for i in range(len(v))])
    off = np.where(~found | (np.abs(off - med) > 0.015), med, off)
    deg = np.asarray(A.sum(1)).ravel()
    for _ in range(smooth_iters):
        off = 0.5 * off + 0.5 * (A @ off) / np.maximum(deg, 1)
    return torch.from_numpy(off).to(device=dev, dtype=dt)


# ----------------------------------------------------------------------------------------------------------------
# joint-angle parameterization: one rotation per anatomical joint


MINOR_BONES = ("finger", "metacarpal", "toe", "eye")
"""Substrings of bone names (anny) whose rotations the refinement keeps at the input by default: fingers, toes and
eyes drive a few pixels of geometry at the image sizes this project fits, so they cannot be recovered from images."""


def _twin_key(name: str) -> str:
    """``upperarm01.L`` -> ``upperarm.L``, ``spine05`` -> ``spine``: a bone name without its two-digit segment
    counter (anny splits a limb or the spine into numbered bones of one anatomical segment)."""
    return re.sub(r"\d\d(?=(\.[LR])?$)", "", name)


def joint_groups(bone_names: Sequence[str], bone_parents: Sequence[int], exclude: Sequence[str] = MINOR_BONES,
                 merge_twins: bool = True) -> tuple[tuple[int, ...], ...]:
    """Bone groups that share one pose correction, each ordered from the chain's root to its tip.

    With ``merge_twins``, bones whose names differ only in a two-digit counter (``upperarm01/02.L``,
    ``spine05..01``, ``neck01..03``) and that form one parent chain are one group (an anatomical joint: images
    constrain the product of the chain's rotations, not how it splits); every other bone is its own group. Bones
    whose names contain one of ``exclude`` belong to no group (their rotations stay at the input)."""
    if len(bone_names) != len(bone_parents):
        raise ValueError(f"joint_groups: {len(bone_names)} names but {len(bone_parents)} parents")
    keep = [j for j, n in enumerate(bone_names) if not any(e in n for e in exclude)]
    by_key: dict[str, list[int]] = {}
    for j in keep:
        by_key.setdefault(_twin_key(bone_names[j]) if merge_twins else f"#{j}", []).append(j)
    groups = []
    for members in by_key.values():
        ms = set(members)
        heads = [j for j in members if bone_parents[j] not in ms]
        chain = [heads[0]] if len(heads) == 1 else []
        while chain:
            nxt = [j for j in members if bone_parents[j] == chain[-1]]
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
        if len(chain) == len(members):
            groups.append(tuple(chain))
        else:  # not one chain: no merging
            groups.extend((j,) for j in members)
    return tuple(sorted(groups))


def apply_joint_deltas(rotations: Tensor, deltas: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """Bone rotations ``[..., J, 3]`` (axis-angle, world axes about each head; see ``avatar.body``) corrected by one
    world-axis rotation per group, ``deltas [..., K, 3]`` (axis-angle, ``K = len(groups)``); bones in no group keep
    their rotation.

    A group ``b_1 .. b_n`` (a chain, root first) with input rotations ``R_1 .. R_n`` and partial products
    ``P_k = R_1 .. R_k`` gets ``R_k' = (P_{k-1}^T D^{1/n} P_{k-1}) R_k``, ``D = exp(delta)``: then
    ``P_k' = D^{k/n} P_k``, i.e. the chain's product turns by exactly ``D`` and each bone in it by an even share
    (the split stays as the input's). For a single bone this is ``R' = D R``."""
    if rotations.shape[-1] != 3 or deltas.shape[-1] != 3 or deltas.shape[-2] != len(groups):
        raise ValueError(f"apply_joint_deltas: rotations must be [..., J, 3] and deltas [..., {len(groups)}, 3], got "
                         f"{tuple(rotations.shape)}, {tuple(deltas.shape)}")
    bones, gid, frac, conj = [], [], [], []
    R = axis_angle_to_matrix(rotations.detach())  # [..., J, 3, 3]
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand(*R.shape[:-3], 3, 3)
    for g, chain in enumerate(groups):
        P = eye
        for b in chain:
            bones.append(b)
            gid.append(g)
            frac.append(1.0 / len(chain))
            conj.append(P)
            P = P @ R[..., b, :, :]
    if not bones:
        return rotations
    dev = rotations.device
    bones_t = torch.tensor(bones, device=dev)
    Pt = torch.stack(conj, -3)  # [..., M, 3, 3]
    d = deltas[..., torch.tensor(gid, device=dev), :] * torch.tensor(frac, device=dev, dtype=deltas.dtype)[:, None]
    local = (Pt.transpose(-1, -2).to(d.dtype) @ d[..., None])[..., 0]  # [..., M, 3]: P^T exp(d) P = exp(P^T d)
    new = matrix_to_axis_angle(axis_angle_to_matrix(local) @ axis_angle_to_matrix(rotations[..., bones_t, :]))
    return rotations.index_copy(-2, bones_t, new.to(rotations.dtype))


def joint_rotations(rotations: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """The composed rotation of every group's chain ``[..., K, 3, 3]`` (``R_1 .. R_n``) from bone rotations
    ``[..., J, 3]``: what images determine of a chain of twin bones, and the quantity to compare with a truth."""
    R = axis_angle_to_matrix(rotations)
    out = []
    for chain in groups:
        P = R[..., chain[0], :, :]
        for b in chain[1:]:
            P = P @ R[..., b, :, :]
        out.append(P)
    return torch.stack(out, -3)


# ----------------------------------------------------------------------------------------------------------------
# views and image losses


@dataclass(frozen=True)
class RefineView:
    """One observation of the subject.

    image:   [H, W, 3] float in [0, 1] (composited over ``MeshRefineConfig.background``).
    mask:    [H, W] float in [0, 1] (person = 1).
    camera:  ``Cameras`` with viewmats [4, 4], Ks [3, 3] (OpenCV).
    pose:    ``BodyPose`` with rotations [J, 3], translation [3]: the input (possibly wrong) pose.
    frame_id: views of one instant (cameras of a multi-view rig) share a frame id and so one pose correction.
    depth:   [H, W] camera z in metres (0 = unknown), e.g. a predicted depth map; or None.
    normals: [H, W, 3] unit camera-space normals (0 = unknown); or None.
    """

    image: Tensor
    mask: Tensor
    camera: Cameras
    pose: BodyPose
    frame_id: int = 0
    depth: Tensor | None = None
    normals: Tensor | None = None

    @staticmethod
    def from_frame(frame, depth: Tensor | None = None, normals: Tensor | None = None) -> "RefineView":
        """A view from an ``avatar.data.frames.Frame``."""
        return RefineView(frame.image, frame.mask, frame.camera, frame.pose, int(frame.frame_id), depth, normals)


def image_losses(
    render: MeshRenderOutput,
    images: Tensor,  # [C, H, W, 3]
    masks: Tensor,  # [C, H, W]
    depths: Tensor | None = None,  # [C, H, W], 0 = unknown
    normals: Tensor | None = None,  # [C, H, W, 3], 0 = unknown
    depth_clip: float = 0.05,
    silhouette_tolerance: float = 0.0,
) -> dict[str, Tensor]:
    """Per-term image losses of a render against targets (all means over pixels, scalars):

    ``photo``: L1 of the colours over every pixel (background included); ``silhouette``: mean of
    ``relu(|alpha - mask| - silhouette_tolerance)²`` (plain squared error for 0); ``depth``: L1 of camera z (metres, clipped at ``depth_clip`` so a wrong
    prediction cannot dominate) where the render and the target both have depth; ``normal``: mean ``1 - cos`` of
    rendered and target normals where both exist. Terms without targets or without overlap are 0."""
    zero = images.new_zeros(())
    sil = (render.alpha - masks).abs()
    if silhouette_tolerance > 0:
        sil = (sil - silhouette_tolerance).clamp(min=0)
    out = {"photo": (render.image - images).abs().mean(), "silhouette": sil.square().mean(),
           "depth": zero, "normal": zero}
    if depths is not None:
        valid = render.mask & (depths > 0)
        if bool(valid.any()):
            out["depth"] = (render.depth[valid] - depths[valid]).abs().clamp(max=depth_clip).mean()
    if normals is not None:
        valid = render.mask & (normals.norm(dim=-1) > 0.5)
        if bool(valid.any()):
            out["normal"] = (1.0 - (render.normals[valid] * normals[valid]).sum(-1)).mean()
    return out


def mask_sdf(masks: Tensor) -> Tensor:
    """Signed distance ``[C, H, W]`` (pixels, positive inside) of the boundary of binary ``masks [C, H, W]``
    (> 0.5 = inside), sampled at pixel centres: ``+(d - 0.5)`` inside and ``-(d - 0.5)`` outside, ``d`` the
    Euclidean distance to the nearest pixel centre of the other side. Bilinear interpolation then puts the zero level
    half-way between an inside and an outside pixel centre: the unbiased estimate of where the true edge lies when
    all a binary mask tells is which pixel centres it covers. An empty or full mask gives a constant field."""
    from scipy.ndimage import distance_transform_edt

    if masks.ndim != 3:
        raise ValueError(f"mask_sdf: masks must be [C, H, W], got {tuple(masks.shape)}")
    m = (masks > 0.5).cpu().numpy()
    out = np.empty(m.shape, np.float32)
    for c in range(m.shape[0]):
        if m[c].all() or not m[c].any():
            out[c] = float(max(m.shape[1:])) * (1.0 if m[c].all() else -1.0)
            continue
        d_in = distance_transform_edt(m[c])  # inside pixels: distance to the nearest outside centre
        d_out = distance_transform_edt(~m[c])
        out[c] = np.where(m[c], d_in - 0.5, -(d_out - 0.5))
    return torch.from_numpy(out).to(masks.device)


@torch.no_grad()
def rim_vertices(
    cam_vertices: Tensor,  # [C, V, 3] camera-space positions
    faces: Tensor,  # [F, 3]
    render: MeshRenderOutput,  # of the same vertices (any image size)
    pix: Tensor,  # [C, V, 2] pixel positions in the render's image
    depth_tolerance: float = 0.03,
) -> Tensor:
    """Which vertices lie on the rendered outer silhouette ``[C, V]`` (bool, no gradient): vertices of both a
    front- and a back-facing face (the contour generator), whose pixel has a background pixel within one pixel
    (8-neighbourhood) and which are not behind the surface seen there (camera z at most ``depth_tolerance`` metres
    behind the nearest rendered depth of that 3x3 neighbourhood)."""
    C, V, _ = cam_vertices.shape
    f = faces.to(torch.int64)
    tri = cam_vertices[:, f]  # [C, F, 3, 3]
    n = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
    front = ((n * tri.mean(2)).sum(-1) < 0).to(cam_vertices.dtype)  # [C, F]: facing the camera (at the origin)
    idx = f.reshape(-1)
    n_front = cam_vertices.new_zeros(C, V).index_add_(1, idx, front.repeat_interleave(3, dim=1))
    n_all = cam_vertices.new_zeros(V).index_add_(0, idx, torch.ones_like(idx, dtype=cam_vertices.dtype))
    contour = (n_front > 0) & (n_front < n_all)
    H, W = render.mask.shape[-2:]
    bg = ~render.mask
    near_bg = F.max_pool2d(bg[:, None].to(cam_vertices.dtype), 3, 1, 1)[:, 0] > 0  # [C, H, W]
    depth = torch.where(render.mask, render.depth, torch.full_like(render.depth, float("inf")))
    min_depth = -F.max_pool2d(-depth[:, None], 3, 1, 1)[:, 0]  # [C, H, W]
    i = pix[..., 0].floor().long()
    j = pix[..., 1].floor().long()
    inside = (i >= 0) & (i < W) & (j >= 0) & (j < H)
    ii, jj = i.clamp(0, W - 1), j.clamp(0, H - 1)
    cidx = torch.arange(C, device=pix.device)[:, None].expand(C, V)
    ok = near_bg[cidx, jj, ii] & (cam_vertices[..., 2] <= min_depth[cidx, jj, ii] + depth_tolerance)
    return contour & inside & ok


def rim_loss(pix: Tensor, rim: Tensor, sdf: Tensor, huber_px: float = 1.0) -> Tensor:
    """Mean Huber (``huber_px``) of the target boundary's signed distance (pixels, :func:`mask_sdf`) at the
    projected rim vertices: ``pix [C, V, 2]`` pixel positions in the image of ``sdf [C, H, W]``, ``rim [C, V]``
    from :func:`rim_vertices`. A rim vertex inside the target mask is pushed out, one outside pulled in, one on the
    target's edge costs nothing. 0 without rim vertices."""
    if not bool(rim.any()):
        return pix.new_zeros(())
    C, H, W = sdf.shape
    c, v = torch.nonzero(rim, as_tuple=True)
    p = pix[c, v]  # [N, 2]
    grid = torch.stack([2 * p[:, 0] / W - 1, 2 * p[:, 1] / H - 1], -1)
    # one grid_sample per view (points grouped by view)
    vals = pix.new_zeros(p.shape[0])
    for k in range(C):
        sel = c == k
        if bool(sel.any()):
            g = grid[sel][None, None]  # [1, 1, n, 2]
            vals = vals.index_put((torch.nonzero(sel)[:, 0],), F.grid_sample(
                sdf[k][None, None].to(p.dtype), g, mode="bilinear", padding_mode="border", align_corners=False)[0, 0, 0])
    return F.huber_loss(vals, torch.zeros_like(vals), delta=huber_px)


# ----------------------------------------------------------------------------------------------------------------
# configuration and result


@dataclass(frozen=True)
class MeshStage:
    """One optimization stage."""

    steps: int = 100
    """Optimizer steps of this stage."""
    vertices: bool = True
    """Optimize the canonical vertex offsets."""
    colors: bool = True
    """Optimize the vertex colours."""
    pose: bool = True
    """Optimize the per-frame joint-angle and root corrections."""
    subdivide: bool = False
    """Subdivide the mesh (midpoint, 4 faces per face) before this stage, if it stays under ``max_faces``."""
    lr_vertices: float = 1e-3
    """Adam learning rate of the vertex offsets (metres per step, roughly)."""
    lr_colors: float = 3e-2
    """Adam learning rate of the colour logits."""
    lr_pose: float = 5e-3
    """Adam learning rate of the joint-angle deltas (radians) and root translation deltas (x 0.1, metres)."""
    smooth: float = 0.0
    """Smoothing ``lam`` of the displacement parameterization (``I + lam L``, :class:`SmoothSolver`): large values move
    the surface by smooth, low-frequency steps (about ``sqrt(lam)`` edge rings wide); 0 = free per-vertex offsets."""
    scale: float = 1.0
    """Render and compare at this fraction of the image size (``1 / k`` for an integer ``k``; targets are
    area-downsampled): a coarse-to-fine image pyramid."""
    w_silhouette: float | None = None
    """This stage's weight of the soft-silhouette term (None: ``MeshRefineConfig.w_silhouette``). A pose-only stage
    (shape frozen, so the term cannot inflate the surface) gains from it: it sees every boundary pixel, with a wider
    basin than the rim term (measured, see design.md)."""
    w_rim: float | None = None
    """This stage's weight of the rim term (None: ``MeshRefineConfig.w_rim``)."""


@dataclass(frozen=True)
class MeshRefineConfig:
    """Refinement of a canonical mesh against posed views (see the module docstring)."""

    stages: tuple[MeshStage, ...] = (
        MeshStage(steps=40, vertices=False, lr_pose=1e-2, scale=0.5, w_silhouette=1.0, w_rim=0.0),
        MeshStage(steps=60, smooth=20.0, lr_vertices=1e-3, lr_pose=2e-3),
    )
    """The stages, in order: by default pose and colour first on half-size images against the soft silhouette (the
    shape stays), then shape (smooth "large steps" parameterization, rim term), pose and colour together at full
    size."""
    w_photo: float = 1.0
    """Weight of the L1 colour term."""
    w_silhouette: float = 0.0
    """Weight of the soft-silhouette term (``avatar.render.mesh.soft_silhouette`` against the masks). Off by default:
    against binary masks it pulls boundaries to pixel midpoints and, on meshes whose triangles are smaller than a
    pixel, inflates the surface (measured: a ground-truth start drifted from 0.55 to 3-5 mm Chamfer); the rim term
    replaces it."""
    w_rim: float = 1.0
    """Weight of the rim term (:func:`rim_loss`, Huber in pixels of the full image): the rendered outer silhouette's
    vertices against the signed distance of the mask boundary."""
    w_depth: float = 5.0
    """Weight of the depth term (L1 in metres), used for views with ``depth``."""
    w_normal: float = 0.05
    """Weight of the normal term (1 - cos), used for views with ``normals``."""
    w_laplacian: float = 2e3
    """Weight of the Laplacian of the vertex offsets (m²): keeps the displacement smooth."""
    w_normal_consistency: float = 0.0
    """Weight of the normal consistency of adjacent faces. It is absolute (it flattens the mesh's own detail, not
    only the displacement), so it is off by default; the smooth parameterization keeps the surface regular."""
    w_pose_prior: float = 1e-4
    """Weight of the L2 prior of the pose deltas towards the input pose (small: the input may be off by degrees)."""
    merge_twin_bones: bool = True
    """One pose correction per anatomical joint (:func:`joint_groups`): twin bones of one segment (anny's
    ``upperarm01/02``, ``spine05..01``, ``neck01..03``) share it, split evenly (:func:`apply_joint_deltas`), so the
    unknowns are what the images determine. False: one correction per bone."""
    pose_exclude: tuple[str, ...] = MINOR_BONES
    """Bones whose names contain one of these keep the input rotation (default: fingers, toes, eyes)."""
    views_per_step: int = 0
    """Views rendered per step (a random subset, seeded); 0 = all views every step."""
    max_faces: int = 200_000
    """Subdivision is skipped when it would exceed this many faces."""
    depth_clip: float = 0.05
    """Depth residuals are clipped at this many metres."""
    silhouette_tolerance: float = 0.0
    """Silhouette residuals ``|alpha - mask|`` up to this much cost nothing. With binary masks (coverage of pixel
    centres) a plain squared error pulls every boundary to the middle between two pixel centres wherever the true
    edge lies; a tolerance just under 0.5 (e.g. 0.45) only asks that each pixel centre is on the mask's side of the
    rendered edge (by a small margin), which the true surface satisfies. Area-downsampled masks (``scale < 1``) are
    fractional and compared with this tolerance too."""
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Background colour of the images, RGB in [0, 1]."""
    seed: int = 0
    """Seed of the view subsets."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        if not self.stages:
            raise ValueError("MeshRefineConfig.stages must hold at least one stage")
        for i, s in enumerate(self.stages):
            if not isinstance(s, MeshStage):
                raise ValueError(f"MeshRefineConfig.stages[{i}] must be a MeshStage, got {type(s).__name__}")
            if s.steps < 0:
                raise ValueError(f"MeshRefineConfig.stages[{i}].steps must be >= 0, got {s.steps}")
            for name in ("lr_vertices", "lr_colors", "lr_pose", "smooth", "w_silhouette", "w_rim"):
                if getattr(s, name) is None and name.startswith("w_"):
                    continue
                if not (getattr(s, name) >= 0 and math.isfinite(getattr(s, name))):
                    raise ValueError(f"MeshRefineConfig.stages[{i}].{name} must be a finite value >= 0, got {getattr(s, name)}")
            k = 1.0 / s.scale if s.scale > 0 else float("inf")
            if not (0 < s.scale <= 1 and abs(k - round(k)) < 1e-6):
                raise ValueError(f"MeshRefineConfig.stages[{i}].scale must be 1 / k for an integer k >= 1, got {s.scale}")
        for name in ("w_photo", "w_silhouette", "w_rim", "w_depth", "w_normal", "w_laplacian", "w_normal_consistency",
                     "w_pose_prior"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"MeshRefineConfig.{name} must be a finite value >= 0, got {v}")
        if self.views_per_step < 0:
            raise ValueError(f"MeshRefineConfig.views_per_step must be >= 0, got {self.views_per_step}")
        if not 0 <= self.silhouette_tolerance < 0.5:
            raise ValueError(f"MeshRefineConfig.silhouette_tolerance must be in [0, 0.5), got {self.silhouette_tolerance}")
        if not self.depth_clip > 0:
            raise ValueError(f"MeshRefineConfig.depth_clip must be > 0, got {self.depth_clip}")
        if len(self.background) != 3 or not all(0.0 <= float(b) <= 1.0 for b in self.background):
            raise ValueError(f"MeshRefineConfig.background must be 3 floats in [0, 1], got {self.background!r}")


@dataclass(frozen=True)
class RefinedMesh:
    """The refined canonical mesh and the corrected poses.

    vertices:     [V, 3] canonical positions, metres.
    faces:        [F, 3] int64.
    colors:       [V, 3] RGB in [0, 1].
    skin_weights: [V, J] dense skinning weights (carried over from the input, interpolated where subdivided).
    frame_ids:    the frames' ids, in the row order of ``poses``.
    poses:        ``BodyPose`` [N, J, 3] / [N, 3]: the corrected pose of each frame.
    history:      one dict per step (stage, step, loss and its terms, seconds).
    """

    vertices: Tensor
    faces: Tensor
    colors: Tensor
    skin_weights: Tensor
    frame_ids: tuple[int, ...]
    poses: BodyPose
    history: list[dict] = field(default_factory=list)

    def pose_of(self, frame_id: int) -> BodyPose:
        """The corrected pose of ``frame_id`` (rotations [J, 3], translation [3])."""
        i = self.frame_ids.index(int(frame_id))
        return BodyPose(self.poses.rotations[i], self.poses.translation[i])

    def to_trimesh(self):
        import trimesh

        col = (self.colors.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        return trimesh.Trimesh(self.vertices.detach().cpu().numpy(), self.faces.cpu().numpy(), vertex_colors=col,
                               process=False)


# ----------------------------------------------------------------------------------------------------------------
# the model (parameters only) and the loop


class MeshModel(nn.Module):
    """Parameters of the refinement: canonical ``base [V, 3]`` (buffer) + displacement, ``color_logits [V, 3]``,
    ``weights [V, J]`` (buffer) and the per-frame pose table (``PoseRefiner``). The displacement is ``offsets``
    itself, or ``M^-1 offsets`` while a smoothing ``lam > 0`` is set (:class:`SmoothSolver`, :meth:`set_smoothing`)."""

    def __init__(self, vertices: Tensor, faces: Tensor, colors: Tensor, weights: Tensor, refiner: PoseRefiner) -> None:
        super().__init__()
        self.register_buffer("base", vertices.detach().clone())
        self.register_buffer("faces", faces.detach().to(torch.int64).clone())
        self.register_buffer("weights", weights.detach().clone())
        self.offsets = nn.Parameter(torch.zeros_like(self.base))
        self.color_logits = nn.Parameter(_logit(colors.detach()))
        self.refiner = refiner
        self.solver: SmoothSolver | None = None
        self._topology()

    def _topology(self) -> None:
        self.edges = mesh_edges(self.faces)
        self.adjacency = face_adjacency(self.faces)

    def displacement(self) -> Tensor:
        """``[V, 3]`` canonical displacement from ``base`` (metres)."""
        return self.offsets if self.solver is None else self.solver.solve(self.offsets)

    def vertices(self) -> Tensor:
        return self.base + self.displacement()

    def colors(self) -> Tensor:
        return torch.sigmoid(self.color_logits)

    @torch.no_grad()
    def set_smoothing(self, lam: float) -> None:
        """Re-parameterize the current displacement ``d`` for smoothing ``lam`` (``offsets = (I + lam L) d``, or
        ``d`` itself for 0); the mesh does not move."""
        d = self.displacement().detach()
        if self.solver is not None and self.solver.lam == lam:
            return
        self.solver = SmoothSolver(self.base.shape[0], self.edges, lam) if lam > 0 else None
        self.offsets = nn.Parameter(d if self.solver is None else self.solver.apply(d))

    @torch.no_grad()
    def subdivide(self) -> None:
        """Subdivide (see :func:`subdivide_mesh`): the current vertices become the new base, offsets restart at 0."""
        v, f, a = subdivide_mesh(self.vertices(), self.faces, {"colors": self.colors(), "weights": self.weights})
        w = a["weights"].clamp(min=0)
        self.base = v
        self.faces = f
        self.weights = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        self.offsets = nn.Parameter(torch.zeros_like(v))
        self.color_logits = nn.Parameter(_logit(a["colors"]))
        self.solver = None
        self._topology()

    def param_groups(self, stage: MeshStage) -> list[dict]:
        groups = []
        if stage.vertices:
            groups.append(dict(name="offsets", params=[self.offsets], lr=stage.lr_vertices))
        if stage.colors:
            groups.append(dict(name="colors", params=[self.color_logits], lr=stage.lr_colors))
        if stage.pose:
            groups.append(dict(name="pose_rot", params=[self.refiner.rot_deltas], lr=stage.lr_pose))
            groups.append(dict(name="pose_trans", params=[self.refiner.trans_deltas], lr=stage.lr_pose * 0.1))
        return groups


def _logit(x: Tensor, eps: float = 1e-3) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x) - torch.log1p(-x)


def _mesh_arrays(canonical_mesh) -> tuple[Tensor, Tensor]:
    if isinstance(canonical_mesh, tuple) and len(canonical_mesh) == 2:
        return canonical_mesh
    if hasattr(canonical_mesh, "vertices") and hasattr(canonical_mesh, "faces"):
        v, f = canonical_mesh.vertices, canonical_mesh.faces
        if not isinstance(v, Tensor):
            v, f = torch.as_tensor(np.asarray(v), dtype=torch.float32), torch.as_tensor(np.asarray(f), dtype=torch.int64)
        return v, f
    raise TypeError(f"refine_mesh: canonical_mesh must have .vertices and .faces (e.g. a FusedMesh) or be a "
                    f"(vertices, faces) tuple, got {type(canonical_mesh).__name__}")


def _stack_views(views: Sequence[RefineView], num_bones: int):
    if len(views) == 0:
        raise ValueError("refine_mesh: no views")
    H, W = views[0].mask.shape
    for i, v in enumerate(views):
        if not isinstance(v, RefineView):
            raise TypeError(f"refine_mesh: views[{i}] must be a RefineView, got {type(v).__name__}")
        if v.image.shape != (H, W, 3) or v.mask.shape != (H, W):
            raise ValueError(f"refine_mesh: views[{i}] image {tuple(v.image.shape)} / mask {tuple(v.mask.shape)} must be "
                             f"[{H}, {W}, 3] / [{H}, {W}] like views[0]")
        if (v.camera.width, v.camera.height) != (W, H) or v.camera.viewmats.shape != (4, 4):
            raise ValueError(f"refine_mesh: views[{i}].camera must be one {W}x{H} camera (viewmats [4, 4]), got "
                             f"{v.camera.width}x{v.camera.height}, viewmats {tuple(v.camera.viewmats.shape)}")
        if v.pose.rotations.shape != (num_bones, 3) or v.pose.translation.shape != (3,):
            raise ValueError(f"refine_mesh: views[{i}].pose must be rotations [{num_bones}, 3], translation [3], got "
                             f"{tuple(v.pose.rotations.shape)}, {tuple(v.pose.translation.shape)}")
        if v.depth is not None and v.depth.shape != (H, W):
            raise ValueError(f"refine_mesh: views[{i}].depth must be [{H}, {W}], got {tuple(v.depth.shape)}")
        if v.normals is not None and v.normals.shape != (H, W, 3):
            raise ValueError(f"refine_mesh: views[{i}].normals must be [{H}, {W}, 3], got {tuple(v.normals.shape)}")
    return H, W


def _pyramid_level(images: Tensor, masks: Tensor, Ks: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Images ``[C, H, W, 3]`` and masks ``[C, H, W]`` area-downsampled by the integer ``k`` (sizes cropped to
    multiples of ``k``), and the intrinsics ``Ks [C, 3, 3]`` of the smaller images (pixel edges stay on pixel
    edges, so the first two rows scale by ``1 / k``)."""
    if k == 1:
        return images, masks, Ks
    H, W = masks.shape[-2:]
    h, w = H // k, W // k
    img = F.avg_pool2d(images[:, : h * k, : w * k].permute(0, 3, 1, 2), k).permute(0, 2, 3, 1)
    msk = F.avg_pool2d(masks[:, None, : h * k, : w * k], k)[:, 0]
    Ks = Ks.clone()
    Ks[:, :2] /= k
    return img.contiguous(), msk.contiguous(), Ks


def posed_vertices(vertices: Tensor, weights: Tensor, transforms: Tensor) -> Tensor:
    """Forward skinning of canonical ``vertices [V, 3]`` with dense ``weights [V, J]`` by per-view
    ``transforms [C, J, 4, 4]`` -> ``[C, V, 3]``."""
    return lbs_points(vertices, weights, transforms)


def refine_mesh(canonical_mesh, skin_weights: Tensor, views: Sequence[RefineView], body, cfg: MeshRefineConfig,
                shape: Tensor | None = None, colors: Tensor | None = None,
                callback: Callable[[int, MeshModel], None] | None = None) -> RefinedMesh:
    """Refine ``canonical_mesh`` (``.vertices [V, 3]`` / ``.faces [F, 3]``, e.g. a ``FusedMesh``, or a tuple) with
    dense ``skin_weights [V, J]`` against ``views`` posed by ``body`` (any ``BodyModel``) with ``shape [S]`` (default:
    the model's mean shape). ``colors [V, 3]`` start the vertex colours (default: from the views, see
    ``avatar.represent.avatar.initial_colors``). ``callback(step, model)`` runs after every optimizer step. Returns
    the refined mesh and every frame's corrected pose."""
    from avatar.represent.avatar import initial_colors

    if not isinstance(cfg, MeshRefineConfig):
        raise TypeError(f"refine_mesh: cfg must be a MeshRefineConfig, got {type(cfg).__name__}")
    cfg.validate()
    vertices, faces = _mesh_arrays(canonical_mesh)
    _check_mesh("refine_mesh", vertices, faces)
    J = body.num_bones
    if skin_weights.shape != (vertices.shape[0], J):
        raise ValueError(f"refine_mesh: skin_weights must be [{vertices.shape[0]}, {J}] (dense, one column per bone of "
                         f"{body.name}), got {tuple(skin_weights.shape)}")
    views = list(views)
    H, W = _stack_views(views, J)
    dev, dt = vertices.device, torch.float32
    shape = body.default_shape() if shape is None else shape.reshape(-1)
    images = torch.stack([v.image for v in views]).to(dev, dt)  # [C, H, W, 3]
    masks = torch.stack([v.mask for v in views]).to(dev, dt)  # [C, H, W]
    viewmats = torch.stack([v.camera.viewmats for v in views]).to(dev, dt)  # [C, 4, 4]
    Ks = torch.stack([v.camera.Ks for v in views]).to(dev, dt)  # [C, 3, 3]
    depths = (torch.stack([v.depth if v.depth is not None else torch.zeros(H, W) for v in views]).to(dev, dt)
              if any(v.depth is not None for v in views) else None)
    normals = (torch.stack([v.normals if v.normals is not None else torch.zeros(H, W, 3) for v in views]).to(dev, dt)
               if any(v.normals is not None for v in views) else None)
    frame_ids = sorted({int(v.frame_id) for v in views})
    first = {}
    for v in views:
        first.setdefault(int(v.frame_id), v.pose)
    input_rot = torch.stack([first[f].rotations for f in frame_ids]).to(dev, dt)  # [N, J, 3]
    input_trans = torch.stack([first[f].translation for f in frame_ids]).to(dev, dt)  # [N, 3]
    row = torch.tensor([frame_ids.index(int(v.frame_id)) for v in views], device=dev)  # [C]
    joints = joint_groups(body.bone_names, body.bone_parents, cfg.pose_exclude, cfg.merge_twin_bones)
    if not joints:
        raise ValueError(f"refine_mesh: cfg.pose_exclude {cfg.pose_exclude!r} leaves no bone of {body.name} to correct")
    refiner = PoseRefiner(frame_ids, len(joints)).to(dev)
    weights = skin_weights.to(dev, dt)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)

    def transforms_now() -> Tensor:  # [N, J, 4, 4] for the corrected poses of every frame
        pose = BodyPose(apply_joint_deltas(input_rot, refiner.rot_deltas, joints), input_trans + refiner.trans_deltas)
        T, _ = body.bone_transforms(pose, shape)
        return T.to(dt)

    if colors is None:
        with torch.no_grad():
            T0 = transforms_now()
            col = initial_colors(vertices.to(dt), weights, [(images[c], masks[c], Cameras(viewmats[c], Ks[c], W, H),
                                                             T0[row[c]]) for c in range(len(views))])
    else:
        if colors.shape != (vertices.shape[0], 3):
            raise ValueError(f"refine_mesh: colors must be [{vertices.shape[0]}, 3], got {tuple(colors.shape)}")
        col = colors.to(dev, dt)
    model = MeshModel(vertices.to(dt), faces, col, weights, refiner)
    sdf = mask_sdf(masks) if cfg.w_rim > 0 or any(s.w_rim for s in cfg.stages) else None  # [C, H, W]
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    total = sum(s.steps for s in cfg.stages)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="refine mesh", unit="step")
    step = 0
    try:
        for si, stage in enumerate(cfg.stages):
            if stage.subdivide and model.faces.shape[0] * 4 <= cfg.max_faces:
                model.subdivide()
            model.set_smoothing(stage.vertices and stage.smooth or 0.0)
            groups = model.param_groups(stage)
            if not groups or stage.steps == 0:
                continue
            k = int(round(1.0 / stage.scale))
            h, w = H // k, W // k
            w_sil = cfg.w_silhouette if stage.w_silhouette is None else stage.w_silhouette
            w_rim = cfg.w_rim if stage.w_rim is None else stage.w_rim
            imgs_s, masks_s, Ks_s = _pyramid_level(images, masks, Ks, k)
            depths_s = None if depths is None or k > 1 else depths
            normals_s = None if normals is None or k > 1 else normals
            vert_groups = [g for g in groups if g["name"] == "offsets"]
            optimizers = [torch.optim.Adam([g for g in groups if g["name"] != "offsets"])] if len(vert_groups) < len(groups) else []
            if vert_groups:
                optimizers.append(UniformAdam(vert_groups))
            for _ in range(stage.steps):
                t0 = time.perf_counter()
                sel = torch.arange(len(views), device=dev)
                if 0 < cfg.views_per_step < len(views):
                    sel = torch.randperm(len(views), generator=gen)[: cfg.views_per_step].to(dev)
                T = transforms_now()[row[sel]]  # [c, J, 4, 4]
                verts = model.vertices()
                posed = posed_vertices(verts, model.weights, T)  # [c, V, 3]
                out = render_mesh(posed, model.faces, model.colors(), viewmats[sel], Ks_s[sel], w, h,
                                  background=cfg.background, shading=False)
                terms = image_losses(out, imgs_s[sel], masks_s[sel], None if depths_s is None else depths_s[sel],
                                     None if normals_s is None else normals_s[sel], cfg.depth_clip,
                                     cfg.silhouette_tolerance)
                if w_rim > 0:
                    cam = posed @ viewmats[sel, :3, :3].transpose(-1, -2) + viewmats[sel, None, :3, 3]
                    pix = project_points(posed, viewmats[sel], Ks[sel])[0]  # full-resolution pixels
                    rim = rim_vertices(cam.detach(), model.faces, out, pix.detach() / k)
                    terms["rim"] = rim_loss(pix, rim, sdf[sel])
                else:
                    terms["rim"] = verts.new_zeros(())
                terms["laplacian"] = laplacian_loss(verts, model.faces, model.base, model.edges)
                terms["normal_consistency"] = normal_consistency_loss(verts, model.faces, model.adjacency)
                terms["pose_prior"] = refiner.prior()
                loss = (cfg.w_photo * terms["photo"] + w_sil * terms["silhouette"] + w_rim * terms["rim"]
                        + cfg.w_depth * terms["depth"] + cfg.w_normal * terms["normal"]
                        + cfg.w_laplacian * terms["laplacian"] + cfg.w_normal_consistency * terms["normal_consistency"]
                        + cfg.w_pose_prior * terms["pose_prior"])
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                step += 1
                rec = {"stage": si, "step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - t0}
                rec.update({k: float(v.detach()) for k, v in terms.items()})
                history.append(rec)
                if callback is not None:
                    callback(step, model)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", stage=si)
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        poses = BodyPose(apply_joint_deltas(input_rot, refiner.rot_deltas, joints), input_trans + refiner.trans_deltas)
        return RefinedMesh(vertices=model.vertices().detach().clone(), faces=model.faces.clone(),
                           colors=model.colors().detach().clone(), skin_weights=model.weights.clone(),
                           frame_ids=tuple(frame_ids), poses=BodyPose(poses.rotations.detach().clone(),
                                                                     poses.translation.detach().clone()),
                           history=history)

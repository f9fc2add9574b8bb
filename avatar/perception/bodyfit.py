"""Fit the body model to a monocular video's detections: one shape, and a pose and translation per frame.

The camera is fixed at the origin (OpenCV axes: x right, y down, z forward; ``viewmat`` = identity), so the fitted
poses are in camera coordinates. Terms, all robust (Geman-McClure) where they compare with detections:

* 2D reprojection of the body's 23 keypoints (``BodyModel.keypoints``: COCO-17 + feet) against the detected ones,
  weighted by the detector's confidence;
* 3D (weight 0 by default): the keypoints relative to the hip centre against BlazePose's metric world landmarks
  (camera-aligned axes). Those landmarks initialize every frame's root rotation and translation; as a loss term they
  made the fit worse on synthetic clips with known poses (MPJPE 70 mm without, 78 mm at weight 0.01, 90 mm at 0.1:
  their depth is biased towards a forward lean and off by ~7-9 cm);
* silhouette: soft IoU of the body's silhouette (``avatar.render.mesh.soft_silhouette``) with the detected mask, on a
  few frames per step at reduced resolution (last stage only);
* priors: squared axis-angles of the fitted bones (a weak pull to the rest pose), a hinge prior (knees bend only
  backwards, elbows only forwards: the squared part of the knee / elbow rotation about its bending axis that has the
  wrong sign, as SMPLify's bending term), the shape towards the mean, and temporal smoothness (keypoint
  accelerations, with the actual time steps between kept frames), and a Geman-McClure penalty on the fitted bones'
  angular velocities (rad/s): from one view a limb near the image plane can swing forwards or backwards in depth at
  almost no 2D cost (its foreshortening changes with the cosine), so a per-frame fit drifts and flips the limbs' depth
  slowly across frames; the robust velocity term removes such slow drifts (quadratic below sigma) while real swings,
  much faster, saturate it. Keypoint accelerations do not see these drifts: they are smooth in time.

Robustness: frames the detector missed are not passed in (the caller drops and counts them); keypoints it is unsure
of have low confidence; after the pose stage each frame's arms and legs are tested with their left/right labels
exchanged and the labels are swapped where that agrees clearly better with what the fit of the two neighbouring frames
predicts (a frame with swapped labels can be fitted by crossing the limbs, so its own fit cannot tell; swaps are a
BlazePose failure mode on people seen from behind), then the pose stage runs again.

Why a small forward-kinematics here instead of ``BodyModel.bone_transforms``: anny's own kinematics runs per frame
over its 104 bones and took 1.4-3 s per call for 100 frames with gradients on the 2-core machine; the same transforms
composed level by level of the bone tree in batched torch take a few milliseconds (checked against the body model in
the tests). The keypoints are linear in the bone transforms for a fixed shape (``keypoint_k = sum_j G_j a_kj`` with
``a_kj = sum_v R_kv w_vj [v; 1]``), so the 2D/3D terms never skin the 13.7k-vertex mesh; only the silhouette does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import roma
import torch
from torch import Tensor

from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from avatar.perception.landmarks import LEFT_RIGHT_PAIRS, TORSO, Detections
from avatar.types import BodyPose

__all__ = ["BodyFitConfig", "BodyFit", "fit_body", "Kinematics", "DEFAULT_BONES"]

# bones whose rotations are fitted (anny names); the others stay at rest. Twist about a limb's own axis is not
# observable from keypoints; the pose prior keeps it small.
DEFAULT_BONES = ("spine03", "spine01", "neck01", "head", "upperarm01.L", "upperarm01.R", "lowerarm01.L",
                 "lowerarm01.R", "upperleg01.L", "upperleg01.R", "lowerleg01.L", "lowerleg01.R", "foot.L", "foot.R")
ARM_KEYPOINTS = (5, 6, 7, 8, 9, 10)
LEG_KEYPOINTS = (11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22)


@dataclass
class BodyFitConfig:
    iters_global: int = 150
    iters_pose: int = 300
    iters_refit: int = 100
    # optional first pose stage with the world landmarks at weight w_3d_init (to start the limbs on BlazePose's side
    # of the depth ambiguity). Measured (100 iters, w_3d_init 0.1 / 1 / 10): free motion MPJPE 68.4 -> 67.3 / 66.6 /
    # 66.6 mm, A-pose turn 29.5 -> 32.8 / 33.8 mm, so off by default
    iters_pose_3d: int = 0
    w_3d_init: float = 0.1
    iters_shape: int = 200  # measured (10 s free / 4 s turn clips): 80 -> 200 MPJPE 71.9 -> 68.4 / 36.0 -> 29.5 mm
    lr: float = 0.03
    w_2d: float = 1.0
    w_3d: float = 0.0  # off by default: BlazePose's world depth is biased (see design.md); it initializes the root
    w_pose_prior: float = 0.1  # measured: free motion MPJPE 69.8 -> 68-70 mm, A-pose turn 61.8 -> 48-56 mm (0.01 -> 0.05-0.2)
    w_hinge: float = 1.0  # knees bend backwards only, elbows forwards only (SMPLify's bending prior)
    w_shape_prior: float = 0.05
    w_smooth: float = 0.05
    # robust (Geman-McClure) penalty on the fitted bones' angular velocities: slow drifts of the limbs along the
    # unobservable depth direction cost ~ v^2, real fast swings saturate (measured, see design.md: A-pose turn MPJPE
    # 52.6 -> 36.0 mm, free motion 70.6 -> 71.9 mm; L2 or weight 1 hurt the free motion: 75.6-101.8 mm)
    w_pose_velocity: float = 0.2
    sigma_pose_velocity: float = 1.0  # rad/s (0: plain L2)
    w_silhouette: float = 0.5
    sigma_2d: float = 0.15  # Geman-McClure scale of the 2D term, as a fraction of the image height (SMPLify: 100 px)
    sigma_3d: float = 0.2  # metres
    silhouette_frames: int = 6
    silhouette_size: int = 160  # longer side of the silhouette images
    swap_margin: float = 0.7  # swap a limb pair's labels when that error is below this fraction of the current one
    fit_shape: bool = True
    bones: tuple[str, ...] = DEFAULT_BONES
    seed: int = 0

    def validate(self) -> None:
        for name in ("iters_global", "iters_pose_3d", "iters_pose", "iters_refit", "iters_shape", "silhouette_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"BodyFitConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.w_pose_velocity < 0 or self.sigma_pose_velocity < 0:
            raise ValueError(f"BodyFitConfig: w_pose_velocity and sigma_pose_velocity must be >= 0, got {self}")
        if not self.lr > 0 or self.silhouette_size < 16 or not 0 < self.swap_margin <= 1:
            raise ValueError(f"BodyFitConfig: invalid lr/silhouette_size/swap_margin in {self}")


@dataclass
class BodyFit:
    """shape [S]; pose: BodyPose [F, J] in camera coordinates; error_px [F] mean confident 2D error;
    swapped [F, 2] bool (arms, legs) labels exchanged; seconds per stage; init_pose: the initialization (rest
    pose, root rotation by Kabsch on the torso, translation from the landmarks), with the mean shape."""

    shape: Tensor
    pose: BodyPose
    error_px: np.ndarray
    swapped: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    init_pose: BodyPose | None = None


class Kinematics:
    """Level-by-level forward kinematics of a body model for a fixed rest state (same convention as the model:
    each bone's axis-angle turns it about its rest head in world-aligned axes, the root then moves by ``t``).

    ``active``: the bones that may rotate (default: all). A bone at rest has the identity local transform, so its
    canonical-to-posed transform is its nearest active ancestor's: only the active bones are composed."""

    def __init__(self, body, bone_heads: Tensor, active: tuple[int, ...] | None = None) -> None:
        parents = [max(p, 0) for p in body.bone_parents]
        J = len(parents)
        act = sorted(set(range(J) if active is None else active) | {0})
        pos = {j: i for i, j in enumerate(act)}
        owner = list(range(J))  # nearest active ancestor (or self)
        for j in range(J):
            a = j
            while a not in pos:
                a = parents[a]
            owner[j] = pos[a]
        self.active = torch.tensor(act)
        self.owner = torch.tensor(owner)
        aparent = [owner[parents[j]] if j else 0 for j in act]  # active index of each active bone's active parent
        depth = [0] * len(act)
        for i in range(1, len(act)):
            depth[i] = depth[aparent[i]] + 1  # parents precede children in both body models
        self.aparent = torch.tensor(aparent)
        self.levels = [torch.tensor([i for i in range(len(act)) if depth[i] == d]) for d in range(1, max(depth, default=0) + 1)]
        self.heads = bone_heads  # [J, 3]

    def transforms(self, rotations: Tensor, translation: Tensor) -> Tensor:
        """``rotations [F, J, 3]`` (non-active bones must be zero), ``translation [F, 3]`` -> canonical-to-posed bone
        transforms ``[F, J, 3, 4]``."""
        R = axis_angle_to_matrix(rotations[:, self.active])  # [F, A, 3, 3]
        h = self.heads[self.active].to(R.dtype)
        local_t = h - (R @ h.unsqueeze(-1)).squeeze(-1)  # [F, A, 3]: x -> R x + (h - R h)
        root = torch.tensor([0])
        G_R = torch.empty_like(R).index_copy(1, root, R[:, :1])
        G_t = torch.empty_like(local_t).index_copy(1, root, (local_t[:, 0] + translation).unsqueeze(1))
        for lvl in self.levels:
            p = self.aparent[lvl]
            PR, Pt = G_R[:, p], G_t[:, p]
            G_R = G_R.index_copy(1, lvl, PR @ R[:, lvl])
            G_t = G_t.index_copy(1, lvl, (PR @ local_t[:, lvl].unsqueeze(-1)).squeeze(-1) + Pt)
        G = torch.cat([G_R, G_t.unsqueeze(-1)], dim=-1)
        return G[:, self.owner]

    def joints(self, G: Tensor) -> Tensor:
        """Posed bone heads ``[F, J, 3]`` for transforms ``G [F, J, 3, 4]``."""
        return (G[..., :3] @ self.heads.to(G.dtype).unsqueeze(-1)).squeeze(-1) + G[..., 3]


def keypoint_basis(body, rest_vertices: Tensor) -> Tensor:
    """``a [K, J, 4]`` with ``keypoint_k = sum_j G_j a_kj`` for LBS of ``rest_vertices [V, 3]``."""
    Rk = body.keypoint_regressor.to(rest_vertices.dtype)  # [K, V]
    W = body.dense_skin_weights().to(rest_vertices.dtype)  # [V, J]
    vh = torch.cat([rest_vertices, torch.ones_like(rest_vertices[:, :1])], dim=-1)  # [V, 4]
    nz = (Rk.abs().sum(0) > 0).nonzero().squeeze(1)  # the few vertices the regressor uses
    return torch.einsum("kv,vj,vc->kjc", Rk[:, nz], W[nz], vh[nz])


def keypoints_from(G: Tensor, basis: Tensor) -> Tensor:
    """Posed keypoints ``[F, K, 3]`` from transforms ``[F, J, 3, 4]`` and ``basis [K, J, 4]``."""
    return torch.einsum("fjab,kjb->fka", G, basis)


def _gmof(sq: Tensor, sigma: float) -> Tensor:
    s2 = sigma * sigma
    return s2 * sq / (sq + s2)


def _project(P: Tensor, K: Tensor) -> Tensor:
    z = P[..., 2:3].clamp(min=1e-3)
    uv = P[..., :2] / z
    return uv * torch.stack([K[0, 0], K[1, 1]]) + torch.stack([K[0, 2], K[1, 2]])


def _hip_translation(world: Tensor, kp2d: Tensor, conf: Tensor, K: Tensor) -> Tensor:
    """Camera position of the world landmarks' origin (the hip centre) that best reprojects them: linear least
    squares in ``T`` of ``(u - c)(Z + Tz) = f (X + Tx)`` (the full-perspective translation estimate of SPIN)."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    u = kp2d[:, 0] - cx
    v = kp2d[:, 1] - cy
    X, Y, Z = world[:, 0], world[:, 1], world[:, 2]
    zero = torch.zeros_like(u)
    A = torch.cat([torch.stack([fx.expand_as(u), zero, -u], 1), torch.stack([zero, fy.expand_as(v), -v], 1)])
    b = torch.cat([u * Z - fx * X, v * Z - fy * Y])
    w = torch.cat([conf, conf]).sqrt()
    T = torch.linalg.lstsq(A * w[:, None], (b * w)[:, None]).solution[:, 0]
    if not torch.isfinite(T).all() or T[2] < 0.3:
        T = torch.tensor([0.0, 0.0, 3.0], dtype=world.dtype)
    return T


def _swap_labels(x: np.ndarray, keypoints: tuple[int, ...]) -> np.ndarray:
    """Per-frame keypoint array ``x [23, ...]`` with the left/right pairs among ``keypoints`` exchanged."""
    y = x.copy()
    for a, b in LEFT_RIGHT_PAIRS:
        if a in keypoints:
            y[a], y[b] = x[b], x[a]
    return y


def fit_body(
    body,
    det: Detections,  # found frames only
    K: Tensor,  # [3, 3] pixel intrinsics of the (fixed) camera
    width: int,
    height: int,
    timestamps: np.ndarray,  # [F] seconds
    cfg: BodyFitConfig | None = None,
    progress: bool = True,
) -> BodyFit:
    """Fit ``body`` to the detections of F frames; see the module docstring for the terms and stages."""
    from tqdm import tqdm

    from avatar.render.mesh import soft_silhouette
    from avatar.skinning.lbs import lbs_points

    cfg = cfg or BodyFitConfig()
    cfg.validate()
    F = det.num_frames
    if F == 0:
        raise ValueError("fit_body: no frame with a detected person")
    if body.keypoint_regressor is None:
        raise ValueError(f"fit_body: the {body.name} body model has no keypoint regressor")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dtype = torch.float32
    K = K.to(dtype)
    J = body.num_bones
    bone_ids = torch.tensor([body.bone_index(n) for n in cfg.bones])
    kp2d_np, conf_np, world_np = det.keypoints.copy(), det.confidence.copy(), det.world.copy()
    swapped = np.zeros((F, 2), bool)

    def targets():
        return (torch.from_numpy(kp2d_np).to(dtype), torch.from_numpy(conf_np).to(dtype),
                torch.from_numpy(world_np).to(dtype))

    kp2d, conf, world = targets()
    dt = torch.from_numpy(np.diff(np.asarray(timestamps, np.float64))).to(dtype).clamp(min=1e-3)
    dt_typ = float(dt.median()) if len(dt) else 1.0
    masks = torch.from_numpy(det.masks).to(dtype)
    s = cfg.silhouette_size / max(width, height)
    sw, sh = max(16, int(round(width * s))), max(16, int(round(height * s)))
    masks_small = torch.nn.functional.interpolate(masks[:, None], size=(sh, sw), mode="area")[:, 0]
    K_small = K.clone()
    K_small[0] *= sw / width
    K_small[1] *= sh / height
    sigma_px = cfg.sigma_2d * height
    unit_px = 0.01 * height  # the 2D term is in units of (1 % of the image height)^2, the 3D term of (2 cm)^2
    timings: dict[str, float] = {}

    shape0 = body.default_shape().to(dtype)
    shape_param = shape0.clone().requires_grad_(cfg.fit_shape)

    def rest_state(shape: Tensor):
        rest = body.rest(shape[None])
        return rest.vertices[0], rest.bone_heads[0]

    with torch.no_grad():
        rest_v, rest_h = rest_state(shape0)
        basis0 = keypoint_basis(body, rest_v)
        active = tuple(int(b) for b in bone_ids)
        kin0 = Kinematics(body, rest_h, active)
        rest_kp = keypoints_from(kin0.transforms(torch.zeros(1, J, 3), torch.zeros(1, 3)), basis0)[0]  # [K, 3]
    # --- initialization: root rotation by Kabsch on the torso, translation from the 3D/2D landmarks
    torso = list(TORSO)
    hip_rest = rest_kp[[11, 12]].mean(0)
    h0 = rest_h[0]

    def init_root(f: int) -> tuple[Tensor, Tensor]:
        w = conf[f, torso].clamp(min=1e-3)
        src = rest_kp[torso] - hip_rest
        dst = world[f, torso] - world[f, [11, 12]].mean(0)
        if not torch.isfinite(dst).all() or dst.abs().sum() == 0:
            R = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # facing the camera, upright
        else:  # weighted Kabsch (roma); the translation comes from the 2D/3D estimate below
            R = roma.rigid_points_registration(src, dst, weights=w)[0]
        T = _hip_translation(world[f] - world[f, [11, 12]].mean(0), kp2d[f], conf[f], K)
        return matrix_to_axis_angle(R), T - h0 - R @ (hip_rest - h0)

    root0 = torch.zeros(F, 3)
    trans0 = torch.zeros(F, 3)
    for f in range(F):
        root0[f], trans0[f] = init_root(f)
    init_rot = torch.zeros(F, J, 3)
    init_rot[:, 0] = root0
    init_pose = BodyPose(init_rot, trans0.clone())
    root = root0.clone().requires_grad_(True)
    trans = trans0.clone().requires_grad_(True)
    bones = torch.zeros(F, len(cfg.bones), 3, requires_grad=True)
    # hinge joints: (column in ``bones``, unit axis about which a positive angle bends the joint the allowed way)
    front = torch.tensor([0.0, -1.0, 0.0])  # anny faces -y, z up (the rest frame the axis-angles are expressed in)
    hinge_cols, hinge_axes = [], []
    for bone, child, towards in (("lowerleg01.L", "foot.L", -front), ("lowerleg01.R", "foot.R", -front),
                                 ("lowerarm01.L", "wrist.L", front), ("lowerarm01.R", "wrist.R", front)):
        if bone in cfg.bones and child in body.bone_names and body.name == "anny":
            d = rest_h[body.bone_index(child)] - rest_h[body.bone_index(bone)]
            a = torch.linalg.cross(d / d.norm(), towards)
            hinge_cols.append(cfg.bones.index(bone))
            hinge_axes.append(a / a.norm())
    hinge_axes_t = torch.stack(hinge_axes) if hinge_axes else torch.zeros(0, 3)

    def hinge_term() -> Tensor:
        if not hinge_cols:
            return bones.new_zeros(())
        angle = (bones[:, hinge_cols] * hinge_axes_t).sum(-1)  # [F, H] signed bending angle
        return (torch.relu(-angle) ** 2).sum(-1).mean()

    def full_rotations() -> Tensor:
        rot = torch.zeros(F, J, 3, dtype=dtype)
        rot = rot.index_copy(1, bone_ids, bones)
        rot = rot.index_copy(1, torch.tensor([0]), root.unsqueeze(1))
        return rot

    def data_terms(P: Tensor, kp_w: Tensor) -> tuple[Tensor, Tensor]:
        uv = _project(P, K)
        sq = ((uv - kp2d) ** 2).sum(-1)
        c = conf * kp_w
        l2d = (c * _gmof(sq, sigma_px)).sum() / c.sum().clamp(min=1e-6) / unit_px**2
        rel = P - P[:, [11, 12]].mean(1, keepdim=True)
        sq3 = ((rel - world) ** 2).sum(-1)
        l3d = (c * _gmof(sq3, cfg.sigma_3d)).sum() / c.sum().clamp(min=1e-6) / 0.02**2
        return l2d, l3d

    def smooth_term(P: Tensor) -> Tensor:
        if F < 3:
            return P.new_zeros(())
        vel = (P[1:] - P[:-1]) / dt[:, None, None]
        acc = (vel[1:] - vel[:-1]) * dt_typ**2 / 0.01  # metres of deviation from constant velocity, per cm
        return (acc**2).sum(-1).mean()

    def run_stage(name: str, iters: int, params: list[Tensor], kp_w: Tensor, use_shape: bool, use_sil: bool,
                  w_3d: float | None = None):
        w_3d = cfg.w_3d if w_3d is None else w_3d
        if iters == 0:
            return
        t0 = time.perf_counter()
        opt = torch.optim.Adam(params, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=cfg.lr * 0.1)
        basis, kin, rv = basis0, kin0, rest_v
        for _ in tqdm(range(iters), desc=f"body fit: {name}", unit="step", disable=not progress, leave=False):
            opt.zero_grad(set_to_none=True)
            if use_shape:
                rv, rh = rest_state(shape_param)
                basis, kin = keypoint_basis(body, rv), Kinematics(body, rh, active)
            G = kin.transforms(full_rotations(), trans)
            P = keypoints_from(G, basis)
            l2d, l3d = data_terms(P, kp_w)
            loss = cfg.w_2d * l2d + w_3d * l3d + cfg.w_smooth * smooth_term(P)
            loss = loss + cfg.w_pose_prior * (bones**2).sum(-1).mean() * len(cfg.bones)
            loss = loss + cfg.w_hinge * hinge_term() * 100.0  # 0.1 rad the wrong way costs 1
            if cfg.w_pose_velocity > 0 and F >= 2:
                v2 = ((bones[1:] - bones[:-1]) ** 2).sum(-1) / (dt**2)[:, None]  # (rad/s)^2
                if cfg.sigma_pose_velocity > 0:
                    dv = _gmof(v2, cfg.sigma_pose_velocity) / cfg.sigma_pose_velocity**2  # in [0, 1)
                else:
                    dv = v2
                loss = loss + cfg.w_pose_velocity * dv.mean() * len(cfg.bones)
            if use_shape:
                loss = loss + cfg.w_shape_prior * ((shape_param - shape0) ** 2).sum()
            if use_sil and cfg.silhouette_frames > 0:
                pick = torch.from_numpy(rng.choice(F, size=min(F, cfg.silhouette_frames), replace=False))
                Gp = G[pick]
                G4 = torch.cat([Gp, torch.tensor([0.0, 0, 0, 1]).expand(*Gp.shape[:-2], 1, 4)], dim=-2)
                verts = lbs_points(rv.expand(len(pick), -1, -1), body.skin_weights, G4, body.skin_indices)
                eye = torch.eye(4).expand(len(pick), 4, 4)
                sil = soft_silhouette(verts, body.faces, eye, K_small.expand(len(pick), 3, 3), sw, sh)
                m = masks_small[pick]
                inter = (sil * m).sum((1, 2))
                union = (sil + m - sil * m).sum((1, 2)).clamp(min=1.0)
                loss = loss + cfg.w_silhouette * (1 - inter / union).mean()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                if use_shape:
                    shape_param.clamp_(0.0, 1.0)
        timings[name] = round(time.perf_counter() - t0, 2)

    torso_w = torch.zeros(23)
    torso_w[torso] = 1.0
    all_w = torch.ones(23)
    run_stage("global", cfg.iters_global, [root, trans], torso_w, False, False)
    if cfg.iters_pose_3d > 0:
        run_stage("pose from world landmarks", cfg.iters_pose_3d, [root, trans, bones], all_w, False, False, cfg.w_3d_init)
    run_stage("pose", cfg.iters_pose, [root, trans, bones], all_w, False, False)

    # --- left/right label check per frame and limb group, against what the neighbouring frames' fit predicts (a
    # frame whose labels are swapped can be fitted by crossing the limbs, so its own fit cannot tell)
    with torch.no_grad():
        P = keypoints_from(kin0.transforms(full_rotations(), trans), basis0)
        uv = _project(P, K).numpy()
    ref = uv.copy()
    if F >= 2:
        ref[1:-1] = 0.5 * (uv[:-2] + uv[2:])
        ref[0], ref[-1] = uv[1], uv[-2]
    any_swap = False
    for g, group in enumerate((ARM_KEYPOINTS, LEG_KEYPOINTS)):
        idx = list(group)
        for f in range(F if F >= 2 else 0):
            c = conf_np[f, idx]
            if c.sum() <= 0:
                continue
            err = (c * np.linalg.norm(ref[f, idx] - kp2d_np[f, idx], axis=-1)).sum() / c.sum()
            sw_kp = _swap_labels(kp2d_np[f], group)
            sw_c = _swap_labels(conf_np[f], group)
            cs = sw_c[idx]
            err_sw = (cs * np.linalg.norm(ref[f, idx] - sw_kp[idx], axis=-1)).sum() / max(cs.sum(), 1e-6)
            if err_sw < cfg.swap_margin * err and err - err_sw > 0.01 * height:
                kp2d_np[f] = sw_kp
                conf_np[f] = sw_c
                world_np[f] = _swap_labels(world_np[f], group)
                swapped[f, g] = True
                any_swap = True
    if any_swap:
        kp2d, conf, world = targets()
        with torch.no_grad():  # swapped frames restart: root from the corrected torso (a swap of shoulders and hips
            # had turned the body around), limbs from their neighbours' pose (their own fit crossed them)
            for f in np.nonzero(swapped.any(1))[0]:
                nb = [g for g in (f - 1, f + 1) if 0 <= g < F and not swapped[g].any()] or [g for g in (f - 1, f + 1) if 0 <= g < F]
                bones[f] = bones[nb].mean(0)
                root[f], trans[f] = init_root(int(f))
        run_stage("pose after label swaps", cfg.iters_refit, [root, trans, bones], all_w, False, False)
    if cfg.fit_shape and cfg.iters_shape > 0:
        run_stage("shape + silhouette", cfg.iters_shape, [root, trans, bones, shape_param], all_w, True, True)
    elif cfg.iters_shape > 0:
        run_stage("silhouette", cfg.iters_shape, [root, trans, bones], all_w, False, True)

    with torch.no_grad():
        shape = shape_param.detach().clone()
        rv, rh = rest_state(shape)
        G = Kinematics(body, rh, active).transforms(full_rotations(), trans)
        uv = _project(keypoints_from(G, keypoint_basis(body, rv)), K)
        err = ((uv - kp2d).norm(dim=-1) * conf).sum(1) / conf.sum(1).clamp(min=1e-6)
        pose = BodyPose(full_rotations().detach().clone(), trans.detach().clone())
    return BodyFit(shape, pose, err.numpy(), swapped, timings, init_pose)

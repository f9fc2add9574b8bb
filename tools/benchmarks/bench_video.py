"""``fit_avatar --video`` on a synthetic subject with known poses: perception accuracy, CPU time per stage, and the
avatar's novel-view PSNR against the same fit from the ground-truth poses.

The subject (anny, clothed, textured; ``--motion free``: limbs swinging, or ``turn``: a 360 degree turn in an
A-pose) is rendered from the front camera of the 23-camera ring at 1280x720 for ``--seconds`` seconds at 25 fps and
encoded as an H.264 mp4 (a 10 s 720p clip by default). The video path runs on it exactly as ``fit_avatar --video`` does (decode + subsample to 100 frames + downscale to 540 px,
MediaPipe landmarks and masks, body fit), with the camera's true focal length (``--focal``, as a user who knows it).

Measured:
* CPU seconds per stage (decode, landmarks, body fit, writing) and per used frame;
* MPJPE: mean distance in mm between the fitted and the true positions of 14 joints (hips, knees, ankles,
  shoulders, elbows, wrists, neck, head: the bone heads of the body model) after subtracting each frame's hip centre,
  in the camera frame; also after the global stage only (the initialization, as the baseline of the ratio);
* mask IoU of the detected masks against the true ones;
* unless ``--quick``: two avatars fitted with the same config (pose refinement on) and the same frames, images and
  detected masks, one from the video poses and one from the true poses; their PSNR on three held-out ring cameras
  (novel views of the training frames) and on the held-out last 15 % of the frames (novel poses, seen by camera 0),
  and the difference. The video avatar lives in the camera frame of camera 0; it is rendered with the held-out
  cameras expressed in that frame (``V_c V_0^-1``); the "scaled" novel-view rows first scale it about camera 0's
  centre by the least-squares factor that maps its hip centres onto the true ones (one view cannot tell size from
  distance; camera 0's images are unchanged by that scale).
* additional rows (added beside the ones above, which are kept unchanged): a monocular reconstruction is defined only
  up to a similarity transform (size/distance, and a small error of the whole world's orientation), so, as
  trajectory and pose benchmarks with Sim(3) alignment do (Umeyama), one similarity per sequence is fitted by least
  squares to all training frames' 14 joints (absolute positions in camera 0's frame, fit -> truth) and the
  "novel_view_sim3" rows render the video avatar through it (Gaussians scaled by s about camera 0's centre, held-out
  cameras moved by the rigid part: ``V_c V_0^-1 [R t]``). One transform for the whole sequence, estimated from the
  body fit's joints only (never from the test images), so per-frame pose errors still count in full. Likewise
  "MPJPE, Sim(3) per sequence" (the same kind of alignment on all frames) and "PA-MPJPE" (per frame Procrustes with
  scale, the usual single-image metric) beside the plain hip-centred MPJPE.

    python tools/benchmarks/bench_video.py [--quick] [--json] [--steps 1500] [--seconds 10] [--motion free|turn]
        [--body FIELD=VALUE ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.benchmarks.common import emit, parser, row  # noqa: E402

JOINTS = ("upperleg01.L", "upperleg01.R", "lowerleg01.L", "lowerleg01.R", "foot.L", "foot.R", "upperarm01.L",
          "upperarm01.R", "lowerarm01.L", "lowerarm01.R", "wrist.L", "wrist.R", "neck01", "head")
EVAL_CAMERAS = (5, 11, 17)


def _joints(body, pose, shape):
    from avatar.perception.bodyfit import Kinematics

    with torch.no_grad():
        rest = body.rest(shape[None].float())
        kin = Kinematics(body, rest.bone_heads[0])
        G = kin.transforms(pose.rotations.float(), pose.translation.float())
        J = kin.joints(G)
    ids = [body.bone_index(n) for n in JOINTS]
    return J[:, ids]


def _mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> float:
    pred = pred - pred[:, :2].mean(1, keepdim=True)
    gt = gt - gt[:, :2].mean(1, keepdim=True)
    return float((pred - gt).norm(dim=-1).mean()) * 1000.0


def _sim3(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One similarity for the whole sequence (Umeyama): ``gt ~ s R pred + t`` over all frames' joints ``[F, J, 3]``."""
    import roma

    R, t, s = roma.rigid_points_registration(pred.reshape(-1, 3).double(), gt.reshape(-1, 3).double(),
                                             compute_scaling=True)
    return R.float(), t.float(), float(s)


def _mpjpe_sim3(pred: torch.Tensor, gt: torch.Tensor) -> float:
    R, t, s = _sim3(pred, gt)
    return float((s * pred @ R.T + t - gt).norm(dim=-1).mean()) * 1000.0


def _pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> float:
    import roma

    R, t, s = roma.rigid_points_registration(pred.double(), gt.double(), compute_scaling=True)
    aligned = s[:, None, None] * pred.double() @ R.transpose(-1, -2) + t[:, None]
    return float((aligned - gt.double()).norm(dim=-1).mean()) * 1000.0


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (25 fps)")
    p.add_argument("--steps", type=int, default=1500, help="fitting steps of each avatar")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--motion", choices=("free", "turn"), default="free",
                   help="free: limbs swinging (ZJU-like); turn: a 360 degree turn in an A-pose (PeopleSnapshot-like)")
    p.add_argument("--body", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a BodyFitConfig field (repeatable), e.g. --body w_pose_velocity=0 --body iters_shape=80")
    p.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    args = p.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 2.4)

    from avatar.body import AnnyBody
    from avatar.data import SyntheticConfig, make_subject, render_frame
    from avatar.export.video import write_video
    from avatar.perception.bodyfit import BodyFitConfig
    from avatar.perception.pipeline import VideoConfig, video_protocol, video_to_subject
    from avatar.types import BodyPose

    body = AnnyBody()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_video_")
        out = Path(tmp.name)
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    n = int(round(args.seconds * 25))
    W, H = 1280, 720
    cfg = SyntheticConfig(seed=args.seed, motion=args.motion, num_frames=n, width=W, height=H, rig="ring23", cameras=(0,),
                          shading=True)
    subject = make_subject(cfg, body)
    t0 = time.perf_counter()
    video = out / "clip.mp4"
    gt_masks = []

    def frames():
        for f in range(n):
            r = render_frame(subject, body, f)
            gt_masks.append(r.masks[0].numpy() > 0.5)
            yield (r.images[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    write_video(video, frames(), fps=25)
    t_render = time.perf_counter() - t0

    vcfg = VideoConfig(focal=float(subject.cameras.Ks[0, 0, 0]), max_frames=100, max_side=540)
    if args.quick:
        vcfg.body = BodyFitConfig(iters_global=80, iters_pose=150, iters_refit=50, iters_shape=30)
    for item in args.body:
        key, _, value = item.partition("=")
        if not hasattr(vcfg.body, key):
            raise SystemExit(f"--body: BodyFitConfig has no field {key!r}")
        old = getattr(vcfg.body, key)
        setattr(vcfg.body, key, value.lower() in ("1", "true", "yes") if isinstance(old, bool) else type(old)(value))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    made = video_to_subject(video, out, "video_subject", vcfg, body, overwrite=True, progress=not args.json)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    rep = made.report
    src = np.asarray(rep["source_frame_indices"])
    V0 = subject.cameras.viewmats[0]

    # --- joints: truth in the camera frame of camera 0
    gt_pose = subject.motion
    R0, t0v = V0[:3, :3], V0[:3, 3]
    gt_j = _joints(body, BodyPose(gt_pose.rotations[src], gt_pose.translation[src]), subject.shape)
    gt_j = gt_j @ R0.T + t0v
    fitted = np.load(made.folder / "poses.npz")
    rot = np.concatenate([fitted["global_orient"][:, None], fitted["body_pose"].reshape(len(src), -1, 3)], 1)
    fit_pose = BodyPose(torch.from_numpy(rot), torch.from_numpy(fitted["transl"]))
    fit_shape = torch.from_numpy(fitted["betas"][0])
    fit_j = _joints(body, fit_pose, fit_shape)
    init_j = _joints(body, made.fit.init_pose, body.default_shape())
    mpjpe, mpjpe_init = _mpjpe(fit_j, gt_j), _mpjpe(init_j, gt_j)
    iou = []
    for i, f in enumerate(src):
        det = np.load(made.folder / "masks" / f"mask_{i:04d}.npy") > 0
        gm = gt_masks[f]
        if det.shape != gm.shape:
            from PIL import Image

            gm = np.asarray(Image.fromarray(gm.astype(np.uint8) * 255).resize(det.shape[::-1], Image.BILINEAR)) > 127
        iou.append((det & gm).sum() / max((det | gm).sum(), 1))
    per_frame = 1000.0 * cpu / len(src)
    rows = [
        row(f"render the {args.seconds:g} s {W}x{H} synthetic clip (setup)", t_render, "s", None),
        row("video stage: decode + subsample + downscale", rep["seconds"]["decode"], "s", None),
        row("video stage: landmarks + masks (MediaPipe)", rep["seconds"]["landmarks"], "s", None),
        row("video stage: body fit", rep["seconds"]["body_fit"], "s", None),
        row("video stage: write subject", rep["seconds"]["write"], "s", None),
        row(f"perception total ({len(src)} frames), wall", wall, "s", None),
        row("perception CPU time per used frame", per_frame, "ms", None),
        row("MPJPE, hip-centred (baseline: initialization)", mpjpe, "mm", mpjpe_init),
        row("MPJPE, one Sim(3) per sequence (baseline: initialization)", _mpjpe_sim3(fit_j, gt_j), "mm",
            _mpjpe_sim3(init_j, gt_j)),
        row("PA-MPJPE, per-frame Procrustes (baseline: initialization)", _pa_mpjpe(fit_j, gt_j), "mm",
            _pa_mpjpe(init_j, gt_j)),
        row("reprojection error, mean", rep["reprojection_error_px"]["mean"], "px", None),
        row("detected mask IoU vs truth, mean", float(np.mean(iou)), "", None),
        row("detected mask IoU vs truth, min", float(np.min(iou)), "", None),
    ]
    if not args.quick:
        rows += _avatar_rows(args, body, subject, made.folder, src, fit_shape, video_protocol)
    emit(rows, args.json, f"fit_avatar --video on a synthetic {args.seconds:g} s {W}x{H} clip ({args.motion} motion)",
         "see rows")
    if tmp is not None:
        tmp.cleanup()


def _avatar_rows(args, body, subject, folder, src, fit_shape, video_protocol):
    """Fit two avatars (video poses, true poses) on the same frames; PSNR on held-out cameras and poses."""
    import dataclasses

    from avatar.data import AvatarDataset, SyntheticConfig, make_subject, render_frame
    from avatar.data.frames import Frame
    from avatar.eval.metrics import psnr
    from avatar.fit.job import fit_subject
    from avatar.render import render_gaussian_set
    from avatar.types import BodyPose, Cameras
    from configs.presets import preset

    proto = video_protocol(len(src))
    video_train = AvatarDataset(folder, proto, "train", body_model=body)
    video_test = AvatarDataset(folder, proto, "novel_pose", body_model=body)
    w, h = video_train[0].camera.width, video_train[0].camera.height
    V0 = subject.cameras.viewmats[0]
    # the eval rig at the video subject's size (the same fov_y, so the same cameras up to the size)
    cfg = subject.config
    eval_subject = make_subject(SyntheticConfig(seed=cfg.seed, motion=cfg.motion, num_frames=cfg.num_frames, width=w,
                                                height=h, rig="ring23", cameras=(0, *EVAL_CAMERAS),
                                                shading=cfg.shading), body)
    K0 = eval_subject.cameras.Ks[0]

    def truth_frame(vf: Frame, i: int) -> Frame:  # the same image and detected mask, the true pose and camera
        f = int(src[i])
        pose = BodyPose(subject.motion.rotations[f], subject.motion.translation[f])
        return Frame(vf.image, vf.mask, Cameras(V0, K0, w, h), pose, subject.shape, "anny", vf.frame_id, "0")

    truth_train = [truth_frame(video_train[i], i) for i in range(len(video_train))]
    fcfg = preset("fast", steps=args.steps, pose_refine=True, seed=args.seed)
    results = {}
    for name, train in (("video poses", video_train), ("true poses", truth_train)):
        t0 = time.perf_counter()
        res = fit_subject(train, body, fcfg, Path(tempfile.mkdtemp(prefix="bench_video_fit_")), progress=not args.json)
        results[name] = (res, time.perf_counter() - t0)

    n_train = len(video_train)
    # one view cannot tell a body's size from its distance: the scale about camera 0's centre that best maps the
    # fitted hip centres (camera 0's frame) onto the true ones; "scale-aligned" rows render the video avatar so scaled
    # (camera 0's images do not change under it), as PA-MPJPE aligns scale
    with torch.no_grad():
        fit_hips = _joints(body, BodyPose(torch.stack([video_train[i].pose.rotations for i in range(n_train)]),
                                          torch.stack([video_train[i].pose.translation for i in range(n_train)])),
                           fit_shape)[:, :2].mean(1)
        gt_hips = _joints(body, BodyPose(subject.motion.rotations[src[:n_train]], subject.motion.translation[src[:n_train]]),
                          subject.shape)[:, :2].mean(1) @ V0[:3, :3].T + V0[:3, 3]
        align = float((fit_hips * gt_hips).sum() / (fit_hips * fit_hips).sum())
        # one Sim(3) per sequence from all training frames' joints (camera 0's frame): gt ~ s R fit + t
        sim_R, sim_t, sim_s = _sim3(
            _joints(body, BodyPose(torch.stack([video_train[i].pose.rotations for i in range(n_train)]),
                                   torch.stack([video_train[i].pose.translation for i in range(n_train)])), fit_shape),
            _joints(body, BodyPose(subject.motion.rotations[src[:n_train]], subject.motion.translation[src[:n_train]]),
                    subject.shape) @ V0[:3, :3].T + V0[:3, 3])
        sim_A = torch.eye(4)
        sim_A[:3, :3], sim_A[:3, 3] = sim_R, sim_t
    nv_idx = [round(k * (n_train - 1) / 5) for k in range(6)]
    np_idx = list(range(n_train, len(src), max(1, (len(src) - n_train) // 4)))
    scores = {name: {"novel_view": [], "novel_pose": [], "novel_view_scaled": [], "novel_view_sim3": []}
              for name in results}
    with torch.no_grad():
        for i in nv_idx + np_idx:
            f = int(src[i])
            gt = render_frame(eval_subject, body, f)
            views = range(1, 1 + len(EVAL_CAMERAS)) if i in nv_idx else (0,)
            split = "novel_view" if i in nv_idx else "novel_pose"
            for name, (res, _) in results.items():
                if name == "video poses":
                    frame = video_train[i] if i < n_train else video_test[i - n_train]
                    pose, shape, to_world = frame.pose, fit_shape, torch.linalg.inv(V0)
                else:
                    pose = BodyPose(subject.motion.rotations[f], subject.motion.translation[f])
                    shape, to_world = subject.shape, torch.eye(4)
                if res.refiner is not None and i < n_train:
                    fid = video_train[i].frame_id if name == "video poses" else truth_train[i].frame_id
                    pose = res.refiner(pose, fid)
                T, _ = body.bone_transforms(pose, shape)
                posed = res.avatar.posed(T[0].float())

                def score(c: int, k: float = 1.0, A: torch.Tensor | None = None) -> float:  # avatar scaled by k, then A
                    g = posed if k == 1.0 else dataclasses.replace(posed, means=posed.means * k, scales=posed.scales * k)
                    vm = eval_subject.cameras.viewmats[c] @ to_world @ (torch.eye(4) if A is None else A)
                    img = render_gaussian_set(g, Cameras(vm, eval_subject.cameras.Ks[c], w, h),
                                              background=torch.zeros(3)).colors[0].clamp(0, 1)
                    return float(psnr(img, gt.images[c]))

                for c in views:
                    plain = score(c)
                    scores[name][split].append(plain)
                    if split == "novel_view":  # the true-pose fit needs no alignment: its aligned rows are the plain one
                        video = name == "video poses"
                        scores[name]["novel_view_scaled"].append(score(c, align) if video else plain)
                        # x -> s R x + t in camera 0's frame: scale, then a rigid camera
                        scores[name]["novel_view_sim3"].append(score(c, sim_s, sim_A) if video else plain)
    rows = [row("scale of the video fit's world (hip-centre least squares; 1 = right size and distance)", align, "",
                None),
            row("Sim(3) per sequence of the video fit: scale", sim_s, "", None),
            row("Sim(3) per sequence of the video fit: rotation (degrees)",
                float(torch.rad2deg(torch.arccos(((torch.trace(sim_R) - 1) / 2).clamp(-1, 1)))), "deg", None),
            row("Sim(3) per sequence of the video fit: translation (m)", float(sim_t.norm()), "m", None)]
    for split in ("novel_view", "novel_view_scaled", "novel_view_sim3", "novel_pose"):
        v = float(np.mean(scores["video poses"][split]))
        t = float(np.mean(scores["true poses"][split]))
        rows.append(row(f"PSNR {split}, true-pose fit", t, "dB", None))
        rows.append(row(f"PSNR {split}, video fit (delta {v - t:+.2f} dB)", v, "dB", None))
    for name, (res, sec) in results.items():
        rows.append(row(f"fitting job ({name}, {args.steps} steps, {n_train} frames)", sec, "s", None))
    return rows


if __name__ == "__main__":
    main()

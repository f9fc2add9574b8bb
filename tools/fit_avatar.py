"""``fit_avatar``: fit a Gaussian avatar to a subject, evaluate it on held-out views and poses, export it.

    fit_avatar --demo                                   # make the bundled synthetic subject and fit it
    fit_avatar --data DIR --format zju --protocol zju_monocular --smpl-dir MODELS [--preset fast] [--resume]
    fit_avatar --images a.png b.png [--masks a_mask.png b_mask.png] --cameras cams.json --out DIR
    fit_avatar --video in.mp4 [--fov 55 | --focal PX] [--video-start S --video-end S] --out DIR


Writes to ``--out``: ``fit/checkpoints/``, ``eval/`` (metrics.json, report.md, grid.png), ``avatar/`` (the bundle:
safetensors + JSON), ``canonical.ply`` and ``posed.ply`` (3DGS layout), ``motion.mp4`` and ``summary.json`` (the
resolved config, times and metrics).

``--video`` (one person filmed by a fixed camera; needs the ``video`` extra, MediaPipe): decodes and subsamples the
video, detects the person's mask and landmarks per frame, fits the body (one shape, a pose per frame), writes the
frames with a person as a subject folder under ``--out``/subject/<video name> (InstantAvatar layout +
``perception.json``) and runs the fitting job on it with pose refinement on (first 85 % of the frames train, the rest
are held-out poses). ``summary.json`` then also holds the perception report and the mask IoU between the avatar's
renders and the detected masks.

``--images`` (sparse views of one person, CanonicalFusion style): predicts front/back depth and skinning codes per
view (``avatar.predict``), canonicalizes and fuses them (``avatar.fusion``) and writes ``canonical_mesh.ply``,
``skin_weights.safetensors`` + ``skin_weights.json`` and ``summary.json``. The cameras file format is documented in
``avatar/fusion/design.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
import tyro


@dataclasses.dataclass
class FitAvatarArgs:
    demo: bool = False
    """Make the bundled synthetic subject (ZJU-MoCap layout, anny body) under ``--out``/subject and fit it."""
    data: Path | None = None
    """Subject folder (ZJU-MoCap ``CoreView_3XX`` / ``my_3XX``, PeopleSnapshot raw or InstantAvatar layout)."""
    format: Literal["zju", "people", "synthetic"] | None = None
    """What ``--data`` is; checked against the detected layout ("synthetic": our generated subjects, any layout)."""
    protocol: str | None = None
    """Evaluation protocol (``avatar.data.protocols``): default zju_monocular for ZJU, peoplesnapshot/<subject>."""
    smpl_dir: Path | None = None
    """Folder with the SMPL model files, needed by datasets that store SMPL parameters."""
    out: Path = Path("out/fit")
    """Output folder."""
    preset: Literal["fast", "quality"] = "fast"
    """Fitting preset (``configs/presets.py``)."""
    steps: int | None = None
    """Override the preset's number of steps."""
    resume: bool = False
    """Continue from the latest checkpoint in ``--out``/fit/checkpoints."""
    demo_frames: int = 100
    """Training frames of the demo subject (it also gets a fifth as many held-out poses)."""
    demo_size: int = 512
    """Image size of the demo subject."""
    seed: int = 0
    """Seed of the demo subject and of the fit."""
    progress: bool = True
    """Show progress bars."""
    geometry_frames: int = 12
    """Posed frames whose Gaussian centres are compared with the ground-truth mesh (synthetic subjects; the exact
    point-to-mesh distance costs seconds per frame)."""
    device: str | None = None
    """Torch device to fit and render on (e.g. "cuda" with the quality preset: gsplat); default: the CPU."""
    images: tuple[Path, ...] = ()
    """Sparse-view mode: images of one person at one instant (PNG/JPEG; RGBA PNGs carry the mask in alpha)."""
    masks: tuple[Path, ...] = ()
    """Person masks, one per image (white = person); default: the images' alpha channel."""
    cameras: Path | None = None
    """Sparse-view mode: the cameras file (K, viewmat, size per view; body pose and shape), see avatar/fusion/design.md."""
    predictor: Path | None = None
    """Depth + skinning-code network weights (default: the shipped data/predictor/depthskin_anny.safetensors)."""
    codec: Path | None = None
    """Skinning-code autoencoder (default: the shipped data/predictor/skin_codec_<body>.safetensors)."""
    voxel_size: float = 0.01
    """Sparse-view mode: fusion grid spacing in metres."""
    refine: bool = True
    """Sparse-view mode: wrap the body template onto the fused mesh, refine it against the images by forward skinning
    (vertex offsets, colours, the joint angles) and export the rigged, animated ``avatar.glb``; --no-refine stops
    after the fusion."""
    refine_steps: int = 200
    """Sparse-view mode: optimizer steps of the refinement (40 % pose and colour at half size, then shape, pose and
    colour at full size)."""
    glb_motion: Literal["free", "turn"] = "free"
    """Sparse-view mode: the animation clip stored in ``avatar.glb`` (2 s at 30 fps of this synthetic motion)."""
    video: Path | None = None
    """Video mode: a video of one person filmed by a fixed camera (mp4, mov, mkv, ... anything ffmpeg reads)."""
    video_max_frames: int = 100
    """Video mode: frame budget (evenly spaced frames of the time range)."""
    video_max_side: int = 540
    """Video mode: frames are downscaled so their longer side is at most this many pixels."""
    video_start: float = 0.0
    """Video mode: start of the time range used, seconds."""
    video_end: float | None = None
    """Video mode: end of the time range used, seconds (default: the end)."""
    focal: float | None = None
    """Video mode: focal length of the video in pixels (at its original size), if known."""
    fov: float | None = None
    """Video mode: horizontal field of view in degrees, if known (default 55)."""


DEMO_TRAIN_CAMERA = 4  # the rig camera of the ZJU monocular protocol
DEMO_TEST_CAMERAS = (0, 8, 12, 16, 20)


def make_demo_subject(args: FitAvatarArgs, body) -> Path:
    """The bundled default subject: a clothed, textured anny in free motion seen by the protocol's training camera
    and five held-out cameras of the 23-camera ring; frames after ``demo_frames`` are held-out poses."""
    from avatar.data import SyntheticConfig, make_subject, write_zju

    folder = args.out / "subject" / "CoreView_900"
    if (folder / "annots.npy").exists():
        return folder
    n_test = max(1, args.demo_frames // 5)
    cfg = SyntheticConfig(seed=args.seed, motion="free", num_frames=args.demo_frames + n_test, width=args.demo_size,
                          height=args.demo_size, rig="ring23", cameras=(DEMO_TRAIN_CAMERA, *DEMO_TEST_CAMERAS),
                          shading=False)
    print(f"[fit_avatar] making the demo subject ({cfg.num_frames} frames x {len(cfg.cameras)} cameras at "
          f"{cfg.width}x{cfg.height}) in {folder}", flush=True)
    return write_zju(make_subject(cfg, body), body, folder.parent, name=folder.name, overwrite=True,
                     progress=args.progress)


def _splits(args: FitAvatarArgs, root: Path, body, smpl_dir, proto=None):
    """(train, {"novel_view": ..., "novel_pose": ...}, protocol background) for the demo, a dataset or a video
    subject (``proto`` given)."""
    from avatar.data import AvatarDataset, get_protocol

    if args.demo:
        n_train = args.demo_frames
        everything = AvatarDataset(root, None, body_model=body, resolution=None)
        num_frames = everything.subject.num_frames
        train = AvatarDataset(root, None, body_model=body, resolution=None, frames=range(n_train), cameras=[0])
        test_cams = list(range(1, 1 + len(DEMO_TEST_CAMERAS)))
        nv_frames = list(range(0, n_train, max(1, n_train // 6)))
        novel_view = AvatarDataset(root, None, body_model=body, resolution=None, frames=nv_frames, cameras=test_cams)
        np_frames = list(range(n_train, num_frames, max(1, (num_frames - n_train) // 4)))
        novel_pose = AvatarDataset(root, None, body_model=body, resolution=None, frames=np_frames,
                                   cameras=[0, *test_cams[:2]])
        return train, {"novel_view": novel_view, "novel_pose": novel_pose}, "black"
    protocol = args.protocol if proto is None else proto
    if protocol is None:
        from avatar.data import detect_layout

        if detect_layout(root) == "zju":
            protocol = "zju_monocular"
        else:
            protocol = f"peoplesnapshot/{root.name}"
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    kw = dict(body_model=body, smpl_model_path=smpl_dir)
    train = AvatarDataset(root, proto, "train", **kw)
    tests = {s: AvatarDataset(root, proto, s, **kw) for s in ("novel_view", "novel_pose") if s in proto.split_names}
    return train, tests, proto.background


def _cpu(gaussians):
    """A ``GaussianSet`` with every tensor on the CPU (for writing files)."""
    return dataclasses.replace(gaussians, **{f.name: getattr(gaussians, f.name).cpu() for f in
                                             dataclasses.fields(gaussians) if getattr(gaussians, f.name) is not None})


def run(args: FitAvatarArgs) -> dict:
    from avatar.body import AnnyBody, load_body_model
    from avatar.data import detect_layout, read_body_model_info
    from avatar.eval import evaluate
    from avatar.export.bundle import save_bundle
    from avatar.export.ply import write_splat_ply
    from avatar.export.video import write_video
    from avatar.fit.job import fit_subject, frame_to
    from avatar.io import atomic_write_text
    from avatar.render import render_gaussian_set
    from configs.presets import preset

    t0 = time.perf_counter()
    video_report = None
    proto = None
    if args.video is not None:
        if args.demo or args.data is not None or args.images:
            raise ValueError("fit_avatar: give either --video in.mp4 or --demo / --data / --images, not several")
        root, proto, video_report = prepare_video(args)
        args = dataclasses.replace(args, data=root)
    if args.images or args.masks or args.cameras is not None:
        if args.demo or args.data is not None:
            raise ValueError("fit_avatar: give either --demo or --data DIR or --images ... --cameras cams.json, not several")
        return run_images(args)
    if args.demo == (args.data is not None):
        raise ValueError("fit_avatar: give either --demo or --data DIR (or --images ... --cameras cams.json)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        body = AnnyBody()
        root = make_demo_subject(args, body)
    else:
        root = Path(args.data)
        layout = detect_layout(root)  # clear error for a missing folder or unknown layout
        info = read_body_model_info(root)
        if args.format is not None:
            expected = {"zju": "zju", "people": "peoplesnapshot"}.get(args.format)
            if expected is not None and layout != expected:
                raise ValueError(f"{root}: --format {args.format} but the folder has the {layout} layout")
            if args.format == "synthetic" and info.name == "smpl":
                raise ValueError(f"{root}: --format synthetic but the folder has no body_model.json (SMPL data)")
        body = AnnyBody() if info.name == "anny" else load_body_model(info.name, model_path=args.smpl_dir)
    train, tests, background = _splits(args, root, body, args.smpl_dir, proto)
    overrides = {"seed": args.seed}
    if video_report is not None:
        overrides["pose_refine"] = True  # the poses come from a monocular body fit
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = preset(args.preset, **overrides)
    t_data = time.perf_counter() - t0
    result = fit_subject(train, body, cfg, args.out / "fit", resume=args.resume, progress=args.progress,
                         device=args.device)
    avatar, refiner = result.avatar, result.refiner
    shape = train[0].shape
    refiner_frames = set() if refiner is None else {int(f) for f in refiner.frame_ids.tolist()}

    dev = avatar.means.device
    shape = shape.to(dev)

    def transforms_of(frame, refined: bool):
        pose = frame_to(frame, dev).pose
        if refined and refiner is not None and int(frame.frame_id) in refiner_frames:
            pose = refiner(pose, frame.frame_id)  # training frames seen from new cameras: the corrected pose
        t, _ = body.bone_transforms(pose, shape)
        return t[0].float()

    bg = torch.tensor([0.0, 0.0, 0.0] if background == "black" else [1.0, 1.0, 1.0], device=dev)

    def render_fn(frame):
        posed = avatar.posed(transforms_of(frame, refined=True))
        r = render_gaussian_set(posed, frame_to(frame, dev).camera, background=None, backend=cfg.backend)
        return r.colors[0].cpu(), r.alphas[0].cpu()

    geometry_fn = None
    gt_dir = root / "vertices"
    if (root / "canonical_mesh.ply").exists() and gt_dir.is_dir():
        import numpy as np
        import trimesh

        faces = torch.from_numpy(np.asarray(trimesh.load(root / "canonical_mesh.ply", process=False).faces)).long()

        geometry_frames: dict[int, int] = {}  # frame id -> times measured: the exact point-to-mesh distance
        # costs seconds per frame, so each posed frame is measured once (cameras do not change the geometry)

        def gt_geometry(frame):
            if geometry_frames.get(int(frame.frame_id), 0) >= 1 or len(geometry_frames) >= args.geometry_frames:
                return None
            geometry_frames[int(frame.frame_id)] = 1
            path = gt_dir / f"{frame.frame_id}.npy"
            if not path.exists():
                path = gt_dir / f"{frame.frame_id:04d}.npy"
            if not path.exists():
                return None
            centres = avatar.posed(transforms_of(frame, refined=True)).means.cpu()
            return centres, torch.from_numpy(np.load(path)).float(), faces

        geometry_fn = gt_geometry

    t1 = time.perf_counter()
    with torch.no_grad():
        report = evaluate(render_fn, tests, background=tuple(bg.cpu().tolist()), out_dir=args.out / "eval",
                          geometry_fn=geometry_fn, seed=args.seed)
    t_eval = time.perf_counter() - t1
    with torch.no_grad():
        canonical = _cpu(avatar.canonical())
        save_bundle(args.out / "avatar", canonical, body.name, body.bone_names, body.bone_parents, shape.float().cpu(),
                    {"fit": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), "data": str(root)},
                    {f"state.{k}": v.detach().cpu() for k, v in avatar.state_dict().items()},
                    shape_names=body.shape_names, overwrite=True)
        write_splat_ply(args.out / "canonical.ply", canonical)
        first_pose = next(iter(tests["novel_pose"])) if "novel_pose" in tests else train[0]
        write_splat_ply(args.out / "posed.ply", _cpu(avatar.posed(transforms_of(first_pose, refined=False))))
        motion_frames = list(tests["novel_pose"]) if "novel_pose" in tests else [train[i] for i in range(len(train))]
        cam = frame_to(train[0], dev).camera
        video = write_video(args.out / "motion.mp4", (
            (render_gaussian_set(avatar.posed(transforms_of(f, refined=False)), cam, background=bg,
                                 backend=cfg.backend).colors[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
            for f in motion_frames), fps=10)
    if video_report is not None:
        video_report["mask_iou"] = _mask_iou(train, lambda f: render_fn(f)[1])
    splits = {name: {"frames": s.num_frames, "psnr": round(s.psnr, 3), "ssim": round(s.ssim, 4),
                     "lpips": s.lpips, "geometry": s.geometry} for name, s in report.splits.items()}
    steps = result.history
    stage_keys = sorted({k for h in steps for k in h if k.startswith("t_")})
    per_stage_ms = {k[2:]: round(1000 * sum(h.get(k, 0.0) for h in steps) / max(len(steps), 1), 2) for k in stage_keys}
    summary = {
        "data": str(root), "preset": args.preset, "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "train_frames": len(train), "gaussians": avatar.num_gaussians, "fit_seconds": round(result.seconds, 1),
        "data_seconds": round(t_data, 1), "eval_seconds": round(t_eval, 1), "ms_per_step_by_stage": per_stage_ms,
        "final_train_psnr": round(float(steps[-1]["psnr"]), 3) if steps and "psnr" in steps[-1] else None,
        "metrics": splits, "lpips": report.lpips_reason, "video_frames": video.num_frames,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    if video_report is not None:
        summary["video"] = video_report
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2, default=str))
    print(f"[fit_avatar] {avatar.num_gaussians} Gaussians fitted in {result.seconds:.0f} s; "
          + "; ".join(f"{k}: PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}" for k, v in splits.items())
          + f"; outputs in {args.out}", flush=True)
    return summary


def prepare_video(args: FitAvatarArgs):
    """Video mode, perception half: the subject folder (made now, or reused with ``--resume``), its protocol and the
    perception report."""
    from avatar.body import AnnyBody
    from avatar.perception.pipeline import VideoConfig, video_protocol, video_to_subject

    video = Path(args.video)
    cfg = VideoConfig(max_frames=args.video_max_frames, max_side=args.video_max_side, start=args.video_start,
                      end=args.video_end, focal=args.focal, fov=args.fov)
    cfg.validate()
    parent = args.out / "subject"
    name = video.stem or "video"
    folder = parent / name
    if args.resume and (folder / "perception.json").exists():
        print(f"[fit_avatar] reusing the video subject {folder}", flush=True)
        report = json.loads((folder / "perception.json").read_text())
    else:
        if not video.exists():
            raise FileNotFoundError(f"{video}: no such video file")
        print(f"[fit_avatar] perception on {video} -> {folder}", flush=True)
        made = video_to_subject(video, parent, name, cfg, AnnyBody(), overwrite=True, progress=args.progress)
        report = made.report
    s = report["seconds"]
    print(f"[fit_avatar] video subject: {report['frames_kept']} frames with a person, {report['frames_skipped']} "
          f"skipped; reprojection error {report['reprojection_error_px']['mean']:.1f} px; stages "
          + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()), flush=True)
    return folder, video_protocol(int(report["frames_kept"])), report


def _mask_iou(frames, render_alpha, max_frames: int = 12) -> dict:
    """IoU between the avatar's rendered alpha (> 0.5) and the frames' masks (> 0.5) on up to ``max_frames``
    evenly spaced frames: mean and minimum."""
    n = len(frames)
    picks = sorted({round(i * (n - 1) / max(min(max_frames, n) - 1, 1)) for i in range(min(max_frames, n))})
    ious = []
    with torch.no_grad():
        for i in picks:
            f = frames[i]
            a = render_alpha(f) > 0.5
            m = f.mask.to(a.device) > 0.5
            ious.append(float((a & m).sum()) / max(float((a | m).sum()), 1.0))
    return {"mean": round(sum(ious) / len(ious), 4), "min": round(min(ious), 4), "frames": len(ious)}


def run_images(args: FitAvatarArgs) -> dict:
    """Sparse-view mode: images + cameras -> predicted depth layers and skinning codes -> fused canonical mesh (then,
    with ``--refine``, the refined mesh, corrected pose and rigged .glb)."""
    from avatar.body import load_body_model
    from avatar.fusion import FusionConfig, body_template, fuse_views
    from avatar.fusion.inputs import load_sparse_views, read_cameras_json
    from avatar.predict.infer import load_predictor, predict_views
    from avatar.predict.skin_codes import load_skin_codec
    from avatar.predict.views import render_depth_layers
    from avatar.types import BodyPose

    t0 = time.perf_counter()
    if not args.images:
        raise ValueError("fit_avatar: --masks / --cameras need --images a.png b.png ...")
    if args.cameras is None:
        raise ValueError("fit_avatar: --images needs --cameras cams.json (see avatar/fusion/design.md)")
    if args.refine and args.refine_steps < 1:
        raise ValueError(f"fit_avatar: --refine-steps must be >= 1, got {args.refine_steps}")
    body_name = read_cameras_json(args.cameras)["body_model"]
    body = load_body_model(body_name, model_path=None if args.smpl_dir is None else str(args.smpl_dir))
    views = load_sparse_views(args.images, args.masks, args.cameras, body.num_bones, body.shape_dim)
    codec = load_skin_codec(args.codec, body.name)
    model = load_predictor(args.predictor)
    cfg = FusionConfig(voxel_size=args.voxel_size)
    cfg.validate()
    cams = views.cameras
    with torch.no_grad():
        shape = views.shape.to(body.dtype)
        posed = body(BodyPose(views.poses.rotations.to(body.dtype), views.poses.translation.to(body.dtype)),
                     shape.expand(len(args.images), -1))
        codes = codec.encode(body.dense_skin_weights().float())
        priors = [render_depth_layers(posed.vertices[v].float(), body.faces, cams.viewmats[v], cams.Ks[v], cams.width,
                                      cams.height, vertex_attrs=codes) for v in range(len(args.images))]
        t1 = time.perf_counter()
        preds = predict_views(model, views.images, views.masks, priors)
        t2 = time.perf_counter()
        fused = fuse_views(preds, cams, posed.bone_transforms.float(), codec, cfg, body_template(body, shape.float()))
        t3 = time.perf_counter()
    # every output is written into a staging folder inside --out and moved into place only when all of them exist:
    # a failure or interrupt in the refinement or export leaves --out as it was (no half set of files)
    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".fit_avatar-", dir=args.out))
    try:
        summary = _write_images_outputs(args, body, views, shape, fused, cfg, stage, (t0, t1, t2, t3))
        for name in summary["outputs"] + ["summary.json"]:
            os.replace(stage / name, args.out / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(args.out.iterdir()):
            args.out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    print(f"[fit_avatar] fused {len(args.images)} view(s) into a canonical mesh of {summary['vertices']} vertices "
          f"({fused.num_points} points) in {summary['seconds']['total']:.1f} s; outputs in {args.out}", flush=True)
    return summary


def _write_images_outputs(args: FitAvatarArgs, body, views, shape, fused, cfg, out: Path, times) -> dict:
    """Write the sparse-view mode's outputs (fused mesh and weights, then the refinement's) into the folder ``out``;
    returns the summary (also written there as ``summary.json``)."""
    import trimesh
    from safetensors.torch import save

    from avatar.io import atomic_write_bytes, atomic_write_text

    t0, t1, t2, t3 = times
    cams = views.cameras
    mesh = trimesh.Trimesh(fused.vertices.double().numpy(), fused.faces.numpy(), process=False)
    atomic_write_bytes(out / "canonical_mesh.ply", mesh.export(file_type="ply"))
    tensors = {"skin_weights": fused.skin_weights.float().contiguous(), "vertices": fused.vertices.float().contiguous(),
               "faces": fused.faces.contiguous()}
    atomic_write_bytes(out / "skin_weights.safetensors", save(tensors, metadata={"body_model": body.name}))
    meta = {"body_model": body.name, "bone_names": list(body.bone_names), "bone_parents": list(body.bone_parents),
            "shape": [float(x) for x in views.shape.tolist()], "num_vertices": int(fused.vertices.shape[0]),
            "num_faces": int(fused.faces.shape[0]), "space": "canonical (the body model's rest pose)",
            "mesh": "canonical_mesh.ply", "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    atomic_write_text(out / "skin_weights.json", json.dumps(meta, indent=2))
    outputs = ["canonical_mesh.ply", "skin_weights.safetensors", "skin_weights.json"]
    refined = None
    if args.refine:
        refined = _refine_and_export(args, body, views, shape.float(), fused, out)
        outputs += refined.pop("outputs")
    summary = {
        "mode": "images", "images": [str(p) for p in views.image_paths], "cameras": str(args.cameras),
        "views": len(args.images), "size": [cams.width, cams.height], "fusion": dataclasses.asdict(cfg),
        "predictor": str(args.predictor) if args.predictor else "shipped", "codec": str(args.codec) if args.codec else "shipped",
        "fused_points": fused.num_points, "vertices": int(fused.vertices.shape[0]), "faces": int(fused.faces.shape[0]),
        "data_support_mean": round(float(fused.data_support.mean()), 4), "watertight": bool(mesh.is_watertight),
        "seconds": {"load": round(t1 - t0, 2), "predict": round(t2 - t1, 2), "fuse": round(t3 - t2, 2),
                    **({"refine_and_export": refined.pop("seconds")} if refined else {}),
                    "total": round(time.perf_counter() - t0, 2)},
        "refined": refined,
        "outputs": outputs,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _refine_and_export(args: FitAvatarArgs, body, views, shape, fused, out_dir: Path) -> dict:
    """The back half of the sparse-view mode: the body template wrapped onto the fused mesh (template topology and
    exact skinning weights; drops the fused mesh's wrongly canonicalized sheets), refined against the input images and
    masks by forward skinning with the joint angles free (``avatar.fit.refine_mesh``), then written as the canonical
    and posed meshes (PLY, vertex colours), the corrected pose (JSON) and a rigged, animated ``avatar.glb``."""
    from avatar.data.synthetic import make_motion
    from avatar.export import GlbAnimation, write_glb, write_mesh, write_posed_mesh
    from avatar.fit.mesh_refine import MeshRefineConfig, RefineView, refine_mesh, wrap_template
    from avatar.fusion import body_template
    from avatar.io import atomic_write_text
    from avatar.render.mesh import vertex_normals
    from avatar.types import BodyPose, Cameras

    t0 = time.perf_counter()
    template = body_template(body, shape)
    with torch.no_grad():
        offsets = wrap_template(template.vertices.float(), template.faces, fused.vertices.float(), fused.faces)
        start = template.vertices.float() + offsets[:, None] * vertex_normals(template.vertices.float(), template.faces)
    cams = views.cameras
    rot, trans = views.poses.rotations.float(), views.poses.translation.float()
    frame_of: dict[bytes, int] = {}  # views with the same pose are one instant: one joint-angle correction
    refine_views = []
    for v in range(rot.shape[0]):
        key = torch.cat([rot[v].reshape(-1), trans[v].reshape(-1)]).numpy().tobytes()
        fid = frame_of.setdefault(key, len(frame_of))
        m = views.masks[v].float()
        refine_views.append(RefineView(views.images[v].float() * m[..., None], m,
                                       Cameras(cams.viewmats[v], cams.Ks[v], cams.width, cams.height),
                                       BodyPose(rot[v], trans[v]), fid))
    pose_stage, shape_stage = MeshRefineConfig().stages  # the library's default schedule, stretched to refine_steps
    n_pose = max(1, round(0.4 * args.refine_steps))
    cfg = MeshRefineConfig(stages=(dataclasses.replace(pose_stage, steps=n_pose),
                                   dataclasses.replace(shape_stage, steps=max(1, args.refine_steps - n_pose))),
                           views_per_step=min(8, len(refine_views)), progress=args.progress)
    out = refine_mesh((start, template.faces), template.skin_weights.float(), refine_views, body, cfg, shape=shape)
    t1 = time.perf_counter()

    files = []
    files.append(write_mesh(out_dir / "refined_mesh.ply", out.vertices, out.faces, out.colors).name)
    poses_json = []
    for fid in out.frame_ids:
        pose = out.pose_of(fid)
        with torch.no_grad():
            T, _ = body.bone_transforms(BodyPose(pose.rotations[None].to(body.dtype), pose.translation[None].to(body.dtype)),
                                        shape[None].to(body.dtype))
        name = "refined_mesh_posed.ply" if len(out.frame_ids) == 1 else f"refined_mesh_posed_{fid}.ply"
        files.append(write_posed_mesh(out_dir / name, out.vertices.float(), out.faces, out.skin_weights.float(),
                                      T[0].float(), out.colors).name)
        poses_json.append({"frame": int(fid), "views": [k for k, rv in enumerate(refine_views) if rv.frame_id == fid],
                           "rotations": pose.rotations.tolist(), "translation": pose.translation.tolist()})
    atomic_write_text(out_dir / "refined_pose.json", json.dumps(
        {"body_model": body.name, "bone_names": list(body.bone_names), "poses": poses_json,
         "note": "corrected per-instant pose (axis-angle per bone, radians; translation in metres)"}, indent=1))
    files.append("refined_pose.json")
    with torch.no_grad():
        rest = body.rest(shape[None].to(body.dtype))
        motion = make_motion(body, rest.bone_heads[0], args.glb_motion, 60, args.seed)
        clip, _ = body.bone_transforms(motion, shape[None].expand(60, -1).to(body.dtype))
    skin = write_glb(out_dir / "avatar.glb", out.vertices, out.faces, out.skin_weights, body.bone_names,
                     body.bone_parents, rest.bone_poses[0], colors=out.colors,
                     animation=GlbAnimation(clip.float(), fps=30.0, name=args.glb_motion))
    files.append("avatar.glb")
    last = out.history[-1] if out.history else {}
    first_view = {}
    for rv in refine_views:
        first_view.setdefault(rv.frame_id, rv)
    info = {"vertices": int(out.vertices.shape[0]), "faces": int(out.faces.shape[0]),
            "wrap_offset_mm_mean": round(float(offsets.abs().mean()) * 1000, 2),
            "pose_change_deg_max": round(math.degrees(max(
                float((out.pose_of(fid).rotations - first_view[fid].pose.rotations).norm(dim=-1).max())
                for fid in out.frame_ids)), 2),  # largest change of a bone's axis-angle vector
            "final_loss": {k: round(float(v), 6) for k, v in last.items() if isinstance(v, float) and k != "seconds"},
            "glb_influences_dropped_max": round(float(skin.dropped.max()), 4),
            "seconds": {"refine": round(t1 - t0, 2), "export": round(time.perf_counter() - t1, 2)},
            "outputs": files}
    print(f"[fit_avatar] refined the wrapped template ({info['vertices']} vertices) against {len(refine_views)} view(s) "
          f"in {t1 - t0:.1f} s; wrote {', '.join(files)}", flush=True)
    return info


def main() -> None:
    args = tyro.cli(FitAvatarArgs)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"fit_avatar: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

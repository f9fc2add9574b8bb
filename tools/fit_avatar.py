"""``fit_avatar``: fit a Gaussian avatar to a subject, evaluate it on held-out views and poses, export it.

    fit_avatar --demo                                   # make the bundled synthetic subject and fit it
    fit_avatar --data DIR --format zju --protocol zju_monocular --smpl-dir MODELS [--preset fast] [--resume]

Writes to ``--out``: ``fit/checkpoints/``, ``eval/`` (metrics.json, report.md, grid.png), ``avatar/`` (the bundle:
safetensors + JSON), ``canonical.ply`` and ``posed.ply`` (3DGS layout), ``motion.mp4`` and ``summary.json`` (the
resolved config, times and metrics).
"""

from __future__ import annotations

import dataclasses
import json
import sys
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


def _splits(args: FitAvatarArgs, root: Path, body, smpl_dir):
    """(train, {"novel_view": ..., "novel_pose": ...}, protocol background) for the demo or a dataset."""
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
    protocol = args.protocol
    if protocol is None:
        from avatar.data import detect_layout

        if detect_layout(root) == "zju":
            protocol = "zju_monocular"
        else:
            protocol = f"peoplesnapshot/{root.name}"
    proto = get_protocol(protocol)
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
    if args.demo == (args.data is not None):
        raise ValueError("fit_avatar: give either --demo or --data DIR")
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
    train, tests, background = _splits(args, root, body, args.smpl_dir)
    overrides = {"seed": args.seed}
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
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2, default=str))
    print(f"[fit_avatar] {avatar.num_gaussians} Gaussians fitted in {result.seconds:.0f} s; "
          + "; ".join(f"{k}: PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}" for k, v in splits.items())
          + f"; outputs in {args.out}", flush=True)
    return summary


def main() -> None:
    args = tyro.cli(FitAvatarArgs)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fit_avatar: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

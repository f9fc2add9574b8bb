"""bench_fit: held-out PSNR / SSIM against fitting time on the bundled synthetic subject, and step times by stage.

The same training steps with the torch reference rasterizer are the baseline (same process).

Writes ``psnr_vs_time.png`` and ``curve.json`` to ``--out``. ``--quick``: a small subject and few steps (< 1 min).

    python tools/benchmarks/bench_fit.py [--quick] [--json] [--out out/bench_fit]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tools.benchmarks.common import emit, parser, row


def held_out(tests: dict, count: int) -> dict:
    out = {}
    for split, ds in tests.items():
        step = max(1, len(ds) // count)
        out[split] = [ds[i] for i in range(0, len(ds), step)][:count]
    return out


def eval_psnr(avatar, body, shape, frames, backend: str) -> tuple[float, float]:
    from avatar.eval import psnr, ssim
    from avatar.render import render_gaussian_set

    ps, ss = [], []
    with torch.no_grad():
        for f in frames:
            t, _ = body.bone_transforms(f.pose, shape)
            r = render_gaussian_set(avatar.posed(t[0].float()), f.camera, background=None, backend=backend)
            gt = f.image * f.mask[..., None]
            ps.append(float(psnr(r.colors[0].clamp(0, 1), gt)))
            ss.append(float(ssim(r.colors[0].clamp(0, 1), gt)))
    return statistics.mean(ps), statistics.mean(ss)


MAJOR_BONES = ("spine01", "spine02", "spine03", "spine04", "spine05", "neck01", "head", "upperleg01.L", "upperleg01.R",
               "lowerleg01.L", "lowerleg01.R", "foot.L", "foot.R", "clavicle.L", "clavicle.R", "upperarm01.L",
               "upperarm01.R", "lowerarm01.L", "lowerarm01.R", "wrist.L", "wrist.R")


def major_bones(body) -> list[int]:
    return [body.bone_index(n) for n in MAJOR_BONES if n in body.bone_names]


def perturb_poses(frames: list, body, degrees: float, seed: int) -> list:
    """Frames whose major joints are turned by ``degrees`` about random axes (one draw per frame id)."""
    from avatar.geometry import axis_angle_to_matrix, matrix_to_axis_angle
    from avatar.types import BodyPose

    g = torch.Generator().manual_seed(seed)
    bones = major_bones(body)
    noise: dict[int, torch.Tensor] = {}
    out = []
    for f in frames:
        if f.frame_id not in noise:
            axis = torch.nn.functional.normalize(torch.randn(len(bones), 3, generator=g), dim=-1)
            noise[f.frame_id] = axis * (degrees * torch.pi / 180)
        rot = f.pose.rotations.clone()
        R = axis_angle_to_matrix(noise[f.frame_id].to(rot)) @ axis_angle_to_matrix(rot[bones])
        rot[bones] = matrix_to_axis_angle(R)
        out.append(dataclasses.replace(f, pose=BodyPose(rot, f.pose.translation)))
    return out


def joint_angle_error(poses: list, truth: list, bones: list[int]) -> float:
    """Mean geodesic angle (degrees) between the rotations of ``bones`` in ``poses`` and ``truth``."""
    from avatar.geometry import axis_angle_to_matrix

    errs = []
    for p, t in zip(poses, truth):
        Rp = axis_angle_to_matrix(p.rotations[bones].double())
        Rt = axis_angle_to_matrix(t.rotations[bones].double())
        cos = ((Rp.transpose(-1, -2) @ Rt).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
        errs.append(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean())
    return float(torch.stack(errs).mean())


def joint_position_error(poses: list, truth: list, body, shape) -> float:
    """Mean distance (mm) between the posed joints (bone heads) of ``poses`` and ``truth`` (MPJPE, all bones)."""
    from avatar.types import BodyPose

    with torch.no_grad():
        stack = lambda ps: BodyPose(torch.stack([p.rotations for p in ps]), torch.stack([p.translation for p in ps]))  # noqa: E731
        a = body(stack(poses), shape).joints
        b = body(stack(truth), shape).joints
    return float((a - b).norm(dim=-1).mean()) * 1000.0


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    t = [c["fit_seconds"] for c in curve]
    for split in ("novel_view", "novel_pose"):
        if f"{split}_psnr" in curve[0]:
            ax[0].plot(t, [c[f"{split}_psnr"] for c in curve], marker="o", label=split)
            ax[1].plot(t, [c[f"{split}_ssim"] for c in curve], marker="o", label=split)
    ax[0].set(xlabel="fitting time (s)", ylabel="PSNR (dB)", title="held-out PSNR")
    ax[1].set(xlabel="fitting time (s)", ylabel="SSIM", title="held-out SSIM")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/bench_fit"))
    p.add_argument("--pose-noise-deg", type=float, default=0.0,
                   help="perturb the major joints of the training poses by this angle and fit with pose refinement; "
                        "reports the joint-angle error before and after")
    args = p.parse_args()
    from avatar.body import AnnyBody
    from avatar.fit.job import fit_subject
    from configs.presets import preset
    from tools.fit_avatar import FitAvatarArgs, _splits, make_demo_subject

    quick = args.quick
    demo = FitAvatarArgs(demo=True, out=args.out / ("quick" if quick else "full"), demo_frames=12 if quick else 100,
                         demo_size=128 if quick else 512, progress=False)
    body = AnnyBody()
    root = make_demo_subject(demo, body)
    train, tests, _ = _splits(demo, root, body, None)
    shape = train[0].shape
    evalset = held_out(tests, 3 if quick else 6)
    overrides = dict(steps=120, num_gaussians=6000, checkpoint_every=0) if quick else dict(checkpoint_every=0)
    noisy = None
    if args.pose_noise_deg > 0:
        overrides["pose_refine"] = True
        truth = [train[i] for i in range(len(train))]
        noisy = perturb_poses(truth, body, args.pose_noise_deg, seed=1)
        train = noisy
    cfg = preset("fast", **overrides)
    every = max(1, cfg.steps // 8)
    curve: list[dict] = []
    eval_time = [0.0]
    fit_start = [None]

    def probe(trainer, ctx) -> None:
        if fit_start[0] is None:
            fit_start[0] = time.perf_counter()
        if ctx.step % every and ctx.step != cfg.steps:
            return
        t0 = time.perf_counter()
        point = {"step": ctx.step, "fit_seconds": round(t0 - fit_start[0] - eval_time[0], 2),
                 "gaussians": trainer.avatar.num_gaussians}
        for split, frames in evalset.items():
            point[f"{split}_psnr"], point[f"{split}_ssim"] = eval_psnr(trainer.avatar, body, shape, frames, cfg.backend)
        curve.append(point)
        eval_time[0] += time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        result = fit_subject(train, body, cfg, Path(tmp) / "fit", progress=False, callbacks=[probe])
        ref_cfg = dataclasses.replace(cfg, steps=4, backend="torch")
        ref = fit_subject(train, body, ref_cfg, Path(tmp) / "ref", progress=False)
    steps = result.history[1:]
    pose_rows = []
    if noisy is not None:
        bones = major_bones(body)
        before = joint_angle_error([f.pose for f in noisy], [f.pose for f in truth], bones)
        with torch.no_grad():
            refined = [result.refiner(f.pose, f.frame_id) for f in noisy]
        after = joint_angle_error(refined, [f.pose for f in truth], bones)
        pos_before = joint_position_error([f.pose for f in noisy], [f.pose for f in truth], body, shape)
        pos_after = joint_position_error(refined, [f.pose for f in truth], body, shape)
        pose_rows = [row(f"joint-angle error of the input poses ({len(bones)} major joints)", before, "deg", None),
                     row("joint-angle error after pose refinement", after, "deg", None),
                     row("share of the joint-angle error recovered", 1.0 - after / before, "ratio", None),
                     row("joint-position error of the input poses (all joints, MPJPE)", pos_before, "mm", None),
                     row("joint-position error after pose refinement", pos_after, "mm", None),
                     row("share of the joint-position error recovered", 1.0 - pos_after / pos_before, "ratio", None)]
    ms = lambda key, hist: 1000 * statistics.median(h[key] for h in hist)  # noqa: E731
    base = ms("t_step", ref.history[1:])
    rows = [row("train step, torch reference rasterizer (baseline)", base, "ms", base),
            row("train step, cpu backend (median)", ms("t_step", steps), "ms", base)]
    for stage in ("skinning", "render", "loss", "backward", "optimizer", "densify"):
        key = f"t_{stage}"
        if key in steps[0]:
            rows.append(row(f"  stage {stage}", ms(key, steps), "ms", None))
    fit_seconds = curve[-1]["fit_seconds"] if curve else result.seconds
    rows.append(row(f"fit time, {cfg.steps} steps, {len(train)} frames at {train[0].image.shape[0]}px", fit_seconds, "s",
                    None))
    rows.append(row("Gaussians at the end", float(result.avatar.num_gaussians), "count", None))
    last = curve[-1]
    for split in evalset:
        rows.append(row(f"{split} PSNR ({len(evalset[split])} frames)", last[f"{split}_psnr"], "dB", None))
        rows.append(row(f"{split} SSIM", last[f"{split}_ssim"], "ssim", None))
    rows.extend(pose_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(curve, indent=2))
    try:
        plot(curve, args.out / "psnr_vs_time.png")
    except ImportError:
        print("bench_fit: matplotlib is not installed; no plot written (pip install matplotlib)")
    emit(rows, args.json, __doc__.splitlines()[0], "the same training steps with backend='torch'")


if __name__ == "__main__":
    main()

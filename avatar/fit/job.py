"""The per-subject fitting job: frames + body model + ``FitConfig`` -> a trained ``GaussianAvatar``.

``fit_subject`` builds everything (downscaled frames, per-frame bone transforms, the avatar initialized on the
body's rest surface with colours from a few frames, the optional pose refiner, the trainer and its callbacks), runs
the loop, writes checkpoints under ``out_dir/checkpoints`` (and resumes from the latest one on request) and returns
a ``FitResult`` whose history records loss, PSNR and the time of each stage of every step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from avatar.data.frames import Frame
from avatar.fit.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    save_checkpoint,
)
from avatar.fit.pose_refine import PoseRefiner
from avatar.fit.trainer import Callback, FitConfig, ProgressBar, StepContext, Trainer, densify_callback
from avatar.represent.avatar import GAUSSIAN_FIELDS, GaussianAvatar
from avatar.types import BodyPose, Cameras


@dataclass(frozen=True)
class FitResult:
    """avatar: the trained avatar. refiner: the pose corrections or None. history: one dict per step (step, frame,
    loss and its terms, psnr, num_gaussians, t_<stage> seconds, t_step). seconds: wall time of this call.
    checkpoint: the last checkpoint's JSON path (None if none was written)."""

    avatar: GaussianAvatar
    refiner: PoseRefiner | None
    history: list[dict]
    seconds: float
    checkpoint: Path | None
    config: FitConfig


def downscale_frame(frame: Frame, factor: int) -> Frame:
    """``frame`` with image and mask area-averaged by an integer ``factor`` and intrinsics scaled to match (pixel
    centres at +0.5, so continuous pixel coordinates scale by 1 / factor)."""
    if factor == 1:
        return frame
    H, W = frame.mask.shape
    h, w = H // factor, W // factor
    if h < 1 or w < 1:
        raise ValueError(f"downscale_frame: factor {factor} too large for {W}x{H}")
    img = F.interpolate(frame.image[:h * factor, :w * factor].permute(2, 0, 1)[None], size=(h, w), mode="area")
    msk = F.interpolate(frame.mask[:h * factor, :w * factor][None, None], size=(h, w), mode="area")
    K = frame.camera.Ks.clone()
    K[..., :2, :] /= factor
    cam = Cameras(frame.camera.viewmats, K, w, h)
    return dataclasses.replace(frame, image=img[0].permute(1, 2, 0).contiguous(), mask=msk[0, 0], camera=cam)


def frame_to(frame: Frame, device: torch.device | str) -> Frame:
    """``frame`` with every tensor on ``device``."""
    cam = Cameras(frame.camera.viewmats.to(device), frame.camera.Ks.to(device), frame.camera.width, frame.camera.height)
    pose = BodyPose(frame.pose.rotations.to(device), frame.pose.translation.to(device))
    return dataclasses.replace(frame, image=frame.image.to(device), mask=frame.mask.to(device), camera=cam, pose=pose,
                               shape=frame.shape.to(device))


def _config_json(cfg: FitConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def trainer_checkpoint(trainer: Trainer, directory: Path) -> Path:
    """Write everything the trainer needs to continue (see ``avatar.fit.checkpoint``)."""
    tensors = {f"avatar/{k}": v for k, v in trainer.avatar.state_dict().items()}
    if trainer.refiner is not None:
        tensors.update({f"refiner/{k}": v for k, v in trainer.refiner.state_dict().items()})
    opt, groups = optimizer_tensors(trainer.optimizer)
    tensors.update(opt)
    tensors.update({f"densify/{k}": v for k, v in trainer.densify_state.items()})
    if trainer.neighbours is not None:
        tensors["neighbours"] = trainer.neighbours
    tensors["rng/generator"] = trainer.generator.get_state()
    meta = dict(config=_config_json(trainer.cfg), optimizer_groups=groups, history=trainer.history,
                num_gaussians=trainer.avatar.num_gaussians)
    return save_checkpoint(directory, trainer.step, tensors, meta, trainer.cfg.keep_checkpoints)


def restore_trainer(trainer: Trainer, json_path: Path) -> None:
    """Load a checkpoint of :func:`trainer_checkpoint` into a freshly built trainer with the same config."""
    tensors, meta = load_checkpoint(json_path)
    saved, current = meta.get("config"), _config_json(trainer.cfg)
    if saved != current:
        diff = sorted(k for k in set(saved or {}) | set(current) if (saved or {}).get(k) != current.get(k))
        raise ValueError(f"{json_path}: checkpoint was written with a different FitConfig (fields {diff})")
    sd = {k[len("avatar/"):]: v for k, v in tensors.items() if k.startswith("avatar/")}
    n = trainer.avatar.num_gaussians
    trainer.avatar.replace_gaussians(torch.zeros(n, dtype=torch.bool), {k: sd[k] for k in GAUSSIAN_FIELDS})
    trainer.avatar.load_state_dict(sd)
    if trainer.refiner is not None:
        trainer.refiner.load_state_dict({k[len("refiner/"):]: v for k, v in tensors.items() if k.startswith("refiner/")})
    trainer.optimizer = trainer.build_optimizer()
    load_optimizer_tensors(trainer.optimizer, tensors, meta["optimizer_groups"])
    dev = trainer.avatar.means.device
    trainer.densify_state = {k[len("densify/"):]: v.to(dev) for k, v in tensors.items() if k.startswith("densify/")}
    trainer.neighbours = tensors["neighbours"].to(dev) if "neighbours" in tensors else None
    trainer.generator.set_state(tensors["rng/generator"])
    trainer.step = int(meta["step"])
    trainer.history = list(meta["history"])


def checkpoint_callback(directory: Path, every: int) -> Callback:
    def cb(trainer: Trainer, ctx: StepContext) -> None:
        if every and ctx.step % every == 0 and ctx.step < trainer.cfg.steps:
            t0 = time.perf_counter()
            ctx.record.update(num_gaussians=trainer.avatar.num_gaussians,
                              **{f"t_{k}": v for k, v in ctx.timings.items()})  # the times so far
            trainer_checkpoint(trainer, directory)
            ctx.timings["checkpoint"] += time.perf_counter() - t0
    return cb


def build_avatar(frames: Sequence[Frame], body_model, cfg: FitConfig, transforms: torch.Tensor,
                 init_mesh=None) -> GaussianAvatar:
    """The initial avatar: body rest surface for the subject's shape, colours from ``cfg.init_color_frames``.

    ``init_mesh`` (opt-in): a canonical mesh with ``vertices [V, 3]``, ``faces [F, 3]``, dense ``skin_weights [V, J]``
    and ``colors [V, 3]`` (e.g. ``avatar.fit.mesh_refine.RefinedMesh``) to start from instead: Gaussians bound to its
    faces (``avatar.represent.mesh_gaussians.avatar_from_mesh``), colours and weights from the mesh."""
    shape = frames[0].shape
    if init_mesh is not None:
        from avatar.represent.mesh_gaussians import avatar_from_mesh

        with torch.no_grad():
            body_verts = body_model.rest(shape).vertices[0].float()
            v = init_mesh.vertices.detach().float().to(body_verts.device)
            return avatar_from_mesh(v, init_mesh.faces.to(v.device), init_mesh.skin_weights.detach().float().to(v.device),
                                    None if getattr(init_mesh, "colors", None) is None else init_mesh.colors.float().to(v.device),
                                    cfg.num_gaussians, body_verts, torch.Generator().manual_seed(cfg.seed),
                                    opacity=cfg.init_opacity, weight_field=cfg.weight_field)
    with torch.no_grad():
        rest = body_model.rest(shape)
        verts = rest.vertices[0].float()
        weights = body_model.dense_skin_weights().float()
        k = min(cfg.init_color_frames, len(frames))
        picks = sorted({round(i * (len(frames) - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
        views = [(frames[i].image, frames[i].mask, frames[i].camera, transforms[i]) for i in picks]
        g = torch.Generator().manual_seed(cfg.seed)
        return GaussianAvatar.from_surface(verts, body_model.faces, weights, max(cfg.num_gaussians - verts.shape[0], 0),
                                           g, views, opacity=cfg.init_opacity, weight_field=cfg.weight_field)


def fit_subject(
    train: Sequence[Frame],
    body_model,
    cfg: FitConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    device: torch.device | str | None = None,
    init_mesh=None,
) -> FitResult:
    """Fit a Gaussian avatar to ``train`` (an ``AvatarDataset`` or any sequence of ``Frame``) of one subject.

    Checkpoints go to ``out_dir/checkpoints`` every ``cfg.checkpoint_every`` steps and at the end; with ``resume``
    the latest one is loaded (its config must equal ``cfg``) and the run continues from its step. ``callbacks`` run
    after the built-in ones (densification, checkpointing, progress) every step. Tensors stay on the device of the
    frames and ``body_model`` unless ``device`` is given: then the frames are copied there and ``body_model`` is
    moved there (``nn.Module.to``, in place); e.g. ``device="cuda"`` with ``backend="auto"`` trains with gsplat.
    ``init_mesh``: start from Gaussians bound to this refined canonical mesh instead of the body (see ``build_avatar``).
    """
    t_start = time.perf_counter()
    cfg.validate()
    if len(train) == 0:
        raise ValueError("fit_subject: no training frames")
    frames = [downscale_frame(train[i], cfg.downscale) for i in range(len(train))]
    if device is not None:
        body_model = body_model.to(device)
        frames = [frame_to(f, device) for f in frames]
    shape = frames[0].shape
    with torch.no_grad():
        poses = [f.pose for f in frames]
        batch = BodyPose(torch.stack([p.rotations for p in poses]), torch.stack([p.translation for p in poses]))
        transforms, _ = body_model.bone_transforms(batch, shape)
        transforms = transforms.float()
    avatar = build_avatar(frames, body_model, cfg, transforms, init_mesh)
    refiner = None
    if cfg.pose_refine:
        refiner = PoseRefiner([f.frame_id for f in frames], body_model.num_bones).to(avatar.means.device)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    cbs: list[Callback] = [densify_callback, checkpoint_callback(ckpt_dir, cfg.checkpoint_every)]
    trainer = Trainer(cfg, avatar, body_model, frames, transforms, shape, refiner, cbs)
    if resume:
        last = latest_checkpoint(ckpt_dir)
        if last is not None:
            restore_trainer(trainer, last)
    bar = None
    if progress:
        bar = ProgressBar(cfg.steps, trainer.step)
        trainer.callbacks.append(bar)
    trainer.callbacks.extend(callbacks)
    try:
        trainer.run()
    finally:
        if bar is not None:
            bar.close()
    path = trainer_checkpoint(trainer, ckpt_dir)
    return FitResult(trainer.avatar, trainer.refiner, trainer.history, time.perf_counter() - t_start, path, cfg)

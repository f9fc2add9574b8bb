"""The training loop of the per-subject fit, its config and presets.

The loop is only a loop: for each step, one frame -> ``forward_frame`` (pose refinement -> body transforms ->
``avatar.posed`` -> ``render_gaussian_set`` over the step's background) -> ``total_loss`` -> backward -> Adam ->
callbacks (densification, checkpointing, progress, history). The trainer owns the state (optimizer, densification
state, AIAP neighbours, RNG); everything random comes from ``Trainer.generator`` (seeded by ``FitConfig.seed``) or
from a per-epoch seeded permutation, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from avatar.data.frames import Frame
from avatar.fit import densify as dens
from avatar.fit.losses import LossConfig, LossTerms, psnr, total_loss
from avatar.fit.pose_refine import PoseRefiner
from avatar.represent.avatar import AvatarLR, GaussianAvatar, knn
from avatar.render.gaussians import GaussianRender, render_gaussian_set


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides a fit (saved beside every checkpoint)."""

    steps: int = 1500
    """Optimizer steps (one frame each)."""
    num_gaussians: int = 20_000
    """Initial Gaussians: the body's vertices plus area-weighted face samples up to this count."""
    lr: AvatarLR = field(default_factory=AvatarLR)
    """Learning rates of the avatar's parameter groups."""
    lr_scale: float = 1.0
    """Multiplies every learning rate (short CPU runs can afford a larger step)."""
    weight_field: bool = True
    """Learn a residual skinning-weight field (GauHuman) on top of the body's weights."""
    pose_refine: bool = False
    """Learn per-frame pose corrections (``PoseRefiner``)."""
    pose_refine_lr: float = 5e-4
    """Adam learning rate of the pose corrections (radians / metres per step)."""
    densify: dens.DensifyConfig = field(default_factory=dens.DensifyConfig)
    """Densification and pruning schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    background: Literal["random", "black", "white"] = "random"
    """Background composited behind the render and the ground truth (``image * mask + bg * (1 - mask)``):
    a random colour per step (discourages semi-transparent bodies) or a fixed one (the evaluation protocols use black)."""
    seed: int = 0
    """Seed of the initial samples, frame order, backgrounds and splits."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (newest)."""
    backend: Literal["auto", "cpu", "torch", "gsplat"] = "auto"
    """Gaussian rasterizer backend (``avatar.render``)."""
    downscale: int = 1
    """Integer factor the training images are downscaled by (area average; intrinsics follow)."""
    init_color_frames: int = 8
    """Frames (evenly spread) whose pixels initialize the Gaussians' colours."""
    init_opacity: float = 0.3
    """Initial opacity of every Gaussian."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"FitConfig.steps must be >= 1, got {self.steps}")
        if self.num_gaussians < 1:
            raise ValueError(f"FitConfig.num_gaussians must be >= 1, got {self.num_gaussians}")
        if self.background not in ("random", "black", "white"):
            raise ValueError(f"FitConfig.background must be 'random', 'black' or 'white', got {self.background!r}")
        if self.backend not in ("auto", "cpu", "torch", "gsplat"):
            raise ValueError(f"FitConfig.backend must be 'auto', 'cpu', 'torch' or 'gsplat', got {self.backend!r}")
        if not isinstance(self.downscale, int) or self.downscale < 1:
            raise ValueError(f"FitConfig.downscale must be an int >= 1, got {self.downscale!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"FitConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        self.densify.validate()


def fast_config(**overrides) -> FitConfig:
    """CPU preset (2 cores): ~100 frames at 512x512 in about 5 minutes with the compiled CPU backend."""
    cfg = FitConfig(
        steps=1200, num_gaussians=20_000, lr_scale=1.0, backend="auto",
        densify=dens.DensifyConfig(start=300, stop=900, interval=150, max_gaussians=30_000),
        checkpoint_every=400,
    )
    return dataclasses.replace(cfg, **overrides)


def quality_config(**overrides) -> FitConfig:
    """GPU preset (gsplat): more steps and Gaussians, pose refinement on, 3DGS-Avatar-like schedule."""
    cfg = FitConfig(
        steps=6000, num_gaussians=40_000, pose_refine=True, backend="auto",
        densify=dens.DensifyConfig(start=500, stop=4000, interval=100, max_gaussians=150_000, reset_every=3000),
        checkpoint_every=1000,
    )
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# pure pieces


def exponential_lr(step: int, total: int, start: float, end: float) -> float:
    """Log-linear interpolation from ``start`` (step 0) to ``end`` (step ``total``), as 3DGS's position schedule."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return math.exp((1 - t) * math.log(start) + t * math.log(end))


def frame_index(step: int, num_frames: int, seed: int) -> int:
    """The frame of 1-based ``step``: frames in a fresh seeded permutation every epoch (a function of the step)."""
    epoch, i = divmod(step - 1, num_frames)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(num_frames, generator=g)[i])


def composite(image: Tensor, mask: Tensor, background: Tensor) -> Tensor:
    """``image [H, W, 3] * mask [H, W] + background [3] * (1 - mask)``."""
    m = mask[..., None]
    return image * m + background * (1 - m)


def background_color(mode: str, generator: torch.Generator, like: Tensor) -> Tensor:
    """``[3]`` background of one step."""
    if mode == "random":
        return torch.rand(3, generator=generator).to(like)
    return like.new_full((3,), 1.0 if mode == "white" else 0.0)


@dataclass(frozen=True)
class FrameOutput:
    render: GaussianRender
    posed_means: Tensor  # [N, 3]
    scales: Tensor  # [N, 3]
    pose_prior: Tensor | None


def forward_frame(avatar: GaussianAvatar, transforms: Tensor, frame: Frame, background: Tensor, backend: str,
                  timings: dict[str, float]) -> FrameOutput:
    """Skin the avatar with ``transforms [J, 4, 4]`` and render it into ``frame.camera``; adds stage times."""
    t0 = time.perf_counter()
    posed = avatar.posed(transforms)
    t1 = time.perf_counter()
    render = render_gaussian_set(posed, frame.camera, background=background, backend=backend)
    timings["skinning"] += t1 - t0
    timings["render"] += time.perf_counter() - t1
    return FrameOutput(render, posed.means, posed.scales, None)


# ----------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class StepContext:
    """What callbacks see after a step (mutable: the densify callback sets ``changed``)."""

    step: int
    frame: Frame
    output: FrameOutput
    terms: LossTerms
    psnr: float
    timings: dict[str, float]
    record: dict
    """This step's history entry (already in ``Trainer.history``; stage times are added after the callbacks)."""
    changed: bool = False


Callback = Callable[["Trainer", StepContext], None]
STAGES = ("pose", "skinning", "render", "loss", "backward", "optimizer", "densify", "checkpoint")


class Trainer:
    """Owns the optimizer, densification state, AIAP neighbours, generator and step counter of one fit.

    frames: the training frames (already downscaled). transforms: per-frame bone transforms [J, 4, 4] from the input
    poses (used when ``refiner`` is None). shape: [S] body shape.
    """

    def __init__(self, cfg: FitConfig, avatar: GaussianAvatar, body_model, frames: Sequence[Frame],
                 transforms: Tensor, shape: Tensor, refiner: PoseRefiner | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        cfg.validate()
        self.cfg, self.avatar, self.body, self.frames = cfg, avatar, body_model, list(frames)
        self.transforms, self.shape, self.refiner = transforms, shape, refiner
        self.callbacks = list(callbacks)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.densify_state = dens.init_state(avatar.num_gaussians, avatar.means.detach())
        self.neighbours: Tensor | None = None
        self.history: list[dict] = []
        self.optimizer = self.build_optimizer()

    def build_optimizer(self) -> torch.optim.Adam:
        groups = self.avatar.param_groups(self.cfg.lr, self.cfg.lr_scale)
        if self.refiner is not None:
            groups += self.refiner.param_groups(self.cfg.pose_refine_lr)
        return torch.optim.Adam(groups, lr=0.0, eps=1e-15)

    def set_learning_rates(self, step: int) -> None:
        lr, ext, s = self.cfg.lr, self.avatar.extent, self.cfg.lr_scale
        for g in self.optimizer.param_groups:
            if g["name"] == "means":
                g["lr"] = exponential_lr(step - 1, self.cfg.steps, lr.means * ext * s, lr.means_final * ext * s)

    def transforms_for(self, frame_idx: int, frame: Frame) -> tuple[Tensor, Tensor | None]:
        if self.refiner is None:
            return self.transforms[frame_idx], None
        pose = self.refiner(frame.pose, frame.frame_id)
        t, _ = self.body.bone_transforms(pose, self.shape)
        return t[0], self.refiner.prior(frame.frame_id)

    def train_step(self) -> StepContext:
        step = self.step + 1
        timings = dict.fromkeys(STAGES, 0.0)
        t_start = time.perf_counter()
        self.set_learning_rates(step)
        fi = frame_index(step, len(self.frames), self.cfg.seed)
        frame = self.frames[fi]
        bg = background_color(self.cfg.background, self.generator, frame.image)
        t0 = time.perf_counter()
        transforms, prior = self.transforms_for(fi, frame)
        timings["pose"] += time.perf_counter() - t0
        out = forward_frame(self.avatar, transforms, frame, bg, self.cfg.backend, timings)
        out = dataclasses.replace(out, pose_prior=prior)
        if out.render.means2d.requires_grad:
            out.render.means2d.retain_grad()
        t0 = time.perf_counter()
        if self.cfg.loss.aiap and (self.neighbours is None or self.neighbours.shape[0] != self.avatar.num_gaussians):
            self.neighbours = knn(self.avatar.means.detach(), self.cfg.loss.aiap_neighbours)[1]
        target = composite(frame.image, frame.mask, bg)
        pred = out.render.colors[0]
        terms = total_loss(self.cfg.loss, pred, target, out.render.alphas[0], frame.mask, out.scales,
                           self.avatar.means, out.posed_means, self.neighbours, prior)
        timings["loss"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        timings["backward"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        self.optimizer.step()
        timings["optimizer"] += time.perf_counter() - t0
        self.step = step
        with torch.no_grad():
            p = float(psnr(pred.detach().clamp(0, 1), target))
        rec = dict(step=step, frame=fi, loss=float(terms.total.detach()), psnr=p,
                   **{k: v for k, v in terms.as_floats().items() if k != "total"})
        self.history.append(rec)
        ctx = StepContext(step, frame, out, terms, p, timings, rec)
        for cb in self.callbacks:
            cb(self, ctx)
        if ctx.changed:
            self.neighbours = None
        rec.update(num_gaussians=self.avatar.num_gaussians, **{f"t_{k}": v for k, v in timings.items()},
                   t_step=time.perf_counter() - t_start)
        return ctx

    def run(self) -> None:
        while self.step < self.cfg.steps:
            self.train_step()


# ----------------------------------------------------------------------------------------------------------------
# callbacks


def densify_callback(trainer: Trainer, ctx: StepContext) -> None:
    """Accumulate screen-space gradients and refine on schedule (``avatar.fit.densify``)."""
    cfg = trainer.cfg.densify
    t0 = time.perf_counter()
    if ctx.step < cfg.stop:
        r = ctx.output.render
        if r.means2d.grad is not None and r.means2d.shape[1] == trainer.densify_state["grad2d"].shape[0]:
            trainer.densify_state = dens.accumulate(trainer.densify_state, r.means2d.grad, r.radii,
                                                    ctx.frame.camera.width, ctx.frame.camera.height)
        n = trainer.avatar.num_gaussians
        trainer.densify_state, report = dens.refine(ctx.step, trainer.avatar, trainer.optimizer,
                                                    trainer.densify_state, cfg, trainer.generator)
        ctx.changed = report is not None and (report.cloned + report.split + report.pruned > 0 or
                                              trainer.avatar.num_gaussians != n)
    ctx.timings["densify"] += time.perf_counter() - t0


class ProgressBar:
    """tqdm bar with loss, PSNR and ETA; ``close()`` at the end."""

    def __init__(self, total: int, initial: int = 0, every: int = 10) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="fit", dynamic_ncols=True)
        self.every = every

    def __call__(self, trainer: Trainer, ctx: StepContext) -> None:
        self.bar.update(1)
        if ctx.step % self.every == 0:
            self.bar.set_postfix(loss=f"{float(ctx.terms.total):.4f}", psnr=f"{ctx.psnr:.2f}",
                                 n=trainer.avatar.num_gaussians)

    def close(self) -> None:
        self.bar.close()

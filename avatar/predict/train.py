"""Training and evaluation of the depth + skinning-code network on synthetic renders.

Pieces, each a function: :func:`batch_inputs` (samples -> net inputs, the training-time augmentations: colour gain
and dropping the prior codes), :func:`predictor_loss` (L1 on front/back depth inside the mask, L1 on the codes,
an optional L1 on depth finite differences), :func:`evaluate_predictor` (depth error in mm and code / decoded-weight
errors on a held-out set, beside the prior-only baseline), :func:`train_predictor` (Adam with a cosine schedule,
fixed step count, every random draw from seeded generators) and :func:`save_predictor` (fp16 safetensors + JSON,
atomic). Loading is :func:`avatar.predict.infer.load_predictor`.

The prior-only baseline predicts, for every pixel of the person mask, the naked body's depth and codes at that
pixel, or those of the nearest pixel covered by the body (:func:`fill_from_prior`) where the clothing extends past
the body. Errors are means over all masked pixels of the set: depth ``|pred - gt|`` in millimetres; code L1 =
``sum_c |pred_c - gt_c|`` over the 3 code channels; weight L1 = ``sum_j |decode(pred)_j - decode(gt)_j|`` over the
bones (the codec's "L1 per point").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from avatar.io import json_default
from avatar.predict.network import DepthSkinConfig, DepthSkinNet, DepthSkinOutput, extend_nearest, make_inputs
from avatar.predict.samples import SampleConfig, SampleSet, cached_samples, generate_samples

__all__ = [
    "PredictorTrainConfig",
    "FORMAT",
    "FORMAT_VERSION",
    "batch_inputs",
    "predictor_loss",
    "fill_from_prior",
    "evaluate_predictor",
    "train_predictor",
    "save_predictor",
    "file_sha256",
]

FORMAT = "avatar-depthskin"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PredictorTrainConfig:
    """Training of :class:`DepthSkinNet` (defaults: the shipped anny model; under 45 minutes on 2 CPU cores, also
    when they are shared)."""

    net: DepthSkinConfig = DepthSkinConfig()
    """The network."""
    train: SampleConfig = SampleConfig(seed=0, num_subjects=10, views_per_subject=36)
    """Training views."""
    val: SampleConfig = SampleConfig(seed=1_000_003, num_subjects=2, views_per_subject=10)
    """Held-out views (other subjects, poses and cameras: a different seed)."""
    steps: int = 1000
    """Adam steps."""
    batch_size: int = 8
    lr: float = 2e-3
    """Peak learning rate (linear warm-up over 3% of the steps, cosine decay to 2% of it)."""
    weight_decay: float = 0.0
    depth_weight: float = 50.0
    """Loss weight of the mean absolute depth error, per metre (front and back each)."""
    code_weight: float = 100.0
    """Loss weight of the mean absolute code error (per channel; front and back each)."""
    grad_weight: float = 25.0
    """Loss weight of the L1 error of depth finite differences (neighbouring pixels both in the mask), per metre."""
    drop_prior_codes: float = 0.2
    """Probability that a training sample is shown without prior codes (so callers without them get predictions)."""
    color_gain: float = 0.15
    """Random per-channel image gain in [1 - g, 1 + g] during training."""
    seed: int = 0
    """Seed of the network initialisation and of batch sampling / augmentation."""
    eval_every: int = 250
    """Steps between validation passes (0: only at the end)."""
    log_every: int = 50
    """Steps between progress lines (0: silent)."""
    threads: int = 0
    """torch threads during training (0: leave torch's setting)."""
    max_train_seconds: float = 1800.0
    """Time budget of the optimisation in seconds (0: none). With a budget, the schedule's progress is the larger of the step
    fraction and the time fraction, and training ends when either reaches 1, so a slow (shared) machine still
    finishes the learning-rate decay; such a run depends on the machine's speed, and the report says so
    (``stopped_early``, ``steps_done``)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        self.net.validate()
        self.train.validate()
        self.val.validate()
        if self.train.size != self.net.size or self.val.size != self.net.size:
            raise ValueError(f"PredictorTrainConfig: train.size and val.size must equal net.size ({self.net.size}), "
                             f"got {self.train.size} and {self.val.size}")
        if self.train.seed == self.val.seed:
            raise ValueError("PredictorTrainConfig: val.seed must differ from train.seed (held-out views)")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PredictorTrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("eval_every", "log_every", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"PredictorTrainConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "depth_weight", "code_weight"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"PredictorTrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_weight", "color_gain", "max_train_seconds"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"PredictorTrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.drop_prior_codes <= 1.0:
            raise ValueError(f"PredictorTrainConfig.drop_prior_codes must be in [0, 1], got {self.drop_prior_codes}")


def batch_inputs(
    samples: SampleSet,
    index: Tensor,  # [B] int64
    cfg: DepthSkinConfig,
    generator: torch.Generator | None = None,
    drop_prior_codes: float = 0.0,
    color_gain: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Net inputs ``[B, 14, S, S]`` and depth references ``ref [B]`` for ``samples[index]``; with a ``generator``,
    random per-channel colour gains and prior codes dropped with probability ``drop_prior_codes``."""
    s = samples.select(index)
    B = index.shape[0]
    images = s.images.float() / 255.0
    present = torch.ones(B)
    if generator is not None:
        if color_gain > 0:
            gain = 1 + color_gain * (2 * torch.rand(B, 1, 1, 3, generator=generator) - 1)
            images = (images * gain).clamp(0, 1)
        if drop_prior_codes > 0:
            present = (torch.rand(B, generator=generator) >= drop_prior_codes).float()
    codes = s.prior_codes.float()
    return make_inputs(images, s.masks, s.prior_mask, s.prior_depth[:, 0], s.prior_depth[:, 1], codes[..., :3],
                       codes[..., 3:], cfg, codes_present=present)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1.0)


def predictor_loss(
    out: DepthSkinOutput,
    target_depth: Tensor,  # [B, 2, S, S] metres
    target_codes: Tensor,  # [B, S, S, 6]
    masks: Tensor,  # [B, S, S] bool
    cfg: PredictorTrainConfig,
) -> tuple[Tensor, dict[str, float]]:
    """Pure function: the weighted training loss and its parts (float values for logging)."""
    m = masks.to(out.depth_front.dtype)
    lf = _masked_mean((out.depth_front - target_depth[:, 0]).abs(), m)
    lb = _masked_mean((out.depth_back - target_depth[:, 1]).abs(), m)
    tc = target_codes.to(out.codes_front.dtype)
    cf = _masked_mean((out.codes_front - tc[..., :3]).abs().mean(-1), m)
    cb = _masked_mean((out.codes_back - tc[..., 3:]).abs().mean(-1), m)
    loss = cfg.depth_weight * (lf + lb) + cfg.code_weight * (cf + cb)
    parts = {"depth_front_m": lf.item(), "depth_back_m": lb.item(), "codes_front": cf.item(), "codes_back": cb.item()}
    if cfg.grad_weight > 0:
        g = out.depth_front.new_zeros(())
        for pred, gt in ((out.depth_front, target_depth[:, 0]), (out.depth_back, target_depth[:, 1])):
            for dim in (1, 2):
                mm = m.narrow(dim, 1, m.shape[dim] - 1) * m.narrow(dim, 0, m.shape[dim] - 1)
                dp = pred.diff(dim=dim) - gt.diff(dim=dim)
                g = g + _masked_mean(dp.abs(), mm)
        loss = loss + cfg.grad_weight * g
        parts["grad_m"] = g.item()
    parts["loss"] = loss.item()
    return loss, parts


def fill_from_prior(values: Tensor, valid: Tensor, needed: Tensor, max_iters: int = 256) -> Tensor:
    """Fill ``values [B, C, S, S]`` outside ``valid [B, S, S]`` from the nearest valid pixels
    (:func:`avatar.predict.network.extend_nearest`) far enough to reach every pixel of ``needed [B, S, S]`` (at most
    ``max_iters`` rings); unreached pixels are 0. The prior-only baseline."""
    for iters in (8, 32, max_iters):
        v, reached = extend_nearest(values, valid, iters, needed=needed)
        if not bool((needed & ~reached).any()):
            break
    return v


@torch.no_grad()
def evaluate_predictor(model: DepthSkinNet, samples: SampleSet, codec=None, batch_size: int = 16,
                       prior_codes: bool = True) -> dict:
    """Held-out errors of ``model`` on ``samples`` beside the prior-only baseline (see the module docstring).

    Returns a dict with ``depth_front_mm``, ``depth_back_mm``, ``codes_l1``, ``weights_l1`` (the latter only with a
    ``codec``) for the network and the same keys prefixed ``prior_`` for the baseline, plus ``pixels``/``views``.
    ``prior_codes=False`` runs the network without the prior codes (the baseline still uses them)."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    pixels = 0
    for start in range(0, len(samples), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(samples)))
        s = samples.select(idx)
        x, ref = batch_inputs(samples, idx, cfg)
        if not prior_codes:
            x[:, 7:14] = 0
        out = model.predict(x, ref)
        m = s.masks
        gt_d = s.target_depth
        gt_c = s.target_codes.float()
        prior_d = fill_from_prior(s.prior_depth, s.prior_mask, m)
        prior_c = fill_from_prior(s.prior_codes.float().permute(0, 3, 1, 2), s.prior_mask, m).permute(0, 2, 3, 1)
        preds = {
            "": (out.depth_front, out.depth_back, torch.cat([out.codes_front, out.codes_back], -1)),
            "prior_": (prior_d[:, 0], prior_d[:, 1], prior_c),
        }
        n = int(m.sum())
        pixels += n
        for prefix, (df, db, codes) in preds.items():
            acc = {
                "depth_front_mm": ((df - gt_d[:, 0]).abs()[m].sum() * 1000.0),
                "depth_back_mm": ((db - gt_d[:, 1]).abs()[m].sum() * 1000.0),
                "codes_l1": ((codes - gt_c).abs()[m].reshape(-1, 2, 3).sum(-1).mean(-1).sum()),
            }
            if codec is not None:
                pc, gc = codes[m].reshape(-1, 3), gt_c[m].reshape(-1, 3)
                wl1 = (codec.decode(pc) - codec.decode(gc)).abs().sum(-1)  # [2n]
                acc["weights_l1"] = wl1.reshape(-1, 2).mean(-1).sum()
            for k, v in acc.items():
                sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v)
    model.train(was_training)
    report = {k: v / max(pixels, 1) for k, v in sums.items()}
    report["pixels"] = pixels
    report["views"] = len(samples)
    return report


def _lr_factor(progress: float) -> float:
    """Learning-rate factor at ``progress`` in [0, 1]: linear warm-up over the first 3%, cosine decay to 2%."""
    warm = 0.03
    if progress < warm:
        return max(progress / warm, 0.01)
    t = (progress - warm) / (1 - warm)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _round_to_fp16(model: DepthSkinNet) -> None:
    """Round every parameter and buffer to the nearest float16 value (what the shipped file stores)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(t.dtype))


def train_predictor(cfg: PredictorTrainConfig, body=None, codec=None, log=print,
                    samples: tuple[SampleSet, SampleSet] | None = None, cache_dir: str | Path | None = None,
                    codec_key: str | None = None) -> tuple[DepthSkinNet, dict]:
    """Train :class:`DepthSkinNet` with ``cfg``; returns the model (eval mode, weights rounded to float16 exactly
    as :func:`save_predictor` stores them) and the measured report (timings, loss history, validation errors of
    the rounded model beside the prior baseline, at the first and last evaluation).

    ``body`` defaults to anny, ``codec`` to the shipped skinning codec; ``samples`` = (train, val) skips generation
    (tests); ``cache_dir`` + ``codec_key`` (a hash of the codec file) cache the generated samples there
    (:func:`avatar.predict.samples.cached_samples`). ``log`` gets progress lines (``None``: silent)."""
    if not isinstance(cfg, PredictorTrainConfig):
        raise TypeError(f"train_predictor: cfg must be a PredictorTrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    say = log if log is not None else (lambda *_: None)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if codec is None:
            from avatar.predict.skin_codes import load_skin_codec

            codec = load_skin_codec()
        t0 = time.perf_counter()
        if samples is None:
            if body is None:
                from avatar.body import AnnyBody

                body = AnnyBody()
            verbose = cfg.log_every > 0 and log is not None
            if cache_dir is not None and codec_key is not None:
                train_set = cached_samples(body, codec, cfg.train, cache_dir, codec_key, log=verbose)
                val_set = cached_samples(body, codec, cfg.val, cache_dir, codec_key)
            else:
                train_set = generate_samples(body, codec, cfg.train, log=verbose)
                val_set = generate_samples(body, codec, cfg.val)
        else:
            train_set, val_set = samples
        gen_seconds = time.perf_counter() - t0
        say(f"[train_predictor] {len(train_set)} training views, {len(val_set)} held-out views ({gen_seconds:.0f} s)")

        state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # nn.Conv2d's init draws from the global RNG; restored below
        try:
            model = DepthSkinNet(cfg.net)
        finally:
            torch.random.set_rng_state(state)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        history: list[dict] = []
        evals: list[dict] = []
        initial = evaluate_predictor(model, val_set, codec)
        evals.append({"step": 0, **initial})
        t1 = time.perf_counter()
        window: list[dict] = []
        model.train()
        steps_done = 0
        for step in range(cfg.steps):
            progress = step / cfg.steps
            if cfg.max_train_seconds:
                progress = max(progress, (time.perf_counter() - t1) / cfg.max_train_seconds)
                if progress >= 1.0:
                    say(f"[train_predictor] max_train_seconds={cfg.max_train_seconds} reached after {step} steps: stopping")
                    break
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(progress)
            idx = torch.randint(0, len(train_set), (cfg.batch_size,), generator=gen)
            x, ref = batch_inputs(train_set, idx, cfg.net, gen, cfg.drop_prior_codes, cfg.color_gain)
            s = train_set.select(idx)
            out = model.predict(x, ref)
            loss, parts = predictor_loss(out, s.target_depth, s.target_codes, s.masks, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(parts)
            done = steps_done = step + 1
            if cfg.log_every and window and (done % cfg.log_every == 0 or done == cfg.steps):
                mean = {k: sum(p[k] for p in window) / len(window) for k in window[0]}
                history.append({"step": done, **{k: round(v, 6) for k, v in mean.items()}})
                el = time.perf_counter() - t1
                say(f"[train_predictor] step {done}/{cfg.steps}  lr {opt.param_groups[0]['lr']:.2e}  loss {mean['loss']:.4f}  "
                    f"depth f/b {1000 * mean['depth_front_m']:.1f}/{1000 * mean['depth_back_m']:.1f} mm  "
                    f"codes f/b {mean['codes_front']:.4f}/{mean['codes_back']:.4f}  "
                    f"{el:.0f} s, eta {el / done * (cfg.steps - done):.0f} s")
                window = []
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                ev = evaluate_predictor(model, val_set, codec)
                evals.append({"step": done, **ev})
                say(f"[train_predictor] val step {done}: depth f/b {ev['depth_front_mm']:.1f}/{ev['depth_back_mm']:.1f} mm "
                    f"(prior {ev['prior_depth_front_mm']:.1f}/{ev['prior_depth_back_mm']:.1f}), codes L1 "
                    f"{ev['codes_l1']:.4f} (prior {ev['prior_codes_l1']:.4f})")
        train_seconds = time.perf_counter() - t1
        model.eval()
        _round_to_fp16(model)
        final = evaluate_predictor(model, val_set, codec)
        final_no_codes = evaluate_predictor(model, val_set, codec, prior_codes=False)
        evals.append({"step": steps_done, **final})
        say(f"[train_predictor] final (fp16 weights): depth f/b {final['depth_front_mm']:.2f}/{final['depth_back_mm']:.2f} mm "
            f"(prior {final['prior_depth_front_mm']:.2f}/{final['prior_depth_back_mm']:.2f}), codes L1 "
            f"{final['codes_l1']:.4f} (prior {final['prior_codes_l1']:.4f}), weights L1 "
            f"{final.get('weights_l1', float('nan')):.4f} (prior {final.get('prior_weights_l1', float('nan')):.4f})")
    finally:
        torch.set_num_threads(old_threads)
    report = {
        "generate_seconds": round(gen_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(steps_done, 1), 4),
        "steps_done": steps_done,
        "stopped_early": steps_done < cfg.steps,
        "train_views": len(train_set),
        "val_views": len(val_set),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads() if not cfg.threads else cfg.threads,
        "val_initial": initial,
        "val": final,
        "val_without_prior_codes": final_no_codes,
        "val_history": evals,
        "loss_history": history,
    }
    return model, report


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (ties the predictor to the codec file it was trained with)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_predictor(path: str | Path, model: DepthSkinNet, meta: dict) -> Path:
    """Write ``path`` (``.safetensors``: the state dict in float16) and its ``.json`` sidecar atomically. The JSON
    holds the format, the network config (``net``) and everything in ``meta`` (seed, training config and time,
    validation metrics, the codec's file hash)."""
    from safetensors.torch import save

    from avatar.io import atomic_write_bytes, atomic_write_text

    if not isinstance(model, DepthSkinNet):
        raise TypeError(f"save_predictor: model must be a DepthSkinNet, got {type(model).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"save_predictor: meta must be a dict, got {type(meta).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_predictor: {path} must end in .safetensors")
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    full = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": "float16", "net": dataclasses.asdict(model.cfg), **meta}
    text = json.dumps(full, indent=2, default=json_default)
    atomic_write_bytes(path, save(state, metadata={"format": FORMAT}))
    atomic_write_text(path.with_suffix(".json"), text)
    return path

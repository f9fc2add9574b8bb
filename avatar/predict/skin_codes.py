"""Compressed skinning codes: an autoencoder from a body model's per-point skinning weights ``[J]`` to a 3-D code.

CanonicalFusion (ECCV 2024) predicts skinning weights per pixel as a 3-channel image; the weights of every point are
``decode(code)``. The encoder ``J -> 128 -> 256 -> 128 -> 64 -> 3`` ends in a sigmoid (codes in [0, 1], like an RGB
image), the decoder ``3 -> 64 -> 128 -> 256 -> 128 -> J`` ends in a softmax (decoded rows are convex weights, so
decoded LBS is still an affine blend of bone transforms). Hand-written because it is a 100-line model tied to our
body-model interface; no package ships it.

Training data (``sample_skin_points``) are points sampled densely on the rest surface of several random phenotypes
(area-uniform faces, uniform barycentrics; the weights are the barycentric blend of the three vertices' weights)
plus the vertices themselves, and copies of the surface points moved along the surface normal by up to a few cm
(clothing lies there; their weights are those of the surface point they came from, the rule every skinning-weight
transfer uses). The loss is the L1 distance of the decoded weights plus a small entropy term that keeps decoded rows
sparse (CanonicalFusion's "sparsity" regularizer), a cross-entropy to the targets (dense gradients through the
softmax) and the LBS position error the decoded weights cause under a few random poses (measured on 600-step runs:
held-out LBS error 32 mm mean without it, 3.2 mm with it, at the same weight L1). ``train_skin_codec`` also measures the codec on held-out points:
the mean L1 per point of the decoded weights and the LBS position error it causes on posed bodies (true vs decoded
weights, random poses from ``avatar.data.synthetic.make_motion``).

Files: ``<name>.safetensors`` (the module's float32 state dict) and ``<name>.json`` (format, body, bone names,
layer widths, seed, training config, measured report). Loading gives exactly the stored values.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar.io import json_default, load_module_weights

FORMAT = "avatar-skin-codec"
FORMAT_VERSION = 1
ENCODER_WIDTHS = (128, 256, 128, 64)
DECODER_WIDTHS = (64, 128, 256, 128)
CODE_DIM = 3


def shipped_codec_path(body_name: str = "anny") -> Path:
    """``data/predictor/skin_codec_<body>.safetensors`` in the source tree (written by ``tools/train_skin_codes.py``)."""
    return Path(__file__).resolve().parents[2] / "data" / "predictor" / f"skin_codec_{body_name}.safetensors"


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(0.01))
    return nn.Sequential(*layers)


class SkinCodec(nn.Module):
    """Skinning-weight autoencoder. ``encode: [..., J] -> [..., 3]`` in [0, 1]; ``decode: [..., 3] -> [..., J]``
    (softmax: rows are non-negative and sum to 1)."""

    def __init__(self, num_bones: int) -> None:
        super().__init__()
        if not isinstance(num_bones, int) or num_bones < 2:
            raise ValueError(f"SkinCodec: num_bones must be an int >= 2, got {num_bones!r}")
        self.num_bones = num_bones
        self.encoder = _mlp([num_bones, *ENCODER_WIDTHS, CODE_DIM])
        self.decoder = _mlp([CODE_DIM, *DECODER_WIDTHS, num_bones])

    def encode(self, weights: Tensor) -> Tensor:
        """``weights [..., J]`` (rows summing to 1) -> codes ``[..., 3]`` in [0, 1]."""
        if not isinstance(weights, Tensor) or weights.ndim < 1 or weights.shape[-1] != self.num_bones:
            raise ValueError(f"SkinCodec.encode: weights must be [..., {self.num_bones}], got {_shape(weights)}")
        return torch.sigmoid(self.encoder(weights.to(self._dtype)))

    def decode_logits(self, codes: Tensor) -> Tensor:
        """``codes [..., 3]`` -> pre-softmax logits ``[..., J]``."""
        if not isinstance(codes, Tensor) or codes.ndim < 1 or codes.shape[-1] != CODE_DIM:
            raise ValueError(f"SkinCodec.decode: codes must be [..., {CODE_DIM}], got {_shape(codes)}")
        return self.decoder(codes.to(self._dtype))

    def decode(self, codes: Tensor) -> Tensor:
        """``codes [..., 3]`` -> weights ``[..., J]`` (softmax rows)."""
        return torch.softmax(self.decode_logits(codes), dim=-1)

    def forward(self, weights: Tensor) -> Tensor:
        """Round trip ``decode(encode(weights))`` ``[..., J]``."""
        return self.decode(self.encode(weights))

    @property
    def _dtype(self) -> torch.dtype:
        return self.encoder[0].weight.dtype


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


@dataclass(frozen=True)
class SkinCodecConfig:
    """Training of the skinning codec (defaults: the shipped anny codec, about two minutes on 2 CPU cores)."""

    num_shapes: int = 4
    """Random phenotypes whose rest surfaces are sampled (``avatar.data.synthetic.sample_phenotype``)."""
    surface_samples: int = 40_000
    """Area-uniform surface points per phenotype (the body's vertices are added once)."""
    offset_fraction: float = 0.5
    """Fraction of the surface points that get a copy moved along the normal."""
    max_normal_offset: float = 0.05
    """Largest move along the surface normal, metres (uniform in [-max/4, max]: mostly outwards, where clothing is)."""
    steps: int = 2400
    """Adam steps."""
    batch_size: int = 2048
    lr: float = 3e-3
    """Initial learning rate (cosine decay to 1% of it)."""
    entropy_weight: float = 2e-3
    """Weight of the mean entropy of the decoded rows (sparsity)."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy ``-sum w log p`` of the decoded rows to the targets: L1 alone gives sparse, weak
    gradients through the softmax and trains much slower (measured here: mean L1 1.07 after 300 steps with L1 alone, 0.65 with this term)."""
    lbs_weight: float = 1.0
    """Weight of the LBS position error (centimetres) that the decoded weights cause under ``lbs_poses`` random poses:
    L1 on weights treats every bone alike, while mixing up two distant bones (left and right hand) is what moves
    points by metres; this term makes those errors expensive (0 turns it off)."""
    lbs_poses: int = 4
    """Random training poses (``make_motion(..., "free")`` of the first training phenotype) for ``lbs_weight``."""
    holdout_shapes: int = 1
    """Extra phenotypes (never trained on) for the held-out error."""
    holdout_samples: int = 20_000
    """Surface points per held-out phenotype."""
    eval_poses: int = 8
    """Random poses (``make_motion(..., "free")``) for the LBS position error."""

    def validate(self) -> None:
        for name in ("num_shapes", "surface_samples", "steps", "batch_size", "lbs_poses", "holdout_shapes", "holdout_samples",
                     "eval_poses"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SkinCodecConfig.{name} must be a positive int, got {v!r}")
        if not 0.0 <= self.offset_fraction <= 1.0:
            raise ValueError(f"SkinCodecConfig.offset_fraction must be in [0, 1], got {self.offset_fraction}")
        if not (self.max_normal_offset >= 0 and self.lr > 0 and min(self.entropy_weight, self.ce_weight, self.lbs_weight) >= 0):
            raise ValueError("SkinCodecConfig: max_normal_offset and the loss weights must be >= 0 and lr > 0")


@dataclass(frozen=True)
class SkinSamples:
    """Points with skinning weights.

    canonical: [N, 3] rest-pose positions (metres) of the shape they were sampled on.
    weights:   [N, J] dense weights (rows sum to 1).
    shape_id:  [N] int64 index of the phenotype (into the list given to ``sample_skin_points``).
    """

    canonical: Tensor
    weights: Tensor
    shape_id: Tensor


def sample_skin_points(body, shapes: Tensor, surface_samples: int, offset_fraction: float, max_normal_offset: float,
                       generator: torch.Generator, include_vertices: bool = True) -> SkinSamples:
    """Sample points with weights on and near the rest surface of ``body`` for each phenotype in ``shapes [S, D]``.

    Surface points: faces by area, uniform barycentrics, weights blended by the barycentrics. Near points: a
    ``offset_fraction`` share of them moved along the interpolated vertex normal by ``U(-max/4, max)`` metres, with
    the weights of the surface point.
    """
    from avatar.render.mesh import vertex_normals

    if shapes.ndim != 2:
        raise ValueError(f"sample_skin_points: shapes must be [S, D], got {tuple(shapes.shape)}")
    dense = body.dense_skin_weights().float()  # [V, J]
    faces = body.faces
    pts, wts, ids = [], [], []
    with torch.no_grad():
        rest = body.rest(shapes.to(body.dtype)).vertices.float()  # [S, V, 3]
        for s in range(shapes.shape[0]):
            v = rest[s]
            n = vertex_normals(v, faces)  # [V, 3]
            a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
            area = torch.linalg.cross(b - a, c - a).norm(dim=-1)
            f = torch.multinomial(area.double(), surface_samples, replacement=True, generator=generator)
            r = torch.rand(surface_samples, 2, generator=generator)
            sq = r[:, 0].sqrt()
            bary = torch.stack([1 - sq, sq * (1 - r[:, 1]), sq * r[:, 1]], -1)  # [N, 3]
            tri = faces[f]  # [N, 3]
            p = (bary[..., None] * v[tri]).sum(1)
            w = (bary[..., None] * dense[tri]).sum(1)
            nn_ = (bary[..., None] * n[tri]).sum(1)
            nn_ = nn_ / nn_.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k = int(round(offset_fraction * surface_samples))
            off = (torch.rand(k, generator=generator) * 1.25 - 0.25) * max_normal_offset
            p_off = p[:k] + off[:, None] * nn_[:k]
            group = [p, p_off] + ([v] if include_vertices else [])
            wgroup = [w, w[:k]] + ([dense] if include_vertices else [])
            pts += group
            wts += wgroup
            ids.append(torch.full((sum(len(g) for g in group),), s, dtype=torch.int64))
    return SkinSamples(torch.cat(pts), torch.cat(wts), torch.cat(ids))


def _loss(codec: SkinCodec, w: Tensor, entropy_weight: float, ce_weight: float, x: Tensor | None = None,
          transforms: Tensor | None = None, lbs_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """Training loss for target weights ``w [B, J]`` (canonical positions ``x [B, 3]`` and flattened bone transforms
    ``transforms [P, J, 12]`` for the LBS term); returns ``(loss, mean L1 per point)``."""
    logits = codec.decode_logits(codec.encode(w))
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    l1 = (p - w).abs().sum(-1).mean()
    entropy = -(p * logp).sum(-1).mean()
    ce = -(w * logp).sum(-1).mean()
    loss = l1 + entropy_weight * entropy + ce_weight * ce
    if lbs_weight > 0 and x is not None and transforms is not None:
        A = torch.einsum("bj,pjk->pbk", p - w, transforms).unflatten(-1, (3, 4))  # [P, B, 3, 4]
        err = (A[..., :3] * x[None, :, None, :]).sum(-1) + A[..., 3]  # [P, B, 3] position difference, metres
        loss = loss + lbs_weight * 100.0 * err.norm(dim=-1).mean()
    return loss, l1


def random_poses(body, shape: Tensor, num_poses: int, seed: int):
    """``num_poses`` poses (``BodyPose`` [P, J, 3] / [P, 3]) for measuring and training the codec: for anny, frames
    spread over ``make_motion(..., "free")`` (natural motion of legs, arms, spine); for other bodies (their bone names
    differ), seeded Gaussian axis-angles (0.3 rad) on every bone."""
    from avatar.types import BodyPose

    if body.name == "anny":
        from avatar.data.synthetic import make_motion

        rest = body.rest(shape.reshape(1, -1).to(body.dtype))
        motion = make_motion(body, rest.bone_heads[0], "free", max(num_poses * 7, 1), seed)
        frames = torch.linspace(0, motion.rotations.shape[0] - 1, num_poses).round().long()
        return BodyPose(motion.rotations[frames], motion.translation[frames])
    g = torch.Generator().manual_seed(seed)
    rot = torch.randn(num_poses, body.num_bones, 3, generator=g) * 0.3
    return BodyPose(rot, torch.zeros(num_poses, 3))


def evaluate_skin_codec(codec: SkinCodec, body, samples: SkinSamples, shapes: Tensor, num_poses: int, seed: int) -> dict:
    """Held-out error of ``codec`` on ``samples`` (from ``shapes [S, D]``): mean / p99 / max L1 per point of the
    decoded weights, and the LBS position error (mm, mean / p99 / max over points and poses) of skinning the
    samples' canonical positions with true vs decoded weights under ``num_poses`` random poses per shape."""
    from avatar.skinning.lbs import lbs_points

    with torch.no_grad():
        dec = torch.cat([codec(w) for w in samples.weights.split(65536)])
        l1 = (dec - samples.weights).abs().sum(-1)
        errs = []
        for s in range(shapes.shape[0]):
            sel = samples.shape_id == s
            pose = random_poses(body, shapes[s], num_poses, seed + s)
            T, _ = body.bone_transforms(pose, shapes[s:s + 1].expand(num_poses, -1).to(body.dtype))
            T = T.float()
            x = samples.canonical[sel]
            for t in range(num_poses):
                a = lbs_points(x, samples.weights[sel], T[t])
                b = lbs_points(x, dec[sel], T[t])
                errs.append((a - b).norm(dim=-1) * 1000.0)
        e = torch.cat(errs)
    return {
        "heldout_points": int(samples.weights.shape[0]),
        "l1_mean": float(l1.mean()), "l1_p99": float(torch.quantile(l1[:200_000], 0.99)), "l1_max": float(l1.max()),
        "lbs_poses_per_shape": num_poses,
        "lbs_error_mm_mean": float(e.mean()), "lbs_error_mm_p99": float(torch.quantile(e[:1_000_000], 0.99)),
        "lbs_error_mm_max": float(e.max()),
    }


def train_skin_codec(body, cfg: SkinCodecConfig = SkinCodecConfig(), seed: int = 0, log_every: int = 0) -> tuple[SkinCodec, dict]:
    """Train a codec for ``body`` with ``cfg`` (everything seeded by ``seed``); returns the codec (eval mode,
    float32, CPU) and the measured report (training time, final training loss, held-out errors)."""
    from avatar.data.synthetic import sample_phenotype

    if not isinstance(cfg, SkinCodecConfig):
        raise TypeError(f"train_skin_codec: cfg must be a SkinCodecConfig, got {type(cfg).__name__}")
    cfg.validate()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Linear's init draws from the global RNG; restored below
    try:
        codec = SkinCodec(body.num_bones)
    finally:
        torch.random.set_rng_state(torch_state)

    def shapes_for(ids):
        if body.name == "anny":
            return torch.stack([sample_phenotype(1000 * seed + i, body.shape_dim) for i in ids])
        return torch.randn(len(ids), body.shape_dim, generator=gen) * 0.5

    train_shapes = shapes_for(range(cfg.num_shapes))
    test_shapes = shapes_for(range(cfg.num_shapes, cfg.num_shapes + cfg.holdout_shapes))
    data = sample_skin_points(body, train_shapes, cfg.surface_samples, cfg.offset_fraction, cfg.max_normal_offset, gen)
    opt = torch.optim.Adam(codec.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
    W = data.weights
    X = data.canonical
    N = W.shape[0]
    T_train = None
    if cfg.lbs_weight > 0:
        pose = random_poses(body, train_shapes[0], cfg.lbs_poses, 10_000 + seed)
        with torch.no_grad():
            T, _ = body.bone_transforms(pose, train_shapes[:1].expand(cfg.lbs_poses, -1).to(body.dtype))
        T_train = T.float()[..., :3, :].flatten(-2)  # [P, J, 12]
    codec.train()
    history = []
    for step in range(cfg.steps):
        idx = torch.randint(0, N, (cfg.batch_size,), generator=gen)
        loss, l1 = _loss(codec, W[idx], cfg.entropy_weight, cfg.ce_weight, X[idx], T_train, cfg.lbs_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"[skin codec] step {step:5d}  loss {loss.item():.4f}  L1 {l1.item():.4f}", flush=True)
        if step >= cfg.steps - 50:
            history.append(l1.item())
    codec.eval()
    train_seconds = time.perf_counter() - start
    test = sample_skin_points(body, test_shapes, cfg.holdout_samples, cfg.offset_fraction, cfg.max_normal_offset, gen,
                              include_vertices=False)
    report = {"train_seconds": round(train_seconds, 1), "train_points": int(N),
              "train_l1_last50": sum(history) / len(history)}
    report.update(evaluate_skin_codec(codec, body, test, test_shapes, cfg.eval_poses, seed + 7919))
    return codec, report


def save_skin_codec(path: str | Path, codec: SkinCodec, meta: dict) -> Path:
    """Write ``path`` (``.safetensors``, float32 state dict) and its ``.json`` sidecar atomically. ``meta`` must
    name the ``body`` and may carry anything JSON-able (seed, config, report); bone count and widths are added."""
    from safetensors.torch import save

    from avatar.io import atomic_write_bytes, atomic_write_text

    if not isinstance(codec, SkinCodec):
        raise TypeError(f"save_skin_codec: codec must be a SkinCodec, got {type(codec).__name__}")
    if not isinstance(meta, dict) or not isinstance(meta.get("body"), str):
        raise ValueError("save_skin_codec: meta must be a dict with a 'body' name")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_skin_codec: {path} must end in .safetensors")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in codec.state_dict().items()}
    full = {"format": FORMAT, "version": FORMAT_VERSION, "num_bones": codec.num_bones, "code_dim": CODE_DIM,
            "encoder_widths": list(ENCODER_WIDTHS), "decoder_widths": list(DECODER_WIDTHS), **meta}
    text = json.dumps(full, indent=2, default=json_default)
    atomic_write_bytes(path, save(state, metadata={"format": FORMAT, "body": meta["body"]}))
    atomic_write_text(path.with_suffix(".json"), text)
    return path


def load_skin_codec(path: str | Path | None = None, body_name: str = "anny") -> SkinCodec:
    """Load a codec written by :func:`save_skin_codec`; ``path=None`` loads the shipped
    ``data/predictor/skin_codec_<body_name>.safetensors``. Returns a float32 CPU module in eval mode holding exactly
    the stored values. Clear errors for a missing file, a wrong format or body, or mismatched tensors."""

    shipped = path is None
    path = shipped_codec_path(body_name) if shipped else Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        hint = " (train it with `python -m tools.train_skin_codes`)" if shipped else ""
        raise FileNotFoundError(f"load_skin_codec: no skinning codec at {path}{hint}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"load_skin_codec: {path} has no metadata file {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_skin_codec: {meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"load_skin_codec: {meta_path} is not a skin codec file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"load_skin_codec: {meta_path} has version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
    if meta.get("body") != body_name:
        raise ValueError(f"load_skin_codec: {meta_path} is a codec for body {meta.get('body')!r}, expected {body_name!r}")
    if list(meta.get("encoder_widths", [])) != list(ENCODER_WIDTHS) or list(meta.get("decoder_widths", [])) != list(DECODER_WIDTHS):
        raise ValueError(f"load_skin_codec: {meta_path} has layer widths {meta.get('encoder_widths')} / "
                         f"{meta.get('decoder_widths')}, this code builds {list(ENCODER_WIDTHS)} / {list(DECODER_WIDTHS)}")
    num_bones = meta.get("num_bones")
    if not isinstance(num_bones, int) or num_bones < 2:
        raise ValueError(f"load_skin_codec: {meta_path} field num_bones must be an int >= 2, got {num_bones!r}")
    codec = load_module_weights(SkinCodec(num_bones), path, "load_skin_codec", f"a {num_bones}-bone codec")
    codec.meta = meta  # the JSON sidecar (seed, config, report), for reports
    return codec

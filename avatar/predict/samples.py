"""Training samples for the depth + skinning-code network, rendered from synthetic subjects.

Each sample is one view of one posed, clothed, textured synthetic subject (``avatar.data.synthetic``):

- input: the RGB render and its mask, and the *prior*: the front/back ``DepthLayers`` of the posed naked body model
  (same shape and, up to optional pose noise, the same pose), with the body's skinning codes as vertex attributes;
- target: the front/back depth and skinning codes of the posed clothed mesh. The clothed mesh shares the body's
  topology and skinning weights, so its per-vertex codes are ``codec.encode(body weights)`` as well.

Cameras are random: azimuth all around, elevation, distance, and a focal length chosen so that the subject fills a
random fraction of the square image (the framing :func:`avatar.predict.infer.predict_views` recreates by cropping
around the mask), with a small random shift of the principal point. Subjects are built once (shape, clothing,
texture, motion: ~3 s each) and rendered from many views (~0.1 s each), everything seeded from
``SampleConfig.seed`` through ``numpy.random.default_rng`` (no global RNG). Samples are generated in memory;
:func:`cached_samples` keeps a generated set in the user cache (safetensors, keyed by the config and the codec) so
that re-running a training does not render again.

Hand-written because it is glue between our synthetic subjects, our rasterizer and our codec.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from avatar.data.synthetic import (
    clothe,
    clothing_offsets,
    make_motion,
    paint_texture,
    render_views,
    sample_phenotype,
    uv_render_mesh,
)
from avatar.geometry.projection import look_at
from avatar.skinning.lbs import lbs_points
from avatar.types import BodyPose, Cameras

__all__ = ["SampleConfig", "SampleSet", "generate_samples", "concat_samples", "save_samples", "load_samples",
           "cached_samples"]


@dataclass(frozen=True)
class SampleConfig:
    """Which synthetic views to render."""

    seed: int = 0
    """Seed of everything (subjects, poses, cameras, noise); training and validation sets use different seeds."""
    num_subjects: int = 10
    """Synthetic subjects (phenotype, clothing, texture, motion)."""
    views_per_subject: int = 36
    """Views rendered per subject (random frame of its motion, random camera)."""
    size: int = 96
    """Side of the square renders in pixels (the network's input size)."""
    texture_size: int = 128
    """Texels per side of each subject's painted texture."""
    motion_frames: int = 30
    """Frames of each subject's "free" motion that views pick from."""
    elevation_degrees: tuple[float, float] = (-15.0, 30.0)
    """Range of the camera elevation above the subject's centre."""
    distance: tuple[float, float] = (1.8, 4.5)
    """Range of the camera distance from the subject's centre, metres."""
    fill: tuple[float, float] = (0.7, 0.95)
    """Range of the fraction of the image side that the subject's larger projected extent fills."""
    center_jitter: float = 0.04
    """Random shift of the principal point, as a fraction of the image side."""
    prior_pose_noise: float = 0.03
    """Standard deviation (radians) of the noise added to every bone rotation of the prior's pose (an imperfect fit)."""
    prior_noise_fraction: float = 0.5
    """Fraction of the views whose prior gets pose noise; the others get the exact pose."""
    shading_fraction: float = 0.8
    """Fraction of the subjects rendered with Lambert shading (random light direction); the others flat."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("num_subjects", "views_per_subject", "size", "texture_size", "motion_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SampleConfig.{name} must be a positive int, got {v!r}")
        if self.size < 16 or self.texture_size < 16:
            raise ValueError(f"SampleConfig.size and texture_size must be >= 16, got {self.size}, {self.texture_size}")
        for name, lo_min, hi_max in (("elevation_degrees", -80.0, 80.0), ("distance", 0.5, 100.0), ("fill", 0.05, 1.0)):
            lo, hi = getattr(self, name)
            if not lo_min <= lo <= hi <= hi_max:
                raise ValueError(f"SampleConfig.{name} must be (low, high) with {lo_min} <= low <= high <= {hi_max}, got {(lo, hi)}")
        for name in ("center_jitter", "prior_pose_noise", "prior_noise_fraction", "shading_fraction"):
            v = float(getattr(self, name))
            if not (v >= 0 and math.isfinite(v)) or (name.endswith("fraction") and v > 1):
                raise ValueError(f"SampleConfig.{name} must be >= 0 (a fraction <= 1 for *_fraction), got {v}")


@dataclass(frozen=True)
class SampleSet:
    """``N`` rendered views (CPU tensors).

    images:       [N, S, S, 3] uint8 RGB.
    masks:        [N, S, S] bool, pixels covered by the clothed subject (= the targets' coverage).
    prior_mask:   [N, S, S] bool, pixels covered by the posed naked body (the prior).
    prior_depth:  [N, 2, S, S] float32 camera z (metres) of the prior's first / last surface, 0 outside prior_mask.
    prior_codes:  [N, S, S, 6] float16 the body's skinning codes at the prior's first (0:3) / last (3:6) surface.
    target_depth: [N, 2, S, S] float32 camera z of the clothed subject's first / last surface, 0 outside masks.
    target_codes: [N, S, S, 6] float16 skinning codes at the clothed subject's first / last surface.
    viewmats:     [N, 4, 4] float32 world-to-camera; Ks: [N, 3, 3] float32 pixel intrinsics.
    subject:      [N] int64 index of the subject within its set.
    """

    images: Tensor
    masks: Tensor
    prior_mask: Tensor
    prior_depth: Tensor
    prior_codes: Tensor
    target_depth: Tensor
    target_codes: Tensor
    viewmats: Tensor
    Ks: Tensor
    subject: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, index: Tensor | slice) -> "SampleSet":
        """The samples at ``index`` (a slice or an int64 index tensor)."""
        return SampleSet(*(getattr(self, f)[index] for f in _FIELDS))


_FIELDS = ("images", "masks", "prior_mask", "prior_depth", "prior_codes", "target_depth", "target_codes", "viewmats",
           "Ks", "subject")


def concat_samples(sets: list[SampleSet]) -> SampleSet:
    """Concatenate sample sets along N."""
    if not sets:
        raise ValueError("concat_samples: need at least one SampleSet")
    return SampleSet(*(torch.cat([getattr(s, f) for s in sets]) for f in _FIELDS))


def _camera(center: Tensor, verts: Tensor, rng: np.random.Generator, cfg: SampleConfig) -> tuple[Tensor, Tensor]:
    """A random camera looking at ``center [3]`` (z up) that frames ``verts [V, 3]``: ``(viewmat [4, 4], K [3, 3])``."""
    az = rng.uniform(0, 2 * math.pi)
    el = math.radians(rng.uniform(*cfg.elevation_degrees))
    dist = rng.uniform(*cfg.distance)
    c = center.to(torch.float64)
    eye = c + dist * torch.tensor([math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)], dtype=torch.float64)
    view = look_at(eye, c, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    cam = verts.to(torch.float64) @ view[:3, :3].T + view[:3, 3]  # [V, 3]
    xy = cam[:, :2] / cam[:, 2:3]  # normalized image coordinates
    S = cfg.size
    jitter = rng.uniform(-cfg.center_jitter, cfg.center_jitter, size=2) * S
    extent = float(xy.abs().max())
    f = rng.uniform(*cfg.fill) * (S / 2 - np.abs(jitter).max()) / extent
    K = torch.tensor([[f, 0.0, S / 2 + jitter[0]], [0.0, f, S / 2 + jitter[1]], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return view.to(torch.float32), K.to(torch.float32)


def generate_samples(body, codec, cfg: SampleConfig, log: bool = False) -> SampleSet:
    """Render ``cfg.num_subjects * cfg.views_per_subject`` samples (see the module docstring) with ``body`` (anny)
    and the skinning ``codec``; a pure function of ``cfg`` (and of the body and codec)."""
    from avatar.predict.views import render_depth_layers

    if not isinstance(cfg, SampleConfig):
        raise TypeError(f"generate_samples: cfg must be a SampleConfig, got {type(cfg).__name__}")
    cfg.validate()
    if getattr(body, "name", None) != "anny":
        raise ValueError(f"generate_samples: synthetic subjects use the anny body model, got {getattr(body, 'name', body)!r}")
    if getattr(codec, "num_bones", None) != body.num_bones:
        raise ValueError(f"generate_samples: the codec has {getattr(codec, 'num_bones', None)} bones, the body {body.num_bones}")
    S = cfg.size
    out: dict[str, list[Tensor]] = {f: [] for f in _FIELDS}
    start = time.perf_counter()
    with torch.no_grad():
        faces = body.faces
        weights, indices = body.skin_weights.float(), body.skin_indices
        codes_v = codec.encode(body.dense_skin_weights().float()).float()  # [V, 3]
        rm = uv_render_mesh(body.faces, body.face_uvs)
        uvs = body.uvs.float()
        for i in range(cfg.num_subjects):
            sub_seed = int(np.random.default_rng([cfg.seed, i, 7]).integers(0, 2**31 - 1))
            rng = np.random.default_rng([cfg.seed, i, 11])
            kind = "shirt_trousers" if rng.uniform() < 0.6 else "shirt_skirt"
            shape = sample_phenotype(sub_seed, body.shape_dim).to(body.dtype)
            rest = body.rest(shape)
            rest_v = rest.vertices[0].float()  # [V, 3]
            offsets = clothing_offsets(body, rest_v, rest.bone_heads[0], kind, sub_seed)
            canonical = clothe(rest_v, faces, offsets)
            texture = paint_texture(body, rest_v, rest.bone_heads[0], offsets, kind, sub_seed, cfg.texture_size)
            motion = make_motion(body, rest.bone_heads[0], "free", cfg.motion_frames, sub_seed)
            transforms, _ = body.bone_transforms(motion, shape)  # [N, J, 4, 4]
            transforms = transforms.float()
            shading = bool(rng.uniform() < cfg.shading_fraction)
            light = tuple(float(x) for x in (rng.normal(), -abs(rng.normal()) - 0.5, rng.uniform(0.2, 1.2)))
            for _ in range(cfg.views_per_subject):
                frame = int(rng.integers(cfg.motion_frames))
                T = transforms[frame]
                clothed = lbs_points(canonical, weights, T, indices)  # [V, 3]
                if cfg.prior_pose_noise > 0 and rng.uniform() < cfg.prior_noise_fraction:
                    noise = torch.from_numpy(rng.normal(0.0, cfg.prior_pose_noise, size=motion.rotations.shape[1:]))
                    pose = BodyPose((motion.rotations[frame] + noise.to(motion.rotations.dtype))[None],
                                    motion.translation[frame][None])
                    T_prior = body.bone_transforms(pose, shape)[0][0].float()
                else:
                    T_prior = T
                naked = lbs_points(rest_v, weights, T_prior, indices)
                lo, hi = clothed.min(0).values, clothed.max(0).values
                view, K = _camera((lo + hi) / 2, clothed, rng, cfg)
                cams = Cameras(view[None], K[None], S, S)
                bg = tuple(float(x) for x in rng.uniform(0, 1, size=3))
                image, _ = render_views(clothed, faces, rm, uvs, texture, cams, shading, bg, light)
                prior = render_depth_layers(naked, faces, view, K, S, S, vertex_attrs=codes_v)
                target = render_depth_layers(clothed, faces, view, K, S, S, vertex_attrs=codes_v)
                out["images"].append((image[0] * 255).round().to(torch.uint8))
                out["masks"].append(target.mask.bool())
                out["prior_mask"].append(prior.mask.bool())
                out["prior_depth"].append(torch.stack([prior.depth_front, prior.depth_back]).float())
                out["prior_codes"].append(torch.cat([prior.attrs_front, prior.attrs_back], -1).to(torch.float16))
                out["target_depth"].append(torch.stack([target.depth_front, target.depth_back]).float())
                out["target_codes"].append(torch.cat([target.attrs_front, target.attrs_back], -1).to(torch.float16))
                out["viewmats"].append(view)
                out["Ks"].append(K)
                out["subject"].append(torch.tensor(i))
            if log:
                done = (i + 1) * cfg.views_per_subject
                print(f"[samples seed={cfg.seed}] subject {i + 1}/{cfg.num_subjects}  {done} views  "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    return SampleSet(*(torch.stack(out[f]) for f in _FIELDS))


def save_samples(path, samples: SampleSet) -> None:
    """Write ``samples`` to one safetensors file atomically (a cache of generated samples, not a shipped file)."""
    from safetensors.torch import save

    from avatar.io import atomic_write_bytes

    atomic_write_bytes(path, save({f: getattr(samples, f).contiguous() for f in _FIELDS}, metadata={"format": "avatar-predictor-samples"}))


def load_samples(path) -> SampleSet:
    """Read a file written by :func:`save_samples`; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"load_samples: {path} is not a readable safetensors file: {err}") from None
    missing = [f for f in _FIELDS if f not in tensors]
    if missing:
        raise ValueError(f"load_samples: {path} lacks the fields {missing}")
    return SampleSet(*(tensors[f] for f in _FIELDS))


def cached_samples(body, codec, cfg: SampleConfig, cache_dir, codec_key: str, log: bool = False) -> SampleSet:
    """:func:`generate_samples`, cached in ``cache_dir`` under a name that hashes ``cfg`` and ``codec_key`` (e.g.
    the codec file's SHA-256): a second call with the same config and codec reads the file instead (seconds)."""
    import dataclasses
    import hashlib
    import json
    from pathlib import Path

    key = hashlib.sha256(json.dumps([dataclasses.asdict(cfg), codec_key, _CACHE_VERSION], sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"samples-{key}.safetensors"
    if path.is_file():
        try:
            return load_samples(path)
        except ValueError:
            path.unlink(missing_ok=True)  # a stale or broken cache entry: regenerate below
    samples = generate_samples(body, codec, cfg, log=log)
    save_samples(path, samples)
    return samples


_CACHE_VERSION = 1  # bump when generate_samples changes what it renders

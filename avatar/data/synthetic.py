"""Synthetic subjects with ground truth: a clothed, textured anny body moving in front of calibrated cameras.

Everything here is a pure function of a :class:`SyntheticConfig` and the body model (no global RNG: every random
draw comes from ``numpy.random.default_rng`` seeded by the config); ``avatar.data.writers`` writes a subject in the
on-disk layouts of ZJU-MoCap and PeopleSnapshot so the same loaders serve real and synthetic data.

Pieces, each a function:

- ``sample_phenotype``: anny's six shape values, in a plausible adult range.
- ``clothing_offsets`` / ``clothe``: garments as per-vertex offsets (metres) along the rest-mesh vertex normals,
  regions chosen by the skinning weights of named bones. Inside a garment the offset varies smoothly between 1 and
  5 cm; outside it is exactly 0 (the garment's edge is a step, like a cuff or a hem). The clothed mesh keeps the
  body's topology and skinning weights, so posing it is plain LBS with the body's bone transforms.
- ``uv_render_mesh`` / ``paint_texture``: anny's UVs have seams, so rendering uses a mesh whose vertices are the
  unique (vertex, uv) corner pairs. The texture is painted in UV space from the canonical 3D position of each texel
  (found by rasterizing the UV layout with the mesh rasterizer), so patterns are continuous across seams.
- ``make_motion``: smooth bone-rotation sequences (``BodyPose`` ``[N, J, 3]``), "turn" and "free".
- ``make_cameras``: the "ring23" and "mono" rigs (OpenCV convention, see ``avatar.geometry``).
- ``render_views`` / ``distort_images`` / ``undistort_images``: textured, optionally Lambert-shaded rendering with
  ``avatar.render.mesh`` and OpenCV (k1, k2, p1, p2, k3) lens distortion of images and masks.
- ``make_subject`` / ``posed_vertices`` / ``render_frame``: the whole subject and its frames (ground truth included).

Texture convention: that of ``avatar.render.mesh.texture_sample`` (u = column, v = row, row 0 at v = 0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor

from avatar.geometry.projection import intrinsics_from_fov, look_at
from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from avatar.render.mesh import interpolate, rasterize, texture_sample, vertex_normals
from avatar.skinning.lbs import lbs_points
from avatar.types import BodyPose, Cameras

__all__ = [
    "SyntheticConfig",
    "RenderMesh",
    "SyntheticSubject",
    "SyntheticFrame",
    "RING23_SIZE",
    "sample_phenotype",
    "garment_masks",
    "clothing_offsets",
    "clothe",
    "uv_render_mesh",
    "paint_texture",
    "make_motion",
    "make_cameras",
    "render_views",
    "distort_images",
    "undistort_images",
    "make_subject",
    "posed_vertices",
    "render_frame",
]

RING23_SIZE = 23
FPS = 25.0  # frames per second of the generated motions (sets the speed of the "free" sinusoids)

# bones whose skinning weights select garment regions (anny bone names)
_SHIRT_BONES = ("spine01", "spine02", "spine03", "spine04", "clavicle.L", "clavicle.R", "shoulder01.L", "shoulder01.R",
                "upperarm01.L", "upperarm01.R", "upperarm02.L", "upperarm02.R", "neck01")
_LOWER_BONES = ("root", "spine05", "pelvis.L", "pelvis.R", "upperleg01.L", "upperleg01.R", "upperleg02.L",
                "upperleg02.R", "lowerleg01.L", "lowerleg01.R", "lowerleg02.L", "lowerleg02.R")
_SKIRT_BONES = ("root", "spine05", "pelvis.L", "pelvis.R", "upperleg01.L", "upperleg01.R", "upperleg02.L",
                "upperleg02.R")
_HEAD_BONES = ("head", "neck02", "neck03")
_EYE_BONES = ("eye.L", "eye.R")
_MIN_OFFSET, _MAX_OFFSET = 0.01, 0.05  # metres


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic subject: body, clothing, texture, motion, cameras and rendering."""

    seed: int = 0
    """Seed of everything random (shape, clothing variation, texture colours and patterns, motion phases)."""
    motion: Literal["turn", "free"] = "turn"
    """"turn": turning 360 degrees in place in an A-pose (PeopleSnapshot-like); "free": arms, legs, spine and a slow
    root turn and drift (ZJU-MoCap-like)."""
    num_frames: int = 100
    """Frames of the sequence."""
    width: int = 512
    """Image width in pixels."""
    height: int = 512
    """Image height in pixels."""
    rig: Literal["ring23", "mono"] = "mono"
    """"ring23": 23 calibrated cameras on a ring around the subject (ZJU-like); "mono": one camera in front."""
    cameras: tuple[int, ...] = (0,)
    """Indices of the rig's cameras to render (camera 0 faces the subject's front)."""
    camera_distance: float = 3.0
    """Distance of the cameras from the subject's centre, metres."""
    fov_y_degrees: float = 40.0
    """Vertical field of view of every camera."""
    distortion: tuple[float, float, float, float, float] | None = None
    """OpenCV lens distortion (k1, k2, p1, p2, k3) applied to the rendered images and masks; None = pinhole."""
    shading: bool = True
    """Lambert shading with a fixed world light (ambient 0.35 + 0.65 max(0, n.l)); False = flat albedo."""
    clothing: Literal["shirt_trousers", "shirt_skirt"] = "shirt_trousers"
    """Garments: a shirt with half sleeves, and trousers or a skirt."""
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Background colour, RGB in [0, 1]."""
    texture_size: int = 1024
    """Width and height of the painted texture in texels."""

    def validate(self, num_rig_cameras: int | None = None) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if self.motion not in ("turn", "free"):
            raise ValueError(f"SyntheticConfig.motion must be 'turn' or 'free', got {self.motion!r}")
        if self.rig not in ("ring23", "mono"):
            raise ValueError(f"SyntheticConfig.rig must be 'ring23' or 'mono', got {self.rig!r}")
        if self.clothing not in ("shirt_trousers", "shirt_skirt"):
            raise ValueError(f"SyntheticConfig.clothing must be 'shirt_trousers' or 'shirt_skirt', got {self.clothing!r}")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"SyntheticConfig.num_frames must be a positive int, got {self.num_frames!r}")
        for name in ("width", "height"):
            n = getattr(self, name)
            if not isinstance(n, int) or n < 8:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 8, got {n!r}")
        if not isinstance(self.texture_size, int) or self.texture_size < 16:
            raise ValueError(f"SyntheticConfig.texture_size must be an int >= 16, got {self.texture_size!r}")
        if not self.camera_distance > 0.5:
            raise ValueError(f"SyntheticConfig.camera_distance must be > 0.5 m, got {self.camera_distance}")
        if not 1.0 < self.fov_y_degrees < 170.0:
            raise ValueError(f"SyntheticConfig.fov_y_degrees must be in (1, 170), got {self.fov_y_degrees}")
        total = num_rig_cameras if num_rig_cameras is not None else (RING23_SIZE if self.rig == "ring23" else 1)
        if len(self.cameras) == 0:
            raise ValueError("SyntheticConfig.cameras must name at least one camera")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"SyntheticConfig.cameras has duplicates: {self.cameras}")
        bad = [c for c in self.cameras if not isinstance(c, int) or not 0 <= c < total]
        if bad:
            raise ValueError(f"SyntheticConfig.cameras must lie in [0, {total}) for rig {self.rig!r}, got {bad}")
        if self.distortion is not None:
            if len(self.distortion) != 5 or not all(math.isfinite(float(d)) for d in self.distortion):
                raise ValueError(f"SyntheticConfig.distortion must be 5 finite floats (k1, k2, p1, p2, k3), got {self.distortion!r}")
        if len(self.background) != 3 or not all(0.0 <= float(b) <= 1.0 for b in self.background):
            raise ValueError(f"SyntheticConfig.background must be 3 floats in [0, 1], got {self.background!r}")


@dataclass(frozen=True)
class RenderMesh:
    """The body mesh split at UV seams: one render vertex per unique (vertex, uv) corner pair.

    vertex_index: [R] int64 body vertex of each render vertex.
    uv_index:     [R] int64 row of ``uvs`` of each render vertex.
    faces:        [F, 3] int64 faces over render vertices (same order as the body's faces).
    """

    vertex_index: Tensor
    uv_index: Tensor
    faces: Tensor


@dataclass(frozen=True)
class SyntheticSubject:
    """A generated subject and its ground truth (all tensors float32 on the body's device).

    config:              the resolved config.
    shape:               [S] anny phenotype.
    root_head:           [3] rest head of the root bone for ``shape`` (what EasyMocap ``Rh``/``Th`` pivot about).
    offsets:             [V] clothing offsets along the rest normals, metres (0 = skin).
    canonical_vertices:  [V, 3] clothed canonical (rest-pose) mesh; faces are the body's ``faces [F, 3]``.
    faces:               [F, 3] int64.
    texture:             [T, T, 3] albedo in [0, 1].
    uvs:                 [U, 2] the body's texture coordinates.
    render_mesh:         the seam-split mesh used for rendering.
    cameras:             ``Cameras`` [C] of the rendered cameras (distortion not included).
    camera_ids:          rig index of each rendered camera.
    distortion:          [5] (k1, k2, p1, p2, k3) or None.
    motion:              ``BodyPose`` [N, J, 3] / [N, 3].
    bone_transforms:     [N, J, 4, 4] canonical -> posed transforms of every frame.
    """

    config: SyntheticConfig
    shape: Tensor
    root_head: Tensor
    offsets: Tensor
    canonical_vertices: Tensor
    faces: Tensor
    texture: Tensor
    uvs: Tensor
    render_mesh: RenderMesh
    cameras: Cameras
    camera_ids: tuple[int, ...]
    distortion: Tensor | None
    motion: BodyPose
    bone_transforms: Tensor

    @property
    def num_frames(self) -> int:
        return int(self.motion.rotations.shape[0])


@dataclass(frozen=True)
class SyntheticFrame:
    """One rendered frame: images [C, H, W, 3] float32 in [0, 1] (distorted if configured), masks [C, H, W]
    float32 in {0, 1} (coverage, distorted like the images), vertices [V, 3] posed clothed ground truth (world)."""

    images: Tensor
    masks: Tensor
    vertices: Tensor


# ----------------------------------------------------------------------------------------------------------------
# body shape


def sample_phenotype(seed: int, shape_dim: int = 6) -> Tensor:
    """anny phenotype ``[6]`` (gender, age, muscle, weight, height, proportions) for ``seed``: gender anywhere in
    [0, 1], the others in a plausible adult range around the average 0.5."""
    if shape_dim != 6:
        raise ValueError(f"sample_phenotype: anny has 6 phenotype values, got shape_dim={shape_dim}")
    rng = np.random.default_rng([seed, 1])
    low = np.array([0.0, 0.45, 0.3, 0.3, 0.3, 0.3])
    high = np.array([1.0, 0.7, 0.7, 0.7, 0.7, 0.7])
    return torch.from_numpy(rng.uniform(low, high)).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# clothing


def _bone_weight(body, names: tuple[str, ...]) -> Tensor:
    """Summed skinning weight ``[V]`` of the named bones."""
    dense = body.dense_skin_weights()  # [V, J]
    return dense[:, [body.bone_index(n) for n in names]].sum(-1)


def _smooth_field(points: Tensor, rng: np.random.Generator, wavelengths: tuple[float, float], count: int = 6) -> Tensor:
    """Sum of ``count`` random plane waves of ``points [N, 3]`` with wavelengths in metres, scaled to [-1, 1]."""
    dirs = rng.normal(size=(count, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelengths, size=count)
    phase = rng.uniform(0, 2 * np.pi, size=count)
    d = torch.as_tensor(dirs * k[:, None], dtype=points.dtype, device=points.device)  # [count, 3]
    ph = torch.as_tensor(phase, dtype=points.dtype, device=points.device)
    return torch.sin(points @ d.T + ph).mean(-1) * math.sqrt(2.0)  # [N], roughly in [-1, 1]


def garment_masks(body, kind: str) -> tuple[Tensor, Tensor]:
    """``(shirt [V] bool, lower [V] bool)``: the vertices of the shirt and of the trousers / skirt region (before
    the skirt's hem cut). A vertex belongs to the garment whose bones carry most of its weight, if that is > 0.5."""
    if kind not in ("shirt_trousers", "shirt_skirt"):
        raise ValueError(f"garment_masks: kind must be 'shirt_trousers' or 'shirt_skirt', got {kind!r}")
    w_shirt = _bone_weight(body, _SHIRT_BONES)
    w_lower = _bone_weight(body, _LOWER_BONES if kind == "shirt_trousers" else _SKIRT_BONES)
    shirt = (w_shirt > 0.5) & (w_shirt >= w_lower)
    lower = (w_lower > 0.5) & ~shirt
    return shirt, lower


def clothing_offsets(body, rest_vertices: Tensor, rest_heads: Tensor, kind: str, seed: int) -> Tensor:
    """Per-vertex clothing offsets ``[V]`` (metres, along the rest normals) for ``rest_vertices [V, 3]``.

    Inside a garment the offset is a smooth field in [1, 5] cm (low-frequency plane waves of the rest position, seeded);
    a skirt grows from ~1 cm at the waist to ~5 cm at its hem (above the knees) and leaves the lower legs bare; skin
    (head, neck, hands, feet, forearms, lower legs under a skirt) stays at exactly 0.
    """
    if rest_vertices.ndim != 2 or rest_vertices.shape != (body.num_vertices, 3):
        raise ValueError(f"clothing_offsets: rest_vertices must be [{body.num_vertices}, 3], got {tuple(rest_vertices.shape)}")
    shirt, lower = garment_masks(body, kind)
    rng = np.random.default_rng([seed, 2])
    p = rest_vertices.to(torch.float32)
    z = p[:, 2]
    offsets = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    # shirt: 1.5-3.5 cm, looser towards its bottom hem
    n_shirt = _smooth_field(p, rng, (0.25, 0.6))
    z_top, z_bot = z[shirt].max(), z[shirt].min()
    loose = ((z_top - z) / (z_top - z_bot).clamp(min=1e-6)).clamp(0, 1)
    offsets = torch.where(shirt, 0.02 + 0.006 * n_shirt + 0.01 * loose**2, offsets)
    n_lower = _smooth_field(p, rng, (0.2, 0.5))
    if kind == "shirt_trousers":
        offsets = torch.where(lower, 0.018 + 0.006 * n_lower, offsets)
    else:
        heads = rest_heads.to(p.dtype)
        z_knee = heads[[body.bone_index("lowerleg01.L"), body.bone_index("lowerleg01.R")], 2].mean()
        z_waist = z[lower].max()
        z_hem = z_knee + 0.12 + 0.04 * float(rng.uniform())
        skirt = lower & (z >= z_hem)
        t = ((z_waist - z) / (z_waist - z_hem)).clamp(0, 1)
        offsets = torch.where(skirt, 0.012 + 0.036 * t**1.5 + 0.002 * n_lower, offsets)
    return torch.where(offsets != 0, offsets.clamp(_MIN_OFFSET, _MAX_OFFSET), offsets)


def clothe(rest_vertices: Tensor, faces: Tensor, offsets: Tensor) -> Tensor:
    """Clothed canonical vertices ``[V, 3]``: ``rest_vertices [V, 3]`` moved by ``offsets [V]`` along their
    area-weighted normals (``faces [F, 3]``)."""
    if offsets.shape != rest_vertices.shape[:1]:
        raise ValueError(f"clothe: offsets must be [{rest_vertices.shape[0]}], got {tuple(offsets.shape)}")
    return rest_vertices + offsets[:, None] * vertex_normals(rest_vertices, faces)


# ----------------------------------------------------------------------------------------------------------------
# texture


def uv_render_mesh(faces: Tensor, face_uvs: Tensor) -> RenderMesh:
    """Split the mesh at UV seams: render vertices are the unique (vertex, uv) pairs of the face corners."""
    if faces.shape != face_uvs.shape or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"uv_render_mesh: faces and face_uvs must both be [F, 3], got {tuple(faces.shape)} and {tuple(face_uvs.shape)}")
    pairs = torch.stack([faces.reshape(-1), face_uvs.reshape(-1)], -1).to(torch.int64)  # [3F, 2]
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    return RenderMesh(vertex_index=unique[:, 0], uv_index=unique[:, 1], faces=inverse.reshape(-1, 3))


def _palette(rng: np.random.Generator) -> dict[str, np.ndarray]:
    skins = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.58], [0.78, 0.57, 0.44], [0.62, 0.43, 0.30], [0.45, 0.30, 0.20]])
    hairs = np.array([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.55, 0.38, 0.20], [0.80, 0.65, 0.40], [0.45, 0.12, 0.05]])
    hsv_to_rgb = lambda h, s, v: np.array([v * (1 - s * max(0, min(1, abs((h * 6 + k) % 6 - 3) - 1))) for k in (0, 4, 2)])
    h1 = rng.uniform()
    return {
        "skin": skins[rng.integers(len(skins))] * rng.uniform(0.95, 1.05),
        "hair": hairs[rng.integers(len(hairs))],
        "shirt_a": hsv_to_rgb(h1, rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.95)),
        "shirt_b": hsv_to_rgb((h1 + rng.uniform(0.3, 0.7)) % 1, rng.uniform(0.1, 0.5), rng.uniform(0.85, 1.0)),
        "print": hsv_to_rgb(rng.uniform(), 0.9, 0.9),
        "lower_a": hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.5)),
        "lower_b": hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.8), rng.uniform(0.6, 0.9)),
    }


def paint_texture(body, rest_vertices: Tensor, rest_heads: Tensor, offsets: Tensor, kind: str, seed: int, size: int = 1024) -> Tensor:
    """Procedural albedo ``[size, size, 3]`` in [0, 1] painted in anny's UV space (deterministic for ``seed``).

    Each texel is coloured from the canonical 3D position and garment labels of the surface point it maps to
    (rasterizing the UV layout finds them), so patterns continue across UV seams: skin with fine noise, hair on the
    head, eyes, a striped shirt with a chest print, trousers with a fine twill, or a plaid skirt. Texels no triangle
    covers take the colour of their covered neighbours (a few dilation steps) so bilinear sampling at seams is clean.
    """
    if body.uvs is None or body.face_uvs is None:
        raise ValueError(f"paint_texture: body model {body.name!r} has no UVs")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"paint_texture: size must be an int >= 16, got {size!r}")
    rng = np.random.default_rng([seed, 3])
    pal = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in _palette(rng).items()}
    shirt, lower = garment_masks(body, kind)
    lower = lower & (offsets > 0)
    head = _bone_weight(body, _HEAD_BONES) > 0.5
    eyes = _bone_weight(body, _EYE_BONES) > 0.5
    p = rest_vertices.to(torch.float32)
    heads = rest_heads.to(torch.float32)
    eye_c = heads[[body.bone_index("eye.L"), body.bone_index("eye.R")]].mean(0)  # [3]
    hair = head & ~eyes & ((p[:, 2] > eye_c[2] + 0.035) | ((p[:, 1] > eye_c[1] + 0.1) & (p[:, 2] > eye_c[2] - 0.09)))
    # per-vertex attributes -> per-texel by rasterizing the UV layout (z = 1, identity camera)
    rm = uv_render_mesh(body.faces, body.face_uvs)
    attrs = torch.cat([p, torch.stack([shirt, lower, hair, eyes], -1).to(torch.float32)], -1)[rm.vertex_index]  # [R, 7]
    uv = body.uvs.to(torch.float32)[rm.uv_index]  # [R, 2]
    flat = torch.cat([uv * size, torch.ones_like(uv[:, :1])], -1)
    eye4 = torch.eye(4)[None]
    K = torch.eye(3)[None]
    frags = rasterize(flat, rm.faces, eye4, K, size, size)
    covered = frags.mask[0]  # [T, T]
    a = interpolate(attrs, frags, rm.faces)[0]  # [T, T, 7]
    x, y, z = a[..., 0], a[..., 1], a[..., 2]
    is_shirt, is_lower, is_hair, is_eye = (a[..., 3:7] > 0.5).unbind(-1)
    N = a.shape[0] * a.shape[1]
    pts = a[..., :3].reshape(N, 3)
    fine = _smooth_field(pts, rng, (0.004, 0.012), count=8).reshape(a.shape[:2])  # [T, T] high-frequency noise
    mid = _smooth_field(pts, rng, (0.03, 0.08), count=6).reshape(a.shape[:2])
    colour = pal["skin"] * (1 + 0.06 * fine + 0.04 * mid)[..., None]
    strands = 0.5 + 0.5 * torch.sin(2 * math.pi * (x * 180 + 20 * mid * 0.01) + 3 * fine)
    colour = torch.where(is_hair[..., None], pal["hair"] * (0.7 + 0.5 * strands)[..., None], colour)
    pupil = ((x - torch.sign(x) * (eye_c[0].abs())).square() + (z - eye_c[2]).square()).sqrt() < 0.006
    colour = torch.where(is_eye[..., None], torch.where(pupil[..., None], torch.tensor([0.1, 0.07, 0.05]), torch.tensor([0.92, 0.92, 0.9])), colour)
    # shirt: stripes along z (period 2-4 cm) with a fine weave, a ringed print on the chest front, a pocket mark on the left
    period = float(rng.uniform(0.02, 0.04))
    stripe = torch.sin(2 * math.pi * z / period) > 0.2
    shirt_col = torch.where(stripe[..., None], pal["shirt_a"], pal["shirt_b"]) * (1 + 0.05 * fine)[..., None]
    chest_z = eye_c[2] - float(rng.uniform(0.22, 0.28))
    r = ((x - 0.0).square() + (z - chest_z).square()).sqrt()
    ring = (torch.sin(2 * math.pi * r / 0.015) > 0) & (r < 0.07) & (y < 0)
    shirt_col = torch.where(ring[..., None], pal["print"], shirt_col)
    pocket = (x > 0.05) & (x < 0.11) & ((z - chest_z).abs() < 0.03) & (y < 0)
    shirt_col = torch.where(pocket[..., None], pal["shirt_a"] * 0.5, shirt_col)
    colour = torch.where(is_shirt[..., None], shirt_col, colour)
    if kind == "shirt_trousers":
        twill = 0.5 + 0.5 * torch.sin(2 * math.pi * (x + y + z) / 0.006)
        lower_col = pal["lower_a"] * (0.85 + 0.25 * twill + 0.05 * fine)[..., None]
    else:
        plaid = (torch.sin(2 * math.pi * x / 0.05) > 0.5) | (torch.sin(2 * math.pi * z / 0.05) > 0.5)
        thin = (torch.sin(2 * math.pi * (x + z) / 0.012) > 0.85)
        lower_col = torch.where((plaid | thin)[..., None], pal["lower_b"], pal["lower_a"]) * (1 + 0.05 * fine)[..., None]
    colour = torch.where(is_lower[..., None], lower_col, colour)
    colour = colour.clamp(0, 1) * covered[..., None]
    # dilate into uncovered texels
    tex = colour.permute(2, 0, 1)[None]  # [1, 3, T, T]
    m = covered.to(torch.float32)[None, None]
    kernel = torch.ones(1, 1, 3, 3)
    for _ in range(4):
        s = F_.conv2d(tex, kernel.expand(3, 1, 3, 3), padding=1, groups=3)
        n = F_.conv2d(m, kernel, padding=1)
        fill = (m == 0) & (n > 0)
        tex = torch.where(fill, s / n.clamp(min=1), tex)
        m = torch.where(fill, torch.ones_like(m), m)
    return tex[0].permute(1, 2, 0).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# motion


def _axis(d: Tensor, towards: Tensor) -> Tensor:
    """Unit axis ``[3]`` about which a positive rotation moves direction ``d`` towards ``towards``."""
    a = torch.linalg.cross(d, towards)
    return a / a.norm().clamp(min=1e-8)


def make_motion(body, rest_heads: Tensor, motion: str, num_frames: int, seed: int) -> BodyPose:
    """Smooth bone-rotation sequence: ``BodyPose`` with rotations ``[N, J, 3]`` and translation ``[N, 3]``.

    ``rest_heads [J, 3]`` are the rest bone heads of the subject (elbow and shoulder axes follow the rest bones).
    anny's rest pose already holds the arms about 45 degrees below horizontal (an A-pose) and faces -y, z up.

    "turn": the A-pose (arms 5 degrees lower still) with a slight arm sway, the root turning 360 degrees about the
    vertical axis over the sequence (frame i at ``2 pi i / N``), no translation.
    "free": sinusoids (seeded phases, periods 1.5-3 s at 25 fps) on hips, knees, shoulders, elbows and the spine,
    a slow root yaw of up to 40 degrees and a drift of up to 15 cm in the ground plane.
    """
    if motion not in ("turn", "free"):
        raise ValueError(f"make_motion: motion must be 'turn' or 'free', got {motion!r}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"make_motion: num_frames must be a positive int, got {num_frames!r}")
    rng = np.random.default_rng([seed, 4])
    J = body.num_bones
    heads = rest_heads.to(torch.float32).cpu()
    i = torch.arange(num_frames, dtype=torch.float64)
    t = i / FPS
    up = torch.tensor([0.0, 0.0, 1.0])
    front = torch.tensor([0.0, -1.0, 0.0])
    back = -front
    rot = torch.zeros(num_frames, J, 3, dtype=torch.float64)
    trans = torch.zeros(num_frames, 3, dtype=torch.float64)

    def bone_dir(name: str, child: str) -> Tensor:
        d = heads[body.bone_index(child)] - heads[body.bone_index(name)]
        return d / d.norm()

    def wave(period_range=(1.5, 3.0)) -> Tensor:
        period = rng.uniform(*period_range)
        return torch.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi))

    def add(name: str, axis: Tensor, angle: Tensor) -> None:
        rot[:, body.bone_index(name)] += angle[:, None] * axis.to(torch.float64)[None]

    if motion == "turn":
        sway = wave((3.0, 5.0))
        for side, sign in (("L", 1.0), ("R", -1.0)):
            d = bone_dir(f"upperarm01.{side}", f"lowerarm01.{side}")
            add(f"upperarm01.{side}", _axis(d, -up), torch.full_like(t, math.radians(5.0)) + 0.03 * sway)
        rot[:, 0] = (2 * math.pi * i / num_frames)[:, None] * up.to(torch.float64)
    else:
        for side in ("L", "R"):
            leg = bone_dir(f"upperleg01.{side}", f"lowerleg01.{side}")
            add(f"upperleg01.{side}", _axis(leg, front), 0.1 + 0.4 * wave())
            add(f"lowerleg01.{side}", _axis(bone_dir(f"lowerleg01.{side}", f"foot.{side}"), back), 0.45 + 0.45 * wave())
            arm = bone_dir(f"upperarm01.{side}", f"lowerarm01.{side}")
            add(f"upperarm01.{side}", _axis(arm, front), 0.5 * wave())
            add(f"upperarm01.{side}", _axis(arm, up), 0.25 + 0.35 * wave())
            fore = bone_dir(f"lowerarm01.{side}", f"wrist.{side}")
            add(f"lowerarm01.{side}", _axis(fore, front), 0.7 + 0.6 * wave())
        add("spine03", up, 0.25 * wave((2.0, 4.0)))
        add("spine03", torch.tensor([1.0, 0.0, 0.0]), 0.1 * wave((2.0, 4.0)))
        rot[:, 0] = (math.radians(40.0) * wave((6.0, 10.0)))[:, None] * up.to(torch.float64)
        trans[:, 0] = 0.15 * wave((6.0, 10.0))
        trans[:, 1] = 0.15 * wave((6.0, 10.0))
    # sums of axis-angles per bone are exact here: each bone's terms share no axis except where noted, and the
    # result is a valid axis-angle either way (smooth in time); normalize through matrices for bones with two terms
    R = axis_angle_to_matrix(rot[:, 1:])
    rot[:, 1:] = matrix_to_axis_angle(R)
    return BodyPose(rot.to(torch.float32), trans.to(torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# cameras


def make_cameras(rig: str, width: int, height: int, center: Tensor, distance: float = 3.0, fov_y_degrees: float = 40.0) -> Cameras:
    """The full rig looking at ``center [3]`` (z up; the subject faces -y): ``Cameras`` with viewmats ``[C, 4, 4]``
    and Ks ``[C, 3, 3]``. "ring23": 23 cameras evenly spaced on a horizontal ring of radius ``distance``, heights
    alternating by +-10 cm, camera 0 in front of the subject; "mono": camera 0 of the ring alone."""
    if rig not in ("ring23", "mono"):
        raise ValueError(f"make_cameras: rig must be 'ring23' or 'mono', got {rig!r}")
    n = RING23_SIZE if rig == "ring23" else 1
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / RING23_SIZE
    dz = torch.where(torch.arange(n) % 2 == 0, 0.1, -0.1).to(torch.float64) * (n > 1)
    c = center.to(torch.float64).cpu()
    eye = torch.stack([c[0] + distance * torch.sin(angle), c[1] - distance * torch.cos(angle), c[2] + dz], -1)
    view = look_at(eye, c.expand(n, 3), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    K = intrinsics_from_fov(fov_y_degrees, width, height, dtype=torch.float64).expand(n, 3, 3)
    return Cameras(view.to(torch.float32).to(center.device), K.to(torch.float32).to(center.device).contiguous(), width, height)


# ----------------------------------------------------------------------------------------------------------------
# rendering


def render_views(
    vertices: Tensor,  # [V, 3] posed clothed vertices, world
    faces: Tensor,  # [F, 3] body faces (for normals)
    render_mesh: RenderMesh,
    uvs: Tensor,  # [U, 2]
    texture: Tensor,  # [T, T, 3]
    cameras: Cameras,  # [C]
    shading: bool = True,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    light: tuple[float, float, float] = (0.3, -1.0, 0.8),
) -> tuple[Tensor, Tensor]:
    """Textured render of one posed mesh from C cameras -> ``(images [C, H, W, 3] in [0, 1], masks [C, H, W] {0, 1})``.

    Shading (optional) is Lambert with a fixed world light direction ``light`` (towards the light), the same in
    every view: ``albedo * (0.35 + 0.65 max(0, n . l))`` with normals from the unsplit mesh (no seam creases)."""
    verts = vertices[render_mesh.vertex_index]  # [R, 3]
    frags = rasterize(verts, render_mesh.faces, cameras.viewmats, cameras.Ks, cameras.width, cameras.height)
    mask = frags.mask  # [C, H, W]
    uv = interpolate(uvs.to(verts.dtype)[render_mesh.uv_index], frags, render_mesh.faces)  # [C, H, W, 2]
    rgb = texture_sample(texture.to(verts.dtype), uv, mask)
    if shading:
        n = vertex_normals(vertices, faces)[render_mesh.vertex_index]
        n = interpolate(n, frags, render_mesh.faces)
        n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        l = verts.new_tensor(light)
        l = l / l.norm()
        rgb = rgb * (0.35 + 0.65 * (n @ l).clamp(min=0.0))[..., None]
    bg = verts.new_tensor(background)
    image = torch.where(mask[..., None], rgb, bg).clamp(0.0, 1.0)
    return image, mask.to(verts.dtype)


def _remap(images: Tensor, coords: Tensor) -> Tensor:
    """Sample ``images [C, H, W, Ch]`` bilinearly at pixel coordinates ``coords [C, H, W, 2]`` (centres at +0.5);
    outside -> 0."""
    C, H, W, _ = images.shape
    grid = torch.stack([coords[..., 0] / W * 2 - 1, coords[..., 1] / H * 2 - 1], -1)
    out = F_.grid_sample(images.permute(0, 3, 1, 2), grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _pixel_centres(C: int, H: int, W: int, dtype) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    return torch.stack([xx + 0.5, yy + 0.5], -1).reshape(1, H * W, 2).expand(C, -1, -1)


def _check_distortion(name: str, images: Tensor, Ks: Tensor, dist: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"{name}: images must be [C, H, W, Ch], got {tuple(images.shape)}")
    if Ks.shape != (images.shape[0], 3, 3):
        raise ValueError(f"{name}: Ks must be [C, 3, 3] with C = {images.shape[0]}, got {tuple(Ks.shape)}")
    if dist.shape[-1] != 5:
        raise ValueError(f"{name}: dist must be [5] or [C, 5] (k1, k2, p1, p2, k3), got {tuple(dist.shape)}")


def distort_images(images: Tensor, Ks: Tensor, dist: Tensor, num_iters: int = 20) -> Tensor:
    """Apply OpenCV lens distortion to pinhole ``images [C, H, W, Ch]`` (``Ks [C, 3, 3]``, ``dist [5]`` or
    ``[C, 5]``): each output pixel samples the pinhole image at its undistorted position (kornia's iterative
    ``undistort_points``). Pixels that map outside the input get 0."""
    from kornia.geometry.calibration import undistort_points

    _check_distortion("distort_images", images, Ks, dist)
    C, H, W, _ = images.shape
    pts = _pixel_centres(C, H, W, torch.float64)
    und = undistort_points(pts, Ks.to(torch.float64), dist.to(torch.float64).expand(C, 5), num_iters=num_iters)
    return _remap(images, und.reshape(C, H, W, 2))


def undistort_images(images: Tensor, Ks: Tensor, dist: Tensor) -> Tensor:
    """Remove OpenCV lens distortion from ``images [C, H, W, Ch]``: each pinhole pixel samples the distorted image
    at its distorted position (kornia ``distort_points``, exact). What a loader does with a dataset's ``D``."""
    from kornia.geometry.calibration import distort_points

    _check_distortion("undistort_images", images, Ks, dist)
    C, H, W, _ = images.shape
    pts = _pixel_centres(C, H, W, torch.float64)
    dst = distort_points(pts, Ks.to(torch.float64), dist.to(torch.float64).expand(C, 5))
    return _remap(images, dst.reshape(C, H, W, 2))


# ----------------------------------------------------------------------------------------------------------------
# the subject


def make_subject(cfg: SyntheticConfig, body) -> SyntheticSubject:
    """Build a subject (shape, clothing, texture, motion, cameras, bone transforms of every frame) from ``cfg``."""
    if not isinstance(cfg, SyntheticConfig):
        raise TypeError(f"make_subject: cfg must be a SyntheticConfig, got {type(cfg).__name__}")
    cfg.validate()
    if getattr(body, "name", None) != "anny":
        raise ValueError(f"make_subject: synthetic subjects use the anny body model, got {getattr(body, 'name', body)!r}")
    with torch.no_grad():
        shape = sample_phenotype(cfg.seed, body.shape_dim).to(device=body.device, dtype=body.dtype)
        rest = body.rest(shape)
        rest_v = rest.vertices[0]  # [V, 3]
        offsets = clothing_offsets(body, rest_v, rest.bone_heads[0], cfg.clothing, cfg.seed)
        canonical = clothe(rest_v, body.faces, offsets)
        texture = paint_texture(body, rest_v, rest.bone_heads[0], offsets, cfg.clothing, cfg.seed, cfg.texture_size)
        rm = uv_render_mesh(body.faces, body.face_uvs)
        motion = make_motion(body, rest.bone_heads[0], cfg.motion, cfg.num_frames, cfg.seed)
        motion = BodyPose(motion.rotations.to(body.device), motion.translation.to(body.device))
        transforms, _ = body.bone_transforms(motion, shape)
        lo, hi = canonical.min(0).values, canonical.max(0).values
        rig = make_cameras(cfg.rig, cfg.width, cfg.height, (lo + hi) / 2, cfg.camera_distance, cfg.fov_y_degrees)
        ids = tuple(cfg.cameras)
        cams = Cameras(rig.viewmats[list(ids)], rig.Ks[list(ids)], cfg.width, cfg.height)
        dist = None if cfg.distortion is None else torch.tensor(cfg.distortion, dtype=torch.float32, device=body.device)
    return SyntheticSubject(
        config=cfg, shape=shape, root_head=rest.bone_heads[0, 0], offsets=offsets, canonical_vertices=canonical,
        faces=body.faces, texture=texture, uvs=body.uvs.to(torch.float32), render_mesh=rm, cameras=cams,
        camera_ids=ids, distortion=dist, motion=motion, bone_transforms=transforms,
    )


def posed_vertices(subject: SyntheticSubject, body, frame: int) -> Tensor:
    """Ground-truth posed clothed vertices ``[V, 3]`` of ``frame`` (LBS of the canonical clothed mesh)."""
    if not 0 <= frame < subject.num_frames:
        raise ValueError(f"posed_vertices: frame must be in [0, {subject.num_frames}), got {frame}")
    return lbs_points(subject.canonical_vertices, body.skin_weights, subject.bone_transforms[frame], body.skin_indices)


def render_frame(subject: SyntheticSubject, body, frame: int) -> SyntheticFrame:
    """Render ``frame`` from every configured camera (distorted if configured) with its ground truth."""
    cfg = subject.config
    with torch.no_grad():
        verts = posed_vertices(subject, body, frame)
        images, masks = render_views(verts, subject.faces, subject.render_mesh, subject.uvs, subject.texture,
                                     subject.cameras, cfg.shading, cfg.background)
        if subject.distortion is not None:
            Ks = subject.cameras.Ks
            bg = images.new_tensor(cfg.background)
            both = torch.cat([images - bg, masks[..., None]], -1)  # background-relative so the border fills with bg
            both = distort_images(both, Ks, subject.distortion)
            images = (both[..., :3] + bg).clamp(0, 1)
            masks = (both[..., 3] > 0.5).to(images.dtype)
    return SyntheticFrame(images=images, masks=masks, vertices=verts)


def config_to_dict(cfg: SyntheticConfig) -> dict:
    """The config as plain JSON-able values."""
    return dataclasses.asdict(cfg)

"""Real scans in the THuman2.0 layout as training samples for the depth + skinning-code network.

Layout read by :func:`load_thuman2` (``<id>`` e.g. ``0001``)::

    root/data/<id>/<id>.obj             textured scan (with material0.mtl and material0.jpeg beside it)
    root/smplx/<id>/smplx_param.pkl     SMPL-X fit   (body model "smplx")
    root/smpl/<id>/smpl_param.pkl       SMPL fit     (body model "smpl")
    root/anny/<id>/anny_param.pkl       anny fit     (body model "anny": our own keys, see below)

What we relied on (the THuman2.0 README, github.com/ytrock/THuman2.0-Dataset, and the loaders of ICON /
other public users of the fits): the fit files are pickled dicts of numpy arrays with the smplx forward
arguments ``betas, global_orient, body_pose, left_hand_pose, right_hand_pose, jaw_pose, leye_pose, reye_pose,
expression`` plus ``scale`` and ``translation``; the README says to "first *scale* the generated SMPL-X mesh and then
*translate* it", i.e. ``scan ~ smplx_vertices * scale + translation``, which is what we apply (to the fitted body,
never to the scan). Hand poses may be 45 axis-angle values or PCA coefficients (public users of the SMPL-X fits
load them with 12 PCA components); PCA coefficients are expanded with the model's own hand components (smplx keeps
``num_pca_comps`` of them, 6 by default: fewer than the file has is a clear error) and, like smplx does when
``flat_hand_mean`` is off, the model's hand mean is added. SMPL fits (the gDNA release) carry ``betas,
global_orient, body_pose`` (69 values) and optionally ``transl``, ``scale``, ``translation``. ``expression`` is
read but not used: our SMPL-X wrapper has no expression blend shapes. Missing ``transl`` / ``translation`` mean
zero, a missing ``scale`` means 1. Units: metres (THuman2.0 scans are metric), y up for SMPL/SMPL-X.

anny fits (no public dataset; our own convention, so tests need no licensed model): ``rotations`` ([J, 3] or J*3
axis-angle in :class:`avatar.types.BodyPose` convention), ``phenotype`` ([6] anny shape), optional ``transl``
(the pose translation), ``scale`` and ``translation`` as for SMPL-X.

The .pkl files are read with a restricted unpickler (:class:`NumpyOnlyUnpickler`) that resolves only numpy's array
reconstruction globals, so a crafted file cannot run code. Skinning weights of scan vertices come from the nearest
point of the posed fitted body surface (barycentric blend of the nearest face's vertex weights).

Hand-written because it is glue between one dataset's file layout, our body models and our sample renderer.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.predict.samples import SampleConfig, SampleSet, _FIELDS, _camera, concat_samples
from avatar.io import NumpyOnlyUnpickler
from avatar.types import BodyPose, Cameras

__all__ = [
    "ScanSubject",
    "NumpyOnlyUnpickler",
    "load_fit_params",
    "params_to_pose",
    "load_thuman2",
    "transfer_skin_weights",
    "scan_samples",
    "mix_samples",
]


# restricted unpickling: avatar.io.NumpyOnlyUnpickler (re-exported here)


def load_fit_params(path: str | Path) -> dict[str, np.ndarray]:
    """The fitted body parameters in ``path`` (a pickled dict of numpy arrays), read with
    :class:`NumpyOnlyUnpickler`; values come back as float64 arrays (scalars as 0-d arrays). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fit parameter file")
    try:
        data = NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), source=str(path)).load()
    except pickle.UnpicklingError as err:
        if str(path) in str(err):
            raise ValueError(str(err)) from None
        raise ValueError(f"{path}: not a readable pickle of numpy arrays ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError) as err:
        raise ValueError(f"{path}: not a readable pickle of numpy arrays ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        if isinstance(v, str):
            continue  # e.g. a gender string
        try:
            out[str(k)] = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: value of {k!r} is not numeric ({type(v).__name__})") from None
    return out


# --- parameters -> BodyPose, per body model ------------------------------------------------------------------------


def _get(params: dict, key: str, size: int | None, path, default: float | None = None) -> np.ndarray:
    if key not in params:
        if default is not None:
            return np.full(size or 1, default, dtype=np.float64)
        raise ValueError(f"{path}: missing key {key!r} (keys present: {', '.join(sorted(params))})")
    v = np.asarray(params[key], dtype=np.float64).reshape(-1)
    if size is not None and v.size != size:
        raise ValueError(f"{path}: {key!r} must have {size} values, got {v.size} (shape {np.shape(params[key])})")
    if not np.isfinite(v).all():
        raise ValueError(f"{path}: {key!r} has non-finite values")
    return v


def _betas(params: dict, dim: int, path) -> np.ndarray:
    b = _get(params, "betas", None, path)
    return np.pad(b[:dim], (0, max(0, dim - b.size)))


def _hand(params: dict, key: str, body, side: str, path) -> np.ndarray:
    v = _get(params, key, None, path)
    smpl = body._smpl
    if v.size != 45:  # PCA coefficients
        comps = np.asarray(getattr(smpl, f"np_{side}_hand_components"))
        if v.size > comps.shape[0]:
            raise ValueError(f"{path}: {key!r} has {v.size} PCA coefficients but the SMPL-X model was loaded with "
                             f"{comps.shape[0]} hand components; expected 45 axis-angle values or at most {comps.shape[0]}")
        v = v @ comps[: v.size]
    return v + getattr(smpl, f"{side}_hand_mean").detach().cpu().double().numpy().reshape(-1)


def _pose_smpl(body, params: dict, path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rot = np.concatenate([_get(params, "global_orient", 3, path), _get(params, "body_pose", 69, path)])
    return rot.reshape(24, 3), _get(params, "transl", 3, path, 0.0), _betas(params, body.shape_dim, path)


def _pose_smplx(body, params: dict, path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = [_get(params, "global_orient", 3, path), _get(params, "body_pose", 63, path),
             _get(params, "jaw_pose", 3, path, 0.0), _get(params, "leye_pose", 3, path, 0.0),
             _get(params, "reye_pose", 3, path, 0.0), _hand(params, "left_hand_pose", body, "left", path),
             _hand(params, "right_hand_pose", body, "right", path)]
    return np.concatenate(parts).reshape(55, 3), _get(params, "transl", 3, path, 0.0), _betas(params, body.shape_dim, path)


def _pose_anny(body, params: dict, path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rot = _get(params, "rotations", 3 * body.num_bones, path).reshape(body.num_bones, 3)
    return rot, _get(params, "transl", 3, path, 0.0), _get(params, "phenotype", body.shape_dim, path)


_POSE_MAPPERS = {"smpl": _pose_smpl, "smplx": _pose_smplx, "anny": _pose_anny}


def params_to_pose(body, params: dict, path="<params>") -> tuple[BodyPose, Tensor, float, Tensor]:
    """``(pose [J, 3] / [3], shape [S], scale, translation [3])`` of a fit for ``body`` (see the module docstring for
    the keys each body model reads). The fitted body in the scan's frame is ``body(pose, shape) * scale + translation``."""
    mapper = _POSE_MAPPERS.get(getattr(body, "name", None))
    if mapper is None:
        raise ValueError(f"{path}: no parameter mapping for body model {getattr(body, 'name', body)!r}; "
                         f"known: {', '.join(_POSE_MAPPERS)}")
    rot, transl, shape = mapper(body, params, path)
    scale = float(_get(params, "scale", 1, path, 1.0)[0])
    if not scale > 0:
        raise ValueError(f"{path}: 'scale' must be positive, got {scale}")
    translation = _get(params, "translation", 3, path, 0.0)
    pose = BodyPose(torch.from_numpy(rot).to(body.dtype), torch.from_numpy(transl).to(body.dtype))
    return pose, torch.from_numpy(shape).to(body.dtype), scale, torch.from_numpy(translation).to(body.dtype)


# --- the scan -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanSubject:
    """One scan with its body fit, in the scan's frame (metres).

    vertices:      [V, 3] float32 scan vertices.
    faces:         [F, 3] int64.
    uvs:           [V, 2] float32 per-vertex texture coordinates, glTF convention (v = 0 top row), or None.
    texture:       [Ht, Wt, 3] uint8 texture image, or None (then ``colors`` or no colour).
    colors:        [V, 3] uint8 vertex colours, or None.
    pose:          BodyPose of the fit (rotations [J, 3], translation [3] = the model's own ``transl``).
    shape:         [S] body shape (betas / anny phenotype).
    scale:         the fit's scale; translation: [3] the fit's translation (body_in_scan = body * scale + translation).
    body_vertices: [Vb, 3] float32 posed fitted body in the scan's frame.
    skin_weights:  [V, J] float32 dense skinning weights of the scan vertices (transferred from the body).
    """

    name: str
    vertices: Tensor
    faces: Tensor
    uvs: Tensor | None
    texture: Tensor | None
    colors: Tensor | None
    pose: BodyPose
    shape: Tensor
    scale: float
    translation: Tensor
    body_vertices: Tensor
    skin_weights: Tensor


def fitted_body_vertices(body, pose: BodyPose, shape: Tensor, scale: float, translation: Tensor) -> Tensor:
    """``[Vb, 3]`` the posed body in the scan's frame: ``body(pose, shape) * scale + translation``."""
    with torch.no_grad():
        v = body(pose, shape).vertices[0]
    return (v * scale + translation.to(v.dtype)).float()


def transfer_skin_weights(points: Tensor, body_vertices: Tensor, faces: Tensor, dense_weights: Tensor,
                          candidates: int = 8, chunk: int = 20000) -> Tensor:
    """Skinning weights ``[P, J]`` of ``points [P, 3]`` from the nearest point of the body surface
    (``body_vertices [Vb, 3]``, ``faces [F, 3]``, ``dense_weights [Vb, J]``): among the ``candidates`` faces with the
    nearest centroids and the faces around the nearest body vertex, the face whose closest point is nearest; its
    vertex weights blended barycentrically."""
    import trimesh.triangles as tt
    from scipy.spatial import cKDTree

    bv = body_vertices.detach().cpu().double().numpy()
    f = faces.detach().cpu().numpy()
    pts = points.detach().cpu().double().numpy()
    tris = bv[f]  # [F, 3, 3]
    k = min(candidates, len(f))
    centroid_tree, vertex_tree = cKDTree(tris.mean(1)), cKDTree(bv)
    # faces around each body vertex (long thin faces have far centroids): [Vb, max valence], padded by repetition
    order = np.argsort(f.reshape(-1), kind="stable")
    corner_vertex = f.reshape(-1)[order]
    start = np.searchsorted(corner_vertex, np.arange(len(bv)))
    valence = np.bincount(corner_vertex, minlength=len(bv))
    slots = np.minimum(np.arange(max(int(valence.max()), 1))[None], np.maximum(valence - 1, 0)[:, None])
    around = order[np.minimum(start[:, None] + slots, len(order) - 1)] // 3
    dense = dense_weights.detach().cpu().double()
    out = torch.empty(len(pts), dense.shape[1], dtype=torch.float64)
    for lo in range(0, len(pts), chunk):  # bounded memory for scans of a million vertices
        p = pts[lo:lo + chunk]
        _, near_faces = centroid_tree.query(p, k=k)
        _, near_vertex = vertex_tree.query(p)
        cand = np.concatenate([near_faces.reshape(len(p), k), around[near_vertex]], 1)  # [P, C]
        c = cand.shape[1]
        closest = tt.closest_point(tris[cand.reshape(-1)], np.repeat(p, c, axis=0)).reshape(len(p), c, 3)
        best = ((closest - p[:, None]) ** 2).sum(-1).argmin(1)  # [P]
        face = cand[np.arange(len(p)), best]
        bary = tt.points_to_barycentric(tris[face], closest[np.arange(len(p)), best])  # [P, 3]
        bary = np.clip(bary, 0.0, None)
        bary /= bary.sum(1, keepdims=True)
        out[lo:lo + chunk] = (torch.from_numpy(bary)[..., None] * dense[torch.from_numpy(f[face])]).sum(1)
    return (out / out.sum(1, keepdim=True)).float()


def load_thuman2(root: str | Path, subject_id: str, body, param_path: str | Path | None = None) -> ScanSubject:
    """Load scan ``subject_id`` of a THuman2.0-layout folder ``root`` and its fit for ``body`` (a BodyModel from
    ``avatar.body.load_body_model``; the fit file is ``root/<body.name>/<id>/<body.name>_param.pkl`` unless
    ``param_path`` is given). See the module docstring for the keys and conventions."""
    import trimesh

    root = Path(root)
    sid = str(subject_id)
    obj = root / "data" / sid / f"{sid}.obj"
    if not obj.is_file():
        raise FileNotFoundError(f"{obj}: no such scan (expected the THuman2.0 layout root/data/<id>/<id>.obj)")
    name = getattr(body, "name", None)
    param_path = Path(param_path) if param_path is not None else root / str(name) / sid / f"{name}_param.pkl"
    params = load_fit_params(param_path)
    pose, shape, scale, translation = params_to_pose(body, params, param_path)
    try:
        mesh = trimesh.load(str(obj), process=False, maintain_order=True, force="mesh")
    except Exception as err:  # trimesh raises many types on bad files
        raise ValueError(f"{obj}: not a readable OBJ mesh ({type(err).__name__}: {err})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{obj}: holds no triangles")
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64))
    uvs = texture = colors = None
    visual = mesh.visual
    if visual.kind == "texture" and getattr(visual, "uv", None) is not None:
        image = getattr(visual.material, "image", None)
        if image is None:
            image = getattr(visual.material, "baseColorTexture", None)
        if image is None:
            raise ValueError(f"{obj}: has texture coordinates but its material's image could not be read "
                             f"(expected material0.mtl and material0.jpeg in {obj.parent})")
        uv = np.asarray(visual.uv, dtype=np.float32)
        uvs = torch.from_numpy(np.stack([uv[:, 0], 1.0 - uv[:, 1]], -1))  # OBJ v = 0 is the bottom row
        texture = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    elif visual.kind == "vertex":
        colors = torch.from_numpy(np.asarray(visual.vertex_colors, dtype=np.uint8)[:, :3].copy())
    body_v = fitted_body_vertices(body, pose, shape, scale, translation)
    weights = transfer_skin_weights(vertices, body_v, body.faces, body.dense_skin_weights().float())
    return ScanSubject(name=sid, vertices=vertices, faces=faces, uvs=uvs, texture=texture, colors=colors, pose=pose,
                       shape=shape, scale=scale, translation=translation, body_vertices=body_v, skin_weights=weights)


# --- samples ------------------------------------------------------------------------------------------------------


def _to_z_up(up_axis: str) -> Tensor:
    """[3, 3] rotation taking the body's up axis to +z (``_camera`` orbits about z)."""
    if up_axis == "z":
        return torch.eye(3, dtype=torch.float64)
    if up_axis == "y":  # (x, y, z) -> (x, -z, y): +90 degrees about x
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    raise ValueError(f"unsupported up axis {up_axis!r}")


def scan_samples(scans: list[ScanSubject], body, codec, cfg: SampleConfig, seed: int = 0) -> SampleSet:
    """``len(scans) * cfg.views_per_subject`` samples rendered from scans like
    :func:`avatar.predict.samples.generate_samples` renders synthetic subjects: random cameras around the scan
    (``_camera``; for y-up bodies the orbit is about y, and the returned viewmats are in the scan's own frame),
    prior = the fitted body's depth layers with its skinning codes (pose noise on ``cfg.prior_noise_fraction`` of
    the views), targets = the scan's front/back depth and the codes of its transferred weights. Uses ``cfg``'s
    camera, size, noise and shading fields; ``num_subjects`` / ``texture_size`` / ``motion_frames`` do not apply."""
    from avatar.data.synthetic import render_views, uv_render_mesh
    from avatar.predict.views import render_depth_layers

    if not isinstance(cfg, SampleConfig):
        raise TypeError(f"scan_samples: cfg must be a SampleConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not scans:
        raise ValueError("scan_samples: need at least one ScanSubject")
    if getattr(codec, "num_bones", None) != body.num_bones:
        raise ValueError(f"scan_samples: the codec has {getattr(codec, 'num_bones', None)} bones, the body {body.num_bones}")
    S = cfg.size
    R_up = _to_z_up(body.up_axis)
    up4 = torch.eye(4, dtype=torch.float64)
    up4[:3, :3] = R_up
    out: dict[str, list[Tensor]] = {f: [] for f in _FIELDS}
    with torch.no_grad():
        body_codes = codec.encode(body.dense_skin_weights().float()).float()  # [Vb, 3]
        for i, scan in enumerate(scans):
            if scan.skin_weights.shape != (scan.vertices.shape[0], body.num_bones):
                raise ValueError(f"scan_samples: scan {scan.name!r} has weights {tuple(scan.skin_weights.shape)}, "
                                 f"expected [{scan.vertices.shape[0]}, {body.num_bones}] for body {body.name!r}")
            rng = np.random.default_rng([seed, i, 13])
            scan_codes = codec.encode(scan.skin_weights.float()).float()  # [V, 3]
            verts = (scan.vertices.double() @ R_up.T).float()  # z-up frame
            if scan.texture is not None:
                texture = scan.texture.float() / 255.0
                uvs, rm = scan.uvs.float(), uv_render_mesh(scan.faces, scan.faces)
            elif scan.colors is None:  # no colour: a uniform grey albedo
                texture = torch.full((1, 1, 3), 0.6)
                uvs, rm = torch.full((1, 2), 0.5), uv_render_mesh(scan.faces, torch.zeros_like(scan.faces))
            else:
                raise ValueError(f"scan_samples: scan {scan.name!r} has vertex colours only; bake them to a texture "
                                 "(textured scans, as THuman2.0 ships, are supported)")
            shading = bool(rng.uniform() < cfg.shading_fraction)
            light = tuple(float(x) for x in (rng.normal(), -abs(rng.normal()) - 0.5, rng.uniform(0.2, 1.2)))
            exact_body = (scan.body_vertices.double() @ R_up.T).float()
            for _ in range(cfg.views_per_subject):
                if cfg.prior_pose_noise > 0 and rng.uniform() < cfg.prior_noise_fraction:
                    noise = torch.from_numpy(rng.normal(0.0, cfg.prior_pose_noise, size=tuple(scan.pose.rotations.shape)))
                    pose = BodyPose(scan.pose.rotations + noise.to(scan.pose.rotations.dtype), scan.pose.translation)
                    naked = fitted_body_vertices(body, pose, scan.shape, scan.scale, scan.translation)
                    naked = (naked.double() @ R_up.T).float()
                else:
                    naked = exact_body
                lo, hi = verts.min(0).values, verts.max(0).values
                view, K = _camera((lo + hi) / 2, verts, rng, cfg)
                cams = Cameras(view[None], K[None], S, S)
                bg = tuple(float(x) for x in rng.uniform(0, 1, size=3))
                image, _ = render_views(verts, scan.faces, rm, uvs, texture, cams, shading, bg, light)
                prior = render_depth_layers(naked, body.faces, view, K, S, S, vertex_attrs=body_codes)
                target = render_depth_layers(verts, scan.faces, view, K, S, S, vertex_attrs=scan_codes)
                out["images"].append((image[0] * 255).round().to(torch.uint8))
                out["masks"].append(target.mask.bool())
                out["prior_mask"].append(prior.mask.bool())
                out["prior_depth"].append(torch.stack([prior.depth_front, prior.depth_back]).float())
                out["prior_codes"].append(torch.cat([prior.attrs_front, prior.attrs_back], -1).to(torch.float16))
                out["target_depth"].append(torch.stack([target.depth_front, target.depth_back]).float())
                out["target_codes"].append(torch.cat([target.attrs_front, target.attrs_back], -1).to(torch.float16))
                out["viewmats"].append((view.double() @ up4).float())  # world (scan frame) -> camera
                out["Ks"].append(K)
                out["subject"].append(torch.tensor(i))
    return SampleSet(*(torch.stack(out[f]) for f in _FIELDS))


def mix_samples(synthetic: SampleSet, scans: SampleSet) -> SampleSet:
    """Synthetic and scan samples in one set (synthetic first); scan subject ids are shifted past the synthetic
    ones so that every subject keeps its own id. Both sets must have the same image size."""
    for name, s in (("synthetic", synthetic), ("scans", scans)):
        if not isinstance(s, SampleSet):
            raise TypeError(f"mix_samples: {name} must be a SampleSet, got {type(s).__name__}")
    if synthetic.images.shape[1:] != scans.images.shape[1:]:
        raise ValueError(f"mix_samples: image sizes differ: synthetic {tuple(synthetic.images.shape[1:3])}, "
                         f"scans {tuple(scans.images.shape[1:3])}")
    offset = int(synthetic.subject.max()) + 1 if len(synthetic) else 0
    shifted = SampleSet(*(getattr(scans, f) + offset if f == "subject" else getattr(scans, f) for f in _FIELDS))
    return concat_samples([synthetic, shifted])


def thuman_ids(root: str | Path) -> list[str]:
    """The scan ids of a THuman2.0-layout folder (``root/data/<id>/<id>.obj``), sorted; a clear error if none."""
    data = Path(root) / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: not a THuman2.0-layout folder (expected data/<id>/<id>.obj)")
    ids = sorted(p.name for p in data.iterdir() if (p / f"{p.name}.obj").is_file())
    if not ids:
        raise ValueError(f"{data}: no scans (expected data/<id>/<id>.obj)")
    return ids


def thuman_scan_samples(root: str | Path, body, codec, cfg: SampleConfig, ids: list[str] | None = None,
                        seed: int = 0) -> SampleSet:
    """Samples of every scan ``ids`` (default: all of :func:`thuman_ids`) of a THuman2.0-layout folder, loaded one
    scan at a time (scans are large); scan ``k`` uses seed ``seed + k`` and subject id ``k``. The codec must be the
    fitted body's (same bone count): codes of another rig mean something else."""
    if codec.num_bones != body.num_bones:
        raise ValueError(f"thuman_scan_samples: the skinning codec has {codec.num_bones} bones but the fits' body "
                         f"model '{body.name}' has {body.num_bones}: train a codec for it "
                         f"(python -m tools.train_skin_codes --body {body.name}) and pass it")
    ids = thuman_ids(root) if ids is None else list(ids)
    parts = []
    for k, sid in enumerate(ids):
        s = scan_samples([load_thuman2(root, sid, body)], body, codec, cfg, seed=seed + k)
        parts.append(SampleSet(*(getattr(s, f) + k if f == "subject" else getattr(s, f) for f in _FIELDS)))
    return concat_samples(parts)

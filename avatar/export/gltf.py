"""Rigged glTF 2.0 binary (``.glb``): mesh, vertex colours, skeleton, skin and an animation clip.

Written by hand with numpy + struct rather than through pygltflib or trimesh: the binary layout of a skinned,
animated glTF is small and fully specified, trimesh's exporter writes no skins or animations, and pygltflib would
only wrap the same JSON dictionaries in classes (one dependency less). The file passes the Khronos glTF validator
(``tests/export/test_gltf.py`` runs it) and loads back with trimesh.

What is written (glTF conventions: metres, column-major matrices, quaternions ``xyzw``, right-handed; the project's
world frame is kept as is: anny is z up, a viewer that expects y up shows it lying on its back):

- one mesh, one primitive: ``POSITION`` (canonical vertices), ``NORMAL``, ``COLOR_0`` (float RGB, optional),
  ``JOINTS_0`` / ``WEIGHTS_0`` (the 4 largest influences of each vertex, renormalized to sum to 1 in float32),
  ``indices``; a material whose base colour is white so ``COLOR_0`` shows;
- one node per bone with its rest-pose local transform (the bone frames ``G_j`` of the body model's rest state for
  the subject's shape, relative to the parent's), parented like the body model's skeleton; the skinned mesh node
  sits at the scene root without a transform (as the specification asks);
- a skin with inverse bind matrices ``G_j^-1``: the joint matrix of a bone is then ``global(node_j) G_j^-1``, which
  for node transforms ``A_j G_j`` (``A_j`` a canonical -> posed bone transform, ``BodyOutput.bone_transforms``) is
  exactly ``A_j``, i.e. glTF skinning reproduces our LBS (with the 4-influence weights);
- optionally an animation: for each frame of a motion, every bone's local rotation (a ``rotation`` channel per bone,
  LINEAR quaternions made sign-continuous) and the root's translation; bones whose local translation moves (not
  the case for a kinematic skeleton) get translation channels too, so the clip is exact for any rigid transforms.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.io import atomic_write_bytes

__all__ = ["GlbAnimation", "GltfSkin", "top_k_weights", "rigid_local_transforms", "write_glb", "read_glb"]

_FLOAT, _UINT, _USHORT, _UBYTE = 5126, 5125, 5123, 5121
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_NUM_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
_DTYPES = {_FLOAT: np.float32, _UINT: np.uint32, _USHORT: np.uint16, _UBYTE: np.uint8}


@dataclass(frozen=True)
class GltfSkin:
    """The 4-influence skin of a mesh. joints: [V, 4] bone ids; weights: [V, 4] float32 rows summing to 1 (zero
    weights have joint 0, as the specification recommends); dropped: [V] weight mass removed by the truncation (before
    renormalizing)."""

    joints: np.ndarray
    weights: np.ndarray
    dropped: np.ndarray

    def dense(self, num_bones: int) -> np.ndarray:
        """The truncated weights as a dense ``[V, J]`` float64 matrix (what our LBS must use to match glTF)."""
        out = np.zeros((self.joints.shape[0], num_bones))
        np.add.at(out, (np.repeat(np.arange(self.joints.shape[0]), 4), self.joints.reshape(-1)),
                  self.weights.reshape(-1).astype(np.float64))
        return out


@dataclass(frozen=True)
class GlbAnimation:
    """An animation clip: ``transforms [N, J, 4, 4]`` canonical -> posed bone transforms per frame, played at
    ``fps``, named ``name``."""

    transforms: Tensor | np.ndarray
    fps: float = 30.0
    name: str = "motion"


def top_k_weights(weights: np.ndarray | Tensor, k: int = 4) -> GltfSkin:
    """Keep the ``k`` largest of the dense ``weights [V, J]`` per vertex and renormalize them in float32 so each
    row sums to 1 within float32 rounding (the largest takes the remainder)."""
    w = weights.detach().cpu().double().numpy() if isinstance(weights, Tensor) else np.asarray(weights, np.float64)
    if w.ndim != 2 or w.shape[1] < 1:
        raise ValueError(f"top_k_weights: weights must be [V, J], got {w.shape}")
    if not np.all(np.isfinite(w)) or (w < -1e-6).any():
        raise ValueError("top_k_weights: weights must be finite and non-negative")
    w = np.clip(w, 0.0, None)
    kk = min(k, w.shape[1])
    idx = np.argsort(-w, axis=1, kind="stable")[:, :kk]  # [V, kk] strongest first
    top = np.take_along_axis(w, idx, 1)
    total = w.sum(1)
    if (top[:, 0] <= 0).any():
        raise ValueError("top_k_weights: a vertex has no positive weight")
    dropped = 1.0 - top.sum(1) / total
    top = top / top.sum(1, keepdims=True)
    if kk < k:
        top = np.concatenate([top, np.zeros((w.shape[0], k - kk))], 1)
        idx = np.concatenate([idx, np.repeat(idx[:, :1], k - kk, 1)], 1)
    idx = np.where(top > 0, idx, 0)  # unused slots: joint 0 with weight 0 (what the glTF validator expects)
    t32 = top.astype(np.float32)
    t32[:, 0] = np.float32(1.0) - t32[:, 1:].sum(1, dtype=np.float32)
    return GltfSkin(joints=idx.astype(np.int64), weights=t32, dropped=dropped)


def _orthonormal(T: np.ndarray) -> np.ndarray:
    """Nearest rigid transforms (SVD of the linear part) of ``T [..., 4, 4]``, float64."""
    out = np.array(T, np.float64)
    U, _, Vt = np.linalg.svd(out[..., :3, :3])
    R = U @ Vt
    flip = np.linalg.det(R) < 0
    if flip.any():
        U[flip, :, -1] *= -1
        R = U @ Vt
    out[..., :3, :3] = R
    out[..., 3, :] = (0, 0, 0, 1)
    return out


def rigid_local_transforms(globals_: np.ndarray, parents: tuple[int, ...]) -> np.ndarray:
    """Local transforms ``[..., J, 4, 4]`` (relative to the parent; the root's is its global) of rigid global
    transforms ``[..., J, 4, 4]``."""
    out = np.array(globals_, np.float64)
    inv = np.linalg.inv(globals_)
    for j, p in enumerate(parents):
        if p >= 0:
            out[..., j, :, :] = inv[..., p, :, :] @ globals_[..., j, :, :]
    return out


def _quat_xyzw(R: np.ndarray) -> np.ndarray:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` xyzw (via the project's Shepperd)."""
    from avatar.geometry.rotations import matrix_to_quat

    q = matrix_to_quat(torch.from_numpy(np.ascontiguousarray(R, np.float64))).numpy()  # wxyz
    return np.concatenate([q[..., 1:], q[..., :1]], -1)


class _Builder:
    """Accumulates the binary buffer, buffer views and accessors (each view 4-byte aligned)."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def add(self, data: np.ndarray, ctype: int, atype: str, target: int | None = None, minmax: bool = False,
            normalized: bool = False) -> int:
        arr = np.ascontiguousarray(data, dtype=_DTYPES[ctype])
        count = arr.shape[0]
        while len(self.blob) % 4:
            self.blob.append(0)
        view = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": arr.nbytes}
        if target is not None:
            view["target"] = target
        self.blob.extend(arr.tobytes())
        self.views.append(view)
        acc = {"bufferView": len(self.views) - 1, "componentType": ctype, "count": int(count), "type": atype}
        if normalized:
            acc["normalized"] = True
        if minmax:
            flat = arr.reshape(count, -1)
            cast = float if ctype == _FLOAT else int
            acc["min"] = [cast(x) for x in flat.min(0)]
            acc["max"] = [cast(x) for x in flat.max(0)]
        self.accessors.append(acc)
        return len(self.accessors) - 1


def _np(x, dtype=np.float64) -> np.ndarray:
    return x.detach().cpu().numpy().astype(dtype) if isinstance(x, Tensor) else np.asarray(x, dtype)


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    out = np.zeros_like(v)
    for k in range(3):
        np.add.at(out, f[:, k], n)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.where(norm > 1e-20, out / np.maximum(norm, 1e-30), np.array([0.0, 0.0, 1.0]))
    return out


def write_glb(
    path: str | Path,
    vertices: Tensor | np.ndarray,  # [V, 3] canonical (rest-pose) positions, metres
    faces: Tensor | np.ndarray,  # [F, 3] int, counter-clockwise seen from outside
    skin_weights: Tensor | np.ndarray,  # [V, J] dense skinning weights
    bone_names: tuple[str, ...] | list[str],
    bone_parents: tuple[int, ...] | list[int],  # parent index, -1 for the root (index 0)
    bone_poses: Tensor | np.ndarray,  # [J, 4, 4] rest-pose bone frames (bone -> world), e.g. RestBody.bone_poses[0]
    colors: Tensor | np.ndarray | None = None,  # [V, 3] RGB in [0, 1]
    animation: GlbAnimation | None = None,
    max_influences: int = 4,
) -> GltfSkin:
    """Write a rigged ``.glb`` atomically (see the module docstring); returns the 4-influence skin written (its
    ``dropped`` field reports the truncation). Bad input raises ``ValueError`` naming ``path`` and the argument."""
    path = Path(path)
    v = _np(vertices)
    f = _np(faces, np.int64)
    J = len(bone_names)
    G = _np(bone_poses)
    parents = tuple(int(p) for p in bone_parents)
    where = f"write_glb({path})"
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0 or not np.isfinite(v).all():
        raise ValueError(f"{where}: vertices must be a finite non-empty [V, 3] array, got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0 or f.min() < 0 or f.max() >= v.shape[0]:
        raise ValueError(f"{where}: faces must be a non-empty [F, 3] array indexing [0, {v.shape[0]}), got {f.shape}")
    if len(parents) != J or parents[0] != -1 or any(not -1 < p < j for j, p in enumerate(parents) if j > 0):
        raise ValueError(f"{where}: bone_parents must have {J} entries, -1 for bone 0 and a smaller index for the "
                         f"others, got {parents[:8]}...")
    if G.shape != (J, 4, 4) or not np.isfinite(G).all():
        raise ValueError(f"{where}: bone_poses must be finite [{J}, 4, 4], got {G.shape}")
    w = _np(skin_weights)
    if w.shape != (v.shape[0], J):
        raise ValueError(f"{where}: skin_weights must be dense [{v.shape[0]}, {J}], got {w.shape}")
    if colors is not None:
        c = _np(colors)
        if c.shape != (v.shape[0], 3) or not np.isfinite(c).all():
            raise ValueError(f"{where}: colors must be finite [{v.shape[0]}, 3], got {c.shape}")
        c = np.clip(c, 0.0, 1.0)
    try:
        skin = top_k_weights(w, max_influences)
    except ValueError as err:
        raise ValueError(f"{where}: skin_weights: {err}") from None
    if np.abs(G[:, :3, :3] @ np.swapaxes(G[:, :3, :3], 1, 2) - np.eye(3)).max() > 1e-3:
        raise ValueError(f"{where}: bone_poses must be rigid (orthonormal rotation + translation)")
    G = _orthonormal(G)
    b = _Builder()
    attrs = {
        "POSITION": b.add(v, _FLOAT, "VEC3", _ARRAY_BUFFER, minmax=True),
        "NORMAL": b.add(_vertex_normals(v, f), _FLOAT, "VEC3", _ARRAY_BUFFER),
        "JOINTS_0": b.add(skin.joints, _UBYTE if J < 256 else _USHORT, "VEC4", _ARRAY_BUFFER),
        "WEIGHTS_0": b.add(skin.weights, _FLOAT, "VEC4", _ARRAY_BUFFER),
    }
    if colors is not None:
        attrs["COLOR_0"] = b.add(c, _FLOAT, "VEC3", _ARRAY_BUFFER)
    indices = b.add(f.reshape(-1), _UINT, "SCALAR", _ELEMENT_ARRAY_BUFFER, minmax=True)
    ibm = b.add(np.linalg.inv(G).transpose(0, 2, 1).reshape(J, 16), _FLOAT, "MAT4")  # column-major

    local = rigid_local_transforms(G, parents)  # [J, 4, 4]
    nodes: list[dict] = [{"name": "body", "mesh": 0, "skin": 0}]
    children: dict[int, list[int]] = {}
    for j, p in enumerate(parents):
        if p >= 0:
            children.setdefault(p, []).append(j + 1)
    for j in range(J):
        node = {"name": str(bone_names[j]), "translation": [float(x) for x in local[j, :3, 3]],
                "rotation": [float(x) for x in _quat_xyzw(local[j, :3, :3])]}
        if j in children:
            node["children"] = children[j]
        nodes.append(node)
    gltf: dict = {
        "asset": {"version": "2.0", "generator": "avatar.export.gltf"},
        "scene": 0,
        "scenes": [{"name": "avatar", "nodes": [0, 1]}],
        "nodes": nodes,
        "meshes": [{"name": "body", "primitives": [{"attributes": attrs, "indices": indices, "material": 0, "mode": 4}]}],
        "materials": [{"name": "vertex_colors", "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                                                          "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
        "skins": [{"name": "skeleton", "inverseBindMatrices": ibm, "joints": list(range(1, J + 1)), "skeleton": 1}],
    }
    if animation is not None:
        A = _np(animation.transforms)
        if A.ndim != 4 or A.shape[1:] != (J, 4, 4) or A.shape[0] < 1 or not np.isfinite(A).all():
            raise ValueError(f"{where}: animation.transforms must be finite [N, {J}, 4, 4], got {A.shape}")
        if not animation.fps > 0:
            raise ValueError(f"{where}: animation.fps must be > 0, got {animation.fps}")
        posed_local = rigid_local_transforms(_orthonormal(_orthonormal(A) @ G), parents)  # [N, J, 4, 4]
        N = A.shape[0]
        times = b.add(np.arange(N) / float(animation.fps), _FLOAT, "SCALAR", minmax=True)
        q = _quat_xyzw(posed_local[..., :3, :3])  # [N, J, 4]
        for n in range(1, N):  # sign continuity: LINEAR interpolation takes the short way
            flip = (q[n] * q[n - 1]).sum(-1) < 0
            q[n, flip] *= -1
        samplers, channels = [], []
        for j in range(J):
            samplers.append({"input": times, "output": b.add(q[:, j], _FLOAT, "VEC4"), "interpolation": "LINEAR"})
            channels.append({"sampler": len(samplers) - 1, "target": {"node": j + 1, "path": "rotation"}})
            t = posed_local[:, j, :3, 3]
            if j == 0 or np.abs(t - local[j, :3, 3]).max() > 1e-6:
                samplers.append({"input": times, "output": b.add(t, _FLOAT, "VEC3"), "interpolation": "LINEAR"})
                channels.append({"sampler": len(samplers) - 1, "target": {"node": j + 1, "path": "translation"}})
        gltf["animations"] = [{"name": animation.name, "samplers": samplers, "channels": channels}]
    while len(b.blob) % 4:
        b.blob.append(0)
    gltf["buffers"] = [{"byteLength": len(b.blob)}]
    gltf["bufferViews"] = b.views
    gltf["accessors"] = b.accessors
    js = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    total = 12 + 8 + len(js) + 8 + len(b.blob)
    data = b"".join([struct.pack("<4sII", b"glTF", 2, total), struct.pack("<I4s", len(js), b"JSON"), js,
                     struct.pack("<I4s", len(b.blob), b"BIN\x00"), bytes(b.blob)])
    atomic_write_bytes(path, data)
    return skin


def read_glb(path: str | Path) -> tuple[dict, bytes]:
    """The JSON document and the binary chunk of a ``.glb`` (validated header; errors name the file)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short for a glb ({len(data)} bytes)")
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF" or version != 2 or length != len(data):
        raise ValueError(f"{path}: not a glTF 2.0 binary (magic {magic!r}, version {version}, length {length} vs {len(data)})")
    jlen, jtype = struct.unpack_from("<I4s", data, 12)
    if jtype != b"JSON":
        raise ValueError(f"{path}: first chunk must be JSON, got {jtype!r}")
    doc = json.loads(data[20:20 + jlen])
    blob = b""
    off = 20 + jlen
    if off < len(data):
        blen, btype = struct.unpack_from("<I4s", data, off)
        if btype != b"BIN\x00":
            raise ValueError(f"{path}: second chunk must be BIN, got {btype!r}")
        blob = data[off + 8: off + 8 + blen]
    return doc, blob


def accessor_array(doc: dict, blob: bytes, index: int) -> np.ndarray:
    """The data of accessor ``index`` as ``[count, components]`` (tightly packed views, as :func:`write_glb`
    writes them)."""
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    dt = np.dtype(_DTYPES[acc["componentType"]])
    n = _NUM_COMPONENTS[acc["type"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    arr = np.frombuffer(blob, dtype=dt, count=acc["count"] * n, offset=start)
    return arr.reshape(acc["count"], n)

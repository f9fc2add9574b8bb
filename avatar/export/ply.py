"""3D Gaussian splat ``.ply`` in the layout of the 3DGS reference code, which common splat viewers read.

One ``vertex`` element, binary little endian, float32 properties in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  [f_rest_0 .. f_rest_{K-1}]  opacity  scale_0 scale_1 scale_2
    rot_0 rot_1 rot_2 rot_3

with ``f_dc = (rgb - 0.5) / C0`` (degree-0 spherical harmonics, ``C0 = 0.28209479177387814``), normals zero, opacity
as a logit, scales as natural logs (metres), ``rot`` a normalized quaternion wxyz. ``f_rest`` holds zeros for
``sh_degree`` 1-3 (``K = 3 ((d + 1)^2 - 1)``: 45 for degree 3, which the original SIBR viewer expects) or is absent
for degree 0. Skin weights are not part of the format (export a posed set, or use the bundle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avatar.io import atomic_file
from avatar.types import GaussianSet

SH_C0 = 0.28209479177387814
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2",
              "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
              "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8"}


def splat_property_names(sh_degree: int = 0) -> list[str]:
    """The standard property order for ``sh_degree`` in 0..3."""
    if sh_degree not in (0, 1, 2, 3):
        raise ValueError(f"sh_degree must be 0, 1, 2 or 3, got {sh_degree}")
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def gaussians_to_splat_array(gaussians: GaussianSet, sh_degree: int = 0) -> np.ndarray:
    """The structured float32 array (one record per Gaussian) that ``write_splat_ply`` writes.

    Opacities are clamped to [1e-7, 1 - 1e-7] before the logit; scales must be positive.
    """
    if not isinstance(gaussians, GaussianSet):
        raise TypeError(f"gaussians must be a GaussianSet, got {type(gaussians).__name__}")
    names = splat_property_names(sh_degree)
    g = {k: getattr(gaussians, k).detach().to("cpu", torch.float64).numpy()
         for k in ("means", "quats", "scales", "opacities", "colors")}
    if not np.all(g["scales"] > 0):
        raise ValueError("gaussians.scales must be positive (linear standard deviations) to take their log")
    qn = np.linalg.norm(g["quats"], axis=1, keepdims=True)
    if not np.all(qn > 0):
        raise ValueError("gaussians.quats has a zero quaternion")
    op = np.clip(g["opacities"], 1e-7, 1 - 1e-7)
    rec = np.zeros(len(gaussians), dtype=[(n, "<f4") for n in names])
    for i, a in enumerate("xyz"):
        rec[a] = g["means"][:, i]
    for i in range(3):
        rec[f"f_dc_{i}"] = (g["colors"][:, i] - 0.5) / SH_C0
        rec[f"scale_{i}"] = np.log(g["scales"][:, i])
    rec["opacity"] = np.log(op) - np.log1p(-op)
    q = g["quats"] / qn
    for i in range(4):
        rec[f"rot_{i}"] = q[:, i]
    return rec


def _header(num: int, names: list[str]) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {num}"]
    lines += [f"property float {n}" for n in names]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def write_splat_ply(path: str | Path, gaussians: GaussianSet, sh_degree: int = 0) -> Path:
    """Write ``gaussians`` as a 3DGS ``.ply`` at ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path)
    rec = gaussians_to_splat_array(gaussians, sh_degree)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_header(len(rec), list(rec.dtype.names)))
            f.write(rec.tobytes())
    return path


def read_ply_header(path: str | Path) -> tuple[int, list[tuple[str, str]], int]:
    """(vertex count, [(property name, numpy dtype)], header length in bytes) of a binary little-endian ``.ply``
    whose first element is ``vertex``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .ply file")
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file (first line is not 'ply')")
        count, props, element, fmt = None, [], None, None
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: header has no 'end_header'")
            words = line.decode("ascii", errors="replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1] if len(words) > 1 else None
            elif words[0] == "element":
                element = words[1]
                if element == "vertex":
                    if count is not None or props:
                        raise ValueError(f"{path}: header field 'element vertex' appears twice")
                    count = int(words[2])
                elif count is None:
                    raise ValueError(f"{path}: header field 'element': '{element}' comes before 'vertex'")
            elif words[0] == "property" and element == "vertex":
                if words[1] == "list":
                    raise ValueError(f"{path}: vertex property '{words[-1]}' is a list; splat files have none")
                if words[1] not in _PLY_TYPES:
                    raise ValueError(f"{path}: vertex property '{words[2]}' has unknown type '{words[1]}'")
                props.append((words[2], _PLY_TYPES[words[1]]))
        header_len = f.tell()
    if fmt != "binary_little_endian":
        raise ValueError(f"{path}: header field 'format' is {fmt!r}; only binary_little_endian is read")
    if count is None:
        raise ValueError(f"{path}: header has no 'element vertex'")
    return count, props, header_len


def read_splat_ply(path: str | Path) -> GaussianSet:
    """Read a 3DGS ``.ply`` into a float32 CPU ``GaussianSet`` (colors from the SH DC term, clamped to [0, 1];
    ``f_rest_*`` ignored; opacity sigmoid, scales exp, quaternions normalized; no skin weights)."""
    path = Path(path)
    count, props, header_len = read_ply_header(path)
    names = [n for n, _ in props]
    for required in splat_property_names(0):
        if required in ("nx", "ny", "nz"):
            continue
        if required not in names:
            raise ValueError(f"{path}: vertex property '{required}' is missing")
    dtype = np.dtype(props)
    need = header_len + count * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise ValueError(f"{path}: element 'vertex' needs {need - header_len} bytes after the header "
                         f"({count} x {dtype.itemsize}), the file has {size - header_len}")
    rec = np.fromfile(path, dtype=dtype, count=count, offset=header_len)

    def cols(*keys):
        return np.stack([rec[k].astype(np.float64) for k in keys], axis=1)

    means = cols("x", "y", "z")
    colors = np.clip(cols("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5, 0.0, 1.0)
    opacities = 1.0 / (1.0 + np.exp(-rec["opacity"].astype(np.float64)))
    scales = np.exp(cols("scale_0", "scale_1", "scale_2"))
    quats = cols("rot_0", "rot_1", "rot_2", "rot_3")
    qn = np.linalg.norm(quats, axis=1, keepdims=True)
    if not np.all(qn > 0):
        raise ValueError(f"{path}: vertex properties 'rot_0..3' hold a zero quaternion")
    quats = quats / qn

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return GaussianSet(t(means), t(quats), t(scales), t(opacities), t(colors))

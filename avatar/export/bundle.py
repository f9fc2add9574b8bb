"""Avatar bundle: a folder with ``avatar.safetensors`` (every tensor) and ``avatar.json`` (everything else). No pickle.

Layout (format version 1)::

    <bundle>/avatar.safetensors   gaussians.means [N, 3], gaussians.quats [N, 4] (wxyz), gaussians.scales [N, 3]
                                  (linear, metres), gaussians.opacities [N], gaussians.colors [N, 3],
                                  gaussians.skin_weights [N, J] (optional), shape [S], extra.<name> (any tensors,
                                  e.g. the residual weight field's state dict: extra.weight_field.0.weight ...)
    <bundle>/avatar.json          format, format_version, body_model {name, bone_names, bone_parents}, shape
                                  {size, names}, counts {gaussians, bones, extra}, config (resolved, as passed),
                                  tensors {key: {shape, dtype}} (the manifest), created {utc, avatar_version, torch}

Tensors are stored as given (dtype kept, moved to CPU, made contiguous), so a round trip is bit-identical. The folder
is built in a hidden temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from avatar.io import atomic_dir

from avatar.types import GaussianSet

FORMAT = "avatar-bundle"
FORMAT_VERSION = 1
TENSORS_FILE, META_FILE = "avatar.safetensors", "avatar.json"
GAUSSIAN_FIELDS = ("means", "quats", "scales", "opacities", "colors")
EXTRA_PREFIX = "extra."


@dataclass(frozen=True)
class Bundle:
    """A loaded avatar bundle.

    gaussians:       canonical ``GaussianSet`` (skin_weights [N, J] or None).
    body_model_name: e.g. "anny", "smpl"; bone_names [J], bone_parents [J] (-1 for a root).
    shape:           [S] body shape parameters; shape_names: their names, or None.
    config:          the resolved config dict saved with the avatar.
    extra_tensors:   named tensors (e.g. a weight-field MLP state dict), names without the ``extra.`` prefix.
    meta:            the whole ``avatar.json`` document.
    """

    gaussians: GaussianSet
    body_model_name: str
    bone_names: tuple[str, ...]
    bone_parents: tuple[int, ...]
    shape: Tensor
    shape_names: tuple[str, ...] | None
    config: dict[str, Any]
    extra_tensors: dict[str, Tensor]
    meta: dict[str, Any]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avatar")
    except PackageNotFoundError:
        return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_save_inputs(gaussians, bone_names, bone_parents, shape, config, extra_tensors, shape_names) -> None:
    if not isinstance(gaussians, GaussianSet):
        raise TypeError(f"gaussians must be a GaussianSet, got {type(gaussians).__name__}")
    if len(bone_names) != len(bone_parents):
        raise ValueError(f"bone_names ({len(bone_names)}) and bone_parents ({len(bone_parents)}) differ in length")
    J = len(bone_names)
    for i, p in enumerate(bone_parents):
        if not (-1 <= int(p) < J) or int(p) == i:
            raise ValueError(f"bone_parents[{i}] = {p} is not -1 or another bone index in [0, {J})")
    if gaussians.skin_weights is not None and gaussians.skin_weights.shape[1] != J:
        raise ValueError(f"gaussians.skin_weights has {gaussians.skin_weights.shape[1]} columns but there are "
                         f"{J} bones")
    if not isinstance(shape, Tensor) or shape.ndim != 1:
        raise ValueError(f"shape must be a 1-D tensor [S], got {getattr(shape, 'shape', type(shape).__name__)}")
    if shape_names is not None and len(shape_names) != shape.shape[0]:
        raise ValueError(f"shape_names has {len(shape_names)} names for {shape.shape[0]} shape parameters")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be a JSON-serializable dict (resolve dataclasses first): {e}") from None
    for k, t in extra_tensors.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"extra_tensors keys must be non-empty strings, got {k!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"extra_tensors[{k!r}] must be a Tensor, got {type(t).__name__}")


def save_bundle(
    path: str | Path,
    gaussians: GaussianSet,
    body_model_name: str,
    bone_names: Sequence[str],
    bone_parents: Sequence[int],
    shape: Tensor,  # [S]
    config: Mapping[str, Any],
    extra_tensors: Mapping[str, Tensor] | None = None,
    *,
    shape_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an avatar bundle folder at ``path`` atomically (see the module docstring); returns ``path``.

    An existing ``path`` is replaced only with ``overwrite=True`` (the old folder is moved aside, the new one renamed
    in, then the old one removed).
    """
    from safetensors.torch import save_file

    path = Path(path)
    extra_tensors = dict(extra_tensors or {})
    config = dict(config)
    _check_save_inputs(gaussians, bone_names, bone_parents, shape, config, extra_tensors, shape_names)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    tensors: dict[str, Tensor] = {f"gaussians.{k}": getattr(gaussians, k) for k in GAUSSIAN_FIELDS}
    if gaussians.skin_weights is not None:
        tensors["gaussians.skin_weights"] = gaussians.skin_weights
    tensors["shape"] = shape
    tensors.update({EXTRA_PREFIX + k: v for k, v in extra_tensors.items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "body_model": {"name": str(body_model_name), "bone_names": [str(b) for b in bone_names],
                       "bone_parents": [int(p) for p in bone_parents]},
        "shape": {"size": int(shape.shape[0]), "names": None if shape_names is None else [str(s) for s in shape_names]},
        "counts": {"gaussians": len(gaussians), "bones": len(bone_names), "extra": len(extra_tensors),
                   "has_skin_weights": gaussians.skin_weights is not None},
        "config": config,
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
        "created": {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "avatar_version": _package_version(), "torch": torch.__version__},
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
    return path


def _field(meta: Mapping, key: str, kind, file: Path):
    if key not in meta:
        raise ValueError(f"{file}: missing field '{key}'")
    if not isinstance(meta[key], kind):
        raise ValueError(f"{file}: field '{key}' must be {getattr(kind, '__name__', kind)}, "
                         f"got {type(meta[key]).__name__}")
    return meta[key]


def load_bundle(path: str | Path) -> Bundle:
    """Load and validate a bundle folder. Every problem raises one error naming the file and the field:
    ``FileNotFoundError`` for a missing folder or file, ``ValueError`` for a wrong format or version, a tensor
    missing from or not listed in the manifest, a shape or dtype differing from the manifest or from the counts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such avatar bundle folder")
    meta_file, tensor_file = path / META_FILE, path / TENSORS_FILE
    for f in (meta_file, tensor_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing bundle file")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_file}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: must hold a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: field 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: field 'format_version' is {version!r}; this version of avatar reads "
                         f"{FORMAT_VERSION}")
    body = _field(meta, "body_model", dict, meta_file)
    name = _field(body, "name", str, meta_file)
    bone_names = _field(body, "bone_names", list, meta_file)
    bone_parents = _field(body, "bone_parents", list, meta_file)
    if len(bone_names) != len(bone_parents):
        raise ValueError(f"{meta_file}: field 'body_model.bone_names' ({len(bone_names)}) and "
                         f"'body_model.bone_parents' ({len(bone_parents)}) differ in length")
    shape_meta = _field(meta, "shape", dict, meta_file)
    counts = _field(meta, "counts", dict, meta_file)
    config = _field(meta, "config", dict, meta_file)
    manifest = _field(meta, "tensors", dict, meta_file)
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{tensor_file}: not a readable safetensors file: {e}") from None

    N, J = _field(counts, "gaussians", int, meta_file), _field(counts, "bones", int, meta_file)
    S, has_sw = _field(shape_meta, "size", int, meta_file), _field(counts, "has_skin_weights", bool, meta_file)
    if J != len(bone_names):
        raise ValueError(f"{meta_file}: field 'counts.bones' is {J} but 'body_model.bone_names' lists "
                         f"{len(bone_names)}")
    expected = {"gaussians.means": [N, 3], "gaussians.quats": [N, 4], "gaussians.scales": [N, 3],
                "gaussians.opacities": [N], "gaussians.colors": [N, 3], "shape": [S]}
    if has_sw:
        expected["gaussians.skin_weights"] = [N, J]
    for key, shp in expected.items():
        if key not in manifest:
            raise ValueError(f"{meta_file}: field 'tensors' does not list required tensor '{key}'")
        if manifest[key].get("shape") != shp:
            raise ValueError(f"{meta_file}: tensor '{key}' has manifest shape {manifest[key].get('shape')}, "
                             f"expected {shp} from 'counts' / 'shape'")
    for key, entry in manifest.items():
        if key not in tensors:
            raise ValueError(f"{tensor_file}: missing tensor '{key}' (listed in {META_FILE})")
        t = tensors[key]
        if list(t.shape) != entry.get("shape"):
            raise ValueError(f"{tensor_file}: tensor '{key}' has shape {list(t.shape)}, {META_FILE} says "
                             f"{entry.get('shape')}")
        if _dtype_name(t.dtype) != entry.get("dtype"):
            raise ValueError(f"{tensor_file}: tensor '{key}' has dtype {_dtype_name(t.dtype)}, {META_FILE} says "
                             f"{entry.get('dtype')}")
    unlisted = sorted(set(tensors) - set(manifest))
    if unlisted:
        raise ValueError(f"{tensor_file}: tensor '{unlisted[0]}' is not listed in {META_FILE} field 'tensors'")
    gaussians = GaussianSet(*(tensors[f"gaussians.{k}"] for k in GAUSSIAN_FIELDS),
                            skin_weights=tensors.get("gaussians.skin_weights"))
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    names = shape_meta.get("names")
    return Bundle(gaussians, name, tuple(str(b) for b in bone_names), tuple(int(p) for p in bone_parents),
                  tensors["shape"], None if names is None else tuple(names), config, extra, meta)

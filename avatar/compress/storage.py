"""Compact weight files: safetensors with a JSON manifest, tensors stored dense, sparse (bitmask) and/or int8.

One file per model: a ``.safetensors`` whose ``__metadata__`` holds ``{"avatar.compact": <JSON manifest>}``. The
manifest names, for every logical tensor, its encoding, shape and dtype, and which stored parts hold it:

- ``dense``:        ``<name>`` as is (any dtype: fp32, fp16, bf16, int8...);
- ``fp16``:         ``<name>`` cast to float16 (lossy; decoded back to the original dtype);
- ``sparse``:       ``<name>.mask`` (uint8, the row-major non-zero bitmask packed 8 per byte, ``numpy.packbits``
                    order) and ``<name>.values`` (the non-zeros in row-major order, original dtype);
- ``int8``:         ``<name>.q`` int8 and ``<name>.scale`` float32 per output channel (``avatar.compress.quantize``);
- ``sparse_int8``:  ``<name>.mask`` + ``<name>.q`` (int8 non-zeros) + ``<name>.scale``.

A bitmask costs 1 bit per entry, so ``sparse`` wins over dense for float32 above ~3% zeros and ``sparse_int8``
over ``int8`` above ~12.5%; CSR (int32 column indices) would only win above ~97% sparsity at these sizes.
Decoding is deterministic: loading gives back exactly the stored values (``decode(encode(t))`` equals ``t`` for
lossless encodings and ``dequantize(quantize(t))`` for int8, bit for bit).

Written here rather than with ``torch.save``: no pickle for our files (ARCHITECTURE.md), and safetensors has no
sparse or quantized tensor types of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.compress.quantize import dequantize_per_channel, quantize_per_channel_int8
from avatar.io import atomic_file

ENCODINGS = ("dense", "fp16", "sparse", "int8", "sparse_int8")
MANIFEST_KEY = "avatar.compact"
FORMAT_VERSION = 1

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                               torch.int16, torch.int32, torch.int64, torch.bool)}


def _pack_mask(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def _unpack_mask(packed: Tensor, numel: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))


def encode_tensor(name: str, t: Tensor, encoding: str) -> tuple[dict[str, Tensor], dict]:
    """Stored parts ``{part_name: tensor}`` and the manifest entry of ``t`` under ``encoding``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encode_tensor: {name!r}: encoding must be one of {ENCODINGS}, got {encoding!r}")
    t = t.detach().cpu().contiguous()
    entry = {"encoding": encoding, "shape": list(t.shape), "dtype": str(t.dtype)}
    if encoding != "dense" and not t.is_floating_point():
        raise ValueError(f"encode_tensor: {name!r}: encoding {encoding!r} needs a floating tensor, got {t.dtype}")
    if encoding in ("int8", "sparse_int8") and t.ndim < 1:
        raise ValueError(f"encode_tensor: {name!r}: int8 encodings need a tensor [out, ...], got a scalar")
    if encoding == "dense":
        return {name: t}, entry
    if encoding == "fp16":
        return {name: t.to(torch.float16)}, entry
    if encoding == "sparse":
        nz = t != 0
        return {f"{name}.mask": _pack_mask(nz), f"{name}.values": t[nz]}, entry
    q, scale = quantize_per_channel_int8(t)
    if encoding == "int8":
        return {f"{name}.q": q, f"{name}.scale": scale}, entry
    nz = q != 0
    return {f"{name}.mask": _pack_mask(nz), f"{name}.q": q[nz], f"{name}.scale": scale}, entry


def decode_tensor(name: str, parts: dict[str, Tensor], entry: dict, where: str = "") -> Tensor:
    """The tensor ``name`` from its stored ``parts`` and manifest ``entry`` (inverse of :func:`encode_tensor`)."""
    try:
        enc, shape, dtype = entry["encoding"], tuple(int(s) for s in entry["shape"]), _DTYPES[entry["dtype"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: manifest entry of {name!r} is malformed ({e!r}): {entry!r}") from None
    numel = int(np.prod(shape)) if shape else 1

    def part(suffix: str) -> Tensor:
        key = name + suffix
        if key not in parts:
            raise ValueError(f"{where}: tensor {name!r} ({enc}) is missing its stored part {key!r}")
        return parts[key]

    if enc == "dense":
        out = part("")
    elif enc == "fp16":
        out = part("").to(dtype)
    elif enc == "sparse":
        mask, values = _unpack_mask(part(".mask"), numel), part(".values")
        if int(mask.sum()) != values.numel():
            raise ValueError(f"{where}: {name!r}: bitmask has {int(mask.sum())} non-zeros but {values.numel()} values")
        out = torch.zeros(numel, dtype=values.dtype)
        out[mask] = values
    elif enc in ("int8", "sparse_int8"):
        scale = part(".scale")
        if enc == "int8":
            q = part(".q")
        else:
            mask, vals = _unpack_mask(part(".mask"), numel), part(".q")
            if int(mask.sum()) != vals.numel():
                raise ValueError(f"{where}: {name!r}: bitmask has {int(mask.sum())} non-zeros but {vals.numel()} values")
            q = torch.zeros(numel, dtype=torch.int8)
            q[mask] = vals
        q = q.reshape(shape)
        if scale.shape != (shape[0],):
            raise ValueError(f"{where}: {name!r}: scale must be [{shape[0]}], got {tuple(scale.shape)}")
        out = dequantize_per_channel(q, scale, dtype)
    else:
        raise ValueError(f"{where}: tensor {name!r} has unknown encoding {enc!r}; expected one of {ENCODINGS}")
    if out.numel() != numel:
        raise ValueError(f"{where}: tensor {name!r} has {out.numel()} values, manifest shape {list(shape)}")
    return out.reshape(shape).to(dtype)


def choose_encoding(t: Tensor, quantize: bool) -> str:
    """The smallest encoding for ``t``: int8 (optionally sparse) when ``quantize`` and ``t`` is a float matrix or
    higher, else sparse when the bitmask pays off, else dense. Vectors (biases, scales) stay dense."""
    if not t.is_floating_point() or t.ndim < 2:
        return "dense"
    zeros = float((t == 0).float().mean())
    if quantize:
        return "sparse_int8" if zeros > 1 / 8 else "int8"
    return "sparse" if zeros * t.element_size() * 8 > 1 else "dense"


def save_compact(path: str | Path, tensors: dict[str, Tensor], encodings: dict[str, str] | str = "auto",
                 quantize: bool = False, metadata: dict | None = None) -> Path:
    """Write ``tensors`` to ``path`` (a .safetensors file, atomically). ``encodings``: per-name encodings, one for
    all, or ``"auto"`` (:func:`choose_encoding` with ``quantize``). ``metadata``: JSON-able extras kept in the
    manifest under ``"user"``. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if not tensors:
        raise ValueError(f"save_compact: {path}: no tensors to save")
    parts: dict[str, Tensor] = {}
    manifest: dict = {"version": FORMAT_VERSION, "tensors": {}, "user": metadata or {}}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"save_compact: {path}: {name!r} is a {type(t).__name__}, not a tensor")
        if isinstance(encodings, dict):
            enc = encodings.get(name, "dense")
        elif encodings == "auto":
            enc = choose_encoding(t, quantize)
        else:
            enc = encodings
        p, entry = encode_tensor(name, t, enc)
        clash = set(p) & set(parts)
        if clash:
            raise ValueError(f"save_compact: {path}: stored part names collide: {sorted(clash)}")
        parts.update(p)
        manifest["tensors"][name] = entry
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in parts.items()}, str(tmp),
                  metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
    return path


def load_compact(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, user_metadata)`` from a file written by :func:`save_compact`; ``ValueError`` naming the file and
    the problem for anything else."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_compact: {path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        parts = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"load_compact: {path} is not a readable safetensors file: {e}") from None
    if MANIFEST_KEY not in meta:
        raise ValueError(f"load_compact: {path} has no {MANIFEST_KEY!r} manifest in its safetensors metadata")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
        entries = manifest["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"load_compact: {path}: the manifest is not valid ({e})") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"load_compact: {path}: manifest version {manifest.get('version')!r}, expected {FORMAT_VERSION}")
    out = {name: decode_tensor(name, parts, entry, where=f"load_compact: {path}") for name, entry in entries.items()}
    return out, manifest.get("user", {})


def state_dict_bytes(tensors: dict[str, Tensor]) -> int:
    """Raw bytes of a state dict's tensors (no file overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())

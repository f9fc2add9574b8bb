"""Atomic writes: every file or folder the project writes appears whole or not at all.

A file is written to a temporary sibling and renamed over its target (``os.replace`` is atomic on one file
system); a folder is built as a temporary sibling and swapped in. Killed runs leave at most hidden ``.partial``
siblings, never a partial target.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (replacing an existing one when
    ``overwrite``, else ``FileExistsError``), on any exception it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix or f".{path.name}.partial-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_default(x):
    """``json.dumps(..., default=json_default)``: dataclasses as dicts, paths as strings; anything else a TypeError."""
    import dataclasses

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def load_module_weights(module, path: str | Path, caller: str, what: str):
    """Load the safetensors file ``path`` into ``module`` (float32, eval mode) after checking that its tensor names
    and shapes are exactly the module's; errors name ``caller``, the file and ``what`` the module is."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{caller}: {path} is not a readable safetensors file: {err}") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(f"{caller}: {path} tensors do not match {what} (missing {missing}, wrong shape {wrong}, "
                         f"unexpected {sorted(set(got) - set(expected))})")
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return module.eval()


# --- restricted unpickling (datasets whose own format is a pickle of numpy arrays) ------------------------------


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # numpy's protocol-5 array reconstruction (bytes -> array)
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes numpy's bytes at protocol 2; encodes a str, runs nothing else
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain Python containers/scalars and numpy arrays / scalars: ``find_class``
    resolves nothing but numpy's array reconstruction globals (``_reconstruct``, ``_frombuffer``, ``scalar``, ``ndarray``, ``dtype``; and
    ``_codecs.encode``, which protocol-2 pickles use for bytes) and raises ``pickle.UnpicklingError`` otherwise,
    before anything is called."""

    def __init__(self, file, source: str = "<pickle>") -> None:
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            import importlib

            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):  # numpy 2 names numpy.core numpy._core, and vice versa
                other = module.replace("numpy._core", "numpy.core") if "_core" in module else module.replace("numpy.core", "numpy._core")
                return getattr(importlib.import_module(other), name)
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to load the global {module}.{name}; these files may only hold containers of "
            "numpy arrays (an arbitrary pickle can run code)"
        )

"""Checkpoints of a fit: safetensors (every tensor) + a JSON sidecar (step, config, shapes, hyperparameters).

No pickle. Both files are written to a temporary name in the same folder and renamed (``os.replace`` is atomic on
POSIX), tensors first and the JSON last: a checkpoint exists only once its JSON does, so a run killed mid-write
leaves the previous checkpoint as the latest complete one and no partial file under a final name.

Layout: ``<dir>/step_<00000123>.safetensors`` and ``<dir>/step_<00000123>.json``; ``keep_last`` newest are kept.
Optimizer state is flattened to ``optim/<group name>/<param index>/<key>`` tensors (Adam: step, exp_avg,
exp_avg_sq), its groups' hyperparameters to the JSON.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_NAME = re.compile(r"^step_(\d{8})\.json$")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(directory: str | Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; returns the JSON path. ``meta`` must be JSON-serializable."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"step_{int(step):08d}"
    st_path, js_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _atomic_write(st_path, lambda p: save_file(flat, str(p)))
    full = dict(meta, step=int(step), tensors=st_path.name,
                shapes={k: list(v.shape) for k, v in flat.items()})
    text = json.dumps(full, indent=1, sort_keys=True)
    _atomic_write(js_path, lambda p: p.write_text(text))
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    return js_path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (JSON and tensors present) in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and p.with_suffix(".safetensors").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(json_path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of the checkpoint whose sidecar is ``json_path``; errors name the file."""
    from safetensors.torch import load_file

    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_path}: not a readable checkpoint sidecar ({e})") from e
    if not isinstance(meta, dict) or "tensors" not in meta or "step" not in meta:
        raise ValueError(f"{json_path}: checkpoint sidecar lacks the fields 'step' and 'tensors'")
    st_path = json_path.with_name(meta["tensors"])
    if not st_path.is_file():
        raise ValueError(f"{json_path}: its tensor file {st_path.name} is missing")
    tensors = load_file(str(st_path))
    for k, shape in meta.get("shapes", {}).items():
        if k not in tensors or list(tensors[k].shape) != shape:
            raise ValueError(f"{st_path}: tensor {k!r} missing or not of shape {shape}")
    return tensors, meta


# ----------------------------------------------------------------------------------------------------------------
# optimizer state as tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Flatten an optimizer whose groups have unique ``name`` entries: ``(tensors, groups)`` where ``groups`` holds
    each group's name, parameter count and JSON-able hyperparameters."""
    tensors: dict[str, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        name = group["name"]
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                 if k != "params" and isinstance(v, (int, float, bool, str, tuple, type(None)))}
        groups.append(dict(hyper, num_params=len(group["params"])))
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{name}/{i}/{key}"] = value
    return tensors, groups


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                           groups: list[dict[str, Any]]) -> None:
    """Restore what :func:`optimizer_tensors` wrote into an optimizer built with the same named groups."""
    by_name = {g["name"]: g for g in optimizer.param_groups}
    for saved in groups:
        name = saved["name"]
        if name not in by_name:
            raise ValueError(f"checkpoint optimizer group {name!r} is not in the optimizer ({sorted(by_name)})")
        group = by_name[name]
        if len(group["params"]) != saved["num_params"]:
            raise ValueError(f"optimizer group {name!r}: {len(group['params'])} parameters, checkpoint "
                             f"{saved['num_params']}")
        for k, v in saved.items():
            if k not in ("name", "num_params") and k in group:
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
        for i, p in enumerate(group["params"]):
            prefix = f"optim/{name}/{i}/"
            st = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st and st[key].shape != p.shape:
                        raise ValueError(f"optimizer group {name!r} param {i}: {key} {tuple(st[key].shape)} does not "
                                         f"match the parameter {tuple(p.shape)}")
                optimizer.state[p] = st

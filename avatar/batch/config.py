"""Typed configuration of a batch run (``BatchConfig``) and of one subject's job (``SubjectJob``).

``SubjectJob`` is what crosses the process boundary (a spawned pool worker or a Ray task): a frozen dataclass of
plain values only, so it pickles the same way to either backend and nothing of the driver's state leaks into a job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

DATASETS = ("zju_mocap", "peoplesnapshot", "synthetic")
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class BatchConfig:
    """One batch reconstruction: which subjects, how each is fitted and evaluated, where it runs, where it writes."""

    dataset: Literal["zju_mocap", "peoplesnapshot", "synthetic"]
    """Kind of the subject folders under ``root`` (see ``avatar.batch.discover``)."""
    root: Path
    """Folder holding one folder per subject (``CoreView_377`` / ``my_377``, ``female-3-casual``, any name for
    synthetic subjects)."""
    out: Path
    """Results folder: ``subjects/<id>/`` per subject, the tables at its top."""
    subjects: tuple[str, ...] = ()
    """Subject ids to run (``377`` or the folder name ``CoreView_377``); empty: every subject found under ``root``."""
    protocol: str | None = None
    """Evaluation protocol (``avatar.data.protocols`` name or an alias: ``gauhuman``/``gart`` = zju_monocular on
    ZJU-MoCap, ``peoplesnapshot`` = each subject's own split). None: zju_monocular, peoplesnapshot/<subject>, and for
    synthetic subjects the ``synthetic`` rule (``avatar.batch.discover.synthetic_splits``)."""
    preset: Literal["fast", "quality"] = "fast"
    """Fitting preset (``configs/presets.py``)."""
    steps: int | None = None
    """Override of the preset's optimizer steps."""
    num_gaussians: int | None = None
    """Override of the preset's initial Gaussian count."""
    downscale: int | None = None
    """Override of the preset's training-image downscale factor."""
    seed: int = 0
    """Seed of every fit and evaluation (the same seed gives the same metrics on either backend)."""
    crop: Literal["none", "bbox"] = "none"
    """Evaluation crop: whole image, or the GT mask's bounding box (GauHuman's evaluation)."""
    backend: Literal["local", "ray"] = "local"
    """``local``: a process pool on this machine; ``ray``: Ray tasks (on ``address``, or a local Ray started for the
    run)."""
    address: str | None = None
    """Ray cluster address (``auto`` = the running cluster); None starts a local Ray bound to 127.0.0.1."""
    workers: int | None = None
    """Concurrent jobs; None: min(cores, available memory / ``job_memory_gb``). Locally the pool's size; a local Ray
    gets ``workers x threads`` CPUs; on an existing cluster Ray places the tasks by their CPU/GPU requests."""
    threads: int | None = None
    """torch / numba threads of each job; None: cores // workers (at least 1). Fixed per run so results do not
    depend on the backend."""
    job_memory_gb: float = 3.0
    """Memory one job needs (sizes the local pool)."""
    device: str | None = None
    """Torch device of each job ("cpu", "cuda"); None: "cuda" for Ray jobs granted a GPU, else the CPU."""
    smpl_dir: Path | None = None
    """Folder with the SMPL model files (real ZJU-MoCap / PeopleSnapshot data store SMPL parameters)."""
    retry_failed: bool = True
    """Rerun subjects whose result records a failure (a valid success is never redone)."""
    export: bool = True
    """Write the avatar bundle and canonical .ply of each subject (the table's file size is the bundle's)."""

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"BatchConfig.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"BatchConfig.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.preset not in ("fast", "quality"):
            raise ValueError(f"BatchConfig.preset must be 'fast' or 'quality', got {self.preset!r}")
        if self.crop not in ("none", "bbox"):
            raise ValueError(f"BatchConfig.crop must be 'none' or 'bbox', got {self.crop!r}")
        for name in ("workers", "threads", "steps", "num_gaussians", "downscale"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"BatchConfig.{name} must be a positive int or None, got {v!r}")
        if not self.job_memory_gb > 0:
            raise ValueError(f"BatchConfig.job_memory_gb must be > 0, got {self.job_memory_gb}")
        if self.address is not None and self.backend != "ray":
            raise ValueError("BatchConfig.address is only used with backend='ray'")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass(frozen=True)
class SubjectJob:
    """Everything one subject's job needs, as plain values (pickled to a pool worker or a Ray task)."""

    subject_id: str
    """Id in the tables (``377``, ``female-3-casual``, a synthetic folder's name)."""
    folder: str
    """The subject's dataset folder."""
    dataset: str
    """``zju_mocap``, ``peoplesnapshot`` or ``synthetic``."""
    protocol: str
    """Resolved protocol name, or ``synthetic`` for the synthetic split rule."""
    out_dir: str
    """``RESULTS/subjects/<id>``."""
    preset: str
    fit_overrides: tuple[tuple[str, int], ...]
    """(FitConfig field, value) pairs applied on top of the preset (seed included)."""
    seed: int
    crop: str
    threads: int
    """torch and numba threads of this job."""
    device: str | None
    smpl_dir: str | None
    export: bool
    run_id: str
    """Id of the batch run that (re)computes this subject; kept in its result to show it was not redone."""
    fit_kwargs: dict = field(default_factory=dict, compare=False)
    """Extra keyword overrides of FitConfig fields that are not ints (rarely needed; part of the key)."""

    @property
    def key(self) -> str:
        """Hash of what the user asked for (not where, when, or with how many threads or which device it runs): a
        result with another key is stale and is redone; one with the same key is kept even when it was computed
        on another machine (its record names the threads and device)."""
        ident = dict(subject=self.subject_id, folder=str(Path(self.folder).resolve()), dataset=self.dataset,
                     protocol=self.protocol, preset=self.preset, fit=list(self.fit_overrides), seed=self.seed,
                     crop=self.crop, export=self.export,
                     fit_kwargs=json.loads(json.dumps(self.fit_kwargs, sort_keys=True, default=str)))
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

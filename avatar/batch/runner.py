"""``run_batch(cfg)``: discover subjects, skip the finished ones, run the rest on a backend, write the tables.

Resumability lives in the files: a subject whose ``subjects/<id>/result.json`` parses, is complete and was written
for the same configuration (``SubjectJob.key``) is not run again; a missing, corrupt or stale one is redone, and so
is a recorded failure unless ``retry_failed`` is off. Interrupted fits resume from their checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from avatar.batch import backends
from avatar.batch.config import BatchConfig, SubjectJob
from avatar.batch.discover import resolve_protocol, select_subjects
from avatar.batch.job import read_result
from avatar.batch.table import NAMES, write_tables
from avatar.io import atomic_write_text

SUBJECTS_DIR = "subjects"
RUN_FILE = "batch.json"


@dataclass(frozen=True)
class SubjectOutcome:
    """One subject of the run: its record (the ``result.json`` contents) and whether this run computed it."""

    subject: str
    record: dict[str, Any]
    skipped: bool
    """True when a valid result from an earlier run was kept."""

    @property
    def ok(self) -> bool:
        return self.record.get("status") == "ok"


@dataclass(frozen=True)
class BatchResult:
    """outcomes: per subject in the order asked. tables: paths by kind (csv, markdown, json, png)."""

    run_id: str
    out: Path
    outcomes: tuple[SubjectOutcome, ...]
    tables: dict[str, Path]
    workers: int
    threads: int
    backend: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(o.subject for o in self.outcomes if not o.ok)

    @property
    def exit_code(self) -> int:
        """0 when every subject has a successful result (computed now or kept), 1 when any failed."""
        return 1 if self.failed else 0


ResultHook = Callable[[SubjectOutcome, int, int], None]


def _progress(outcome: SubjectOutcome, done: int, total: int) -> None:
    rec = outcome.record
    head = f"[batch] {done}/{total} {outcome.subject}:"
    if outcome.skipped:
        print(f"{head} done earlier (run {rec.get('run_id')}), kept", flush=True)
    elif outcome.ok:
        m = rec["metrics"]
        print(f"{head} ok in {rec.get('total_seconds', 0):.1f} s; "
              + "; ".join(f"{k} PSNR {v['psnr']:.2f} SSIM {v['ssim']:.4f}" for k, v in m.items())
              + f"; {rec['gaussians']} Gaussians", flush=True)
    else:
        print(f"{head} FAILED: {rec.get('error')} (log: {rec.get('log')})", flush=True)


def make_jobs(cfg: BatchConfig, threads: int, device: str | None, run_id: str) -> list[SubjectJob]:
    """One ``SubjectJob`` per selected subject (protocols resolved and validated here, before anything runs)."""
    subjects = select_subjects(cfg.dataset, cfg.root, cfg.subjects)
    overrides = {"seed": cfg.seed}
    for name in ("steps", "num_gaussians", "downscale"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    return [SubjectJob(subject_id=s.id, folder=str(s.folder), dataset=cfg.dataset,
                       protocol=resolve_protocol(cfg.dataset, cfg.protocol, s),
                       out_dir=str(Path(cfg.out) / SUBJECTS_DIR / s.id), preset=cfg.preset,
                       fit_overrides=tuple(sorted(overrides.items())), seed=cfg.seed, crop=cfg.crop, threads=threads,
                       device=device, smpl_dir=None if cfg.smpl_dir is None else str(cfg.smpl_dir),
                       export=cfg.export, run_id=run_id)
            for s in subjects]


def run_batch(cfg: BatchConfig, on_result: ResultHook | None = _progress,
              fit_kwargs: dict | None = None) -> BatchResult:
    """Run the batch described by ``cfg``; returns every subject's outcome and the table paths.

    ``on_result(outcome, done, total)`` is called in this process after each subject (kept or finished), in the
    order they end; the default prints progress. An exception it raises stops the run like a kill: running jobs are
    terminated (local) or cancelled (Ray), and finished subjects keep their results. ``fit_kwargs``: extra
    ``FitConfig`` overrides (part of each job's key).
    """
    t0 = time.perf_counter()
    cfg.validate()
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset root folder")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    workers, threads = backends.parallelism(cfg.workers, cfg.threads, cfg.job_memory_gb)
    jobs = make_jobs(cfg, threads, cfg.device, run_id)
    if fit_kwargs:
        jobs = [dataclasses.replace(j, fit_kwargs=dict(fit_kwargs)) for j in jobs]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    total = len(jobs)
    outcomes: dict[str, SubjectOutcome] = {}
    todo: list[SubjectJob] = []
    notes: list[str] = []
    for job in jobs:
        rec, why = read_result(job.out_dir, job.key)
        if rec is not None and (rec["status"] == "ok" or not cfg.retry_failed):
            outcomes[job.subject_id] = SubjectOutcome(job.subject_id, rec, skipped=True)
        else:
            if rec is None and why != "no result":
                print(f"[batch] {job.subject_id}: redoing ({why})", flush=True)
            todo.append(job)
    atomic_write_text(out / RUN_FILE, json.dumps({
        "run_id": run_id, "config": cfg.to_json(), "workers": workers, "threads": threads,
        "subjects": [j.subject_id for j in jobs], "to_run": [j.subject_id for j in todo],
        "keys": {j.subject_id: j.key for j in jobs}, "started": datetime.now(timezone.utc).isoformat()}, indent=2))
    print(f"[batch] {total} subjects, {len(todo)} to run on {cfg.backend} ({workers} workers x {threads} threads); "
          f"results in {out}", flush=True)
    done = 0
    for o in outcomes.values():
        done += 1
        if on_result is not None:
            on_result(o, done, total)
    def consume(stream) -> None:
        nonlocal done
        # closing(): an exception in on_result must stop the workers now, not when the generator is collected
        with contextlib.closing(stream):
            for rec in stream:
                done += 1
                o = SubjectOutcome(rec["subject"], rec, skipped=False)
                outcomes[o.subject] = o
                if on_result is not None:
                    on_result(o, done, total)

    if todo:
        if cfg.backend == "local":
            consume(backends.run_local(todo, workers))
        else:
            with backends.ray_session(cfg.address, workers * threads) as ray:
                gpus = 1.0 if backends.ray_has_gpus(ray) and cfg.device in (None, "cuda") else 0.0
                if gpus:
                    todo = [dataclasses.replace(j, device="cuda") for j in todo]
                    notes.append("Ray jobs ran with one GPU each.")
                consume(backends.run_ray(todo, ray, gpus))
    ordered = tuple(outcomes[j.subject_id] for j in jobs)
    recs = [o.record for o in ordered]
    lpips_info = sorted({r.get("lpips_info") for r in recs if r.get("status") == "ok" and not r.get("lpips_available")}
                        - {None})
    if lpips_info:
        notes.append("LPIPS unavailable: " + "; ".join(lpips_info))
    protocols = sorted({j.protocol for j in jobs})
    title = f"{cfg.dataset} — protocol {', '.join(protocols)}, preset {cfg.preset}, seed {cfg.seed}"
    meta = {"run_id": run_id, "dataset": cfg.dataset, "protocols": protocols, "preset": cfg.preset, "seed": cfg.seed,
            "crop": cfg.crop, "backend": cfg.backend, "workers": workers, "threads": threads,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tables = write_tables(recs, out, title, notes, meta)
    res = BatchResult(run_id, out, ordered, tables, workers, threads, cfg.backend, time.perf_counter() - t0, notes)
    print(f"[batch] {total - len(res.failed)}/{total} subjects ok ({sum(o.skipped for o in ordered)} kept from "
          f"earlier runs) in {res.seconds:.1f} s; table: {out / NAMES['markdown']}", flush=True)
    return res

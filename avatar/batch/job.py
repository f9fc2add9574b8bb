"""One subject's job: fit, evaluate on novel views and novel poses, export; its result file and log.

``run_subject(job)`` is the function both backends execute (a spawned pool worker or a Ray task). It never raises
for a failure of the subject: it catches it, writes ``result.json`` with ``status: "failed"``, the error and the
traceback's tail, and returns that record, so one bad subject cannot stop the others. Everything the job prints
goes to ``<out>/job.log`` (appended per attempt, with a header naming the run).

Determinism: the job sets torch's and numba's thread counts to ``job.threads`` and seeds torch's global generator
with ``job.seed`` before anything runs; the fit and the evaluation take explicit seeded generators; the CPU
rasterizer reduces without atomics. So one job gives bit-identical metrics wherever it runs with the same
thread count (which the batch runner fixes per run, independently of the backend).

The fit-evaluate-export sequence mirrors ``tools/fit_avatar.py`` (which also writes videos and geometry errors);
it is composed here from the library so that the batch package does not import a CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from avatar.batch.config import SubjectJob
from avatar.batch.discover import SYNTHETIC_RULE, synthetic_splits
from avatar.io import atomic_write_text

RESULT_FORMAT = "avatar-batch-result"
RESULT_VERSION = 1
RESULT_FILE = "result.json"
JOB_FILE = "job.json"
LOG_FILE = "job.log"
SPLITS = ("novel_view", "novel_pose")
TRACEBACK_LINES = 25


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def set_threads(threads: int) -> None:
    """torch intra-op threads and numba's threads of this process (a fixed count keeps reductions reproducible)."""
    import torch

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # numba is a dependency; without it the CPU rasterizer is not used either
        pass


def _base_record(job: SubjectJob) -> dict[str, Any]:
    return {"format": RESULT_FORMAT, "version": RESULT_VERSION, "subject": job.subject_id, "key": job.key,
            "run_id": job.run_id, "dataset": job.dataset, "folder": job.folder, "protocol": job.protocol,
            "preset": job.preset, "seed": job.seed, "threads": job.threads, "device": job.device or "cpu",
            "host": platform.node(), "pid": os.getpid(), "log": str(Path(job.out_dir) / LOG_FILE)}


def failed_record(job: SubjectJob, error: BaseException | str, tb: str = "") -> dict[str, Any]:
    """The result of a subject that failed: the error as ``Type: message`` and the last lines of its traceback."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    tail = "\n".join(tb.rstrip().splitlines()[-TRACEBACK_LINES:])
    return _base_record(job) | {"status": "failed", "error": msg, "traceback": tail, "finished": _now()}


def write_result(out_dir: str | Path, record: dict[str, Any]) -> Path:
    """``out_dir/result.json``, atomically (a killed run leaves the old file or none, never half of one)."""
    return atomic_write_text(Path(out_dir) / RESULT_FILE, json.dumps(record, indent=2, allow_nan=False))


def read_result(out_dir: str | Path, key: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """(the record of ``out_dir/result.json``, "") when it is a complete result (for ``key`` when given), else
    (None, why not): missing, unreadable, not JSON, another format, another job's key, or fields missing."""
    path = Path(out_dir) / RESULT_FILE
    if not path.exists():
        return None, "no result"
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path}: corrupt ({type(err).__name__}: {err})"
    if not isinstance(rec, dict) or rec.get("format") != RESULT_FORMAT or rec.get("version") != RESULT_VERSION:
        return None, f"{path}: not a {RESULT_FORMAT} v{RESULT_VERSION} file"
    if key is not None and rec.get("key") != key:
        return None, f"{path}: written for another configuration (key {rec.get('key')!r}, now {key!r})"
    status = rec.get("status")
    if status == "failed":
        return (rec, "") if isinstance(rec.get("error"), str) else (None, f"{path}: failed result without an error")
    if status != "ok":
        return None, f"{path}: unknown status {status!r}"
    metrics = rec.get("metrics")
    needed = ("gaussians", "fit_seconds", "bundle_bytes", "run_id")
    if not isinstance(metrics, dict) or not metrics or any(k not in rec for k in needed):
        return None, f"{path}: incomplete (metrics or {', '.join(needed)} missing)"
    for split, m in metrics.items():
        if not isinstance(m, dict) or not all(isinstance(m.get(k), (int, float)) for k in ("psnr", "ssim")):
            return None, f"{path}: split {split!r} lacks numeric psnr / ssim"
    return rec, ""


def _datasets(job: SubjectJob, body):
    """(train, {split: dataset}, background) of the job's protocol."""
    from avatar.data import AvatarDataset, get_protocol

    root = Path(job.folder)
    smpl = job.smpl_dir
    if job.protocol == SYNTHETIC_RULE:
        everything = AvatarDataset(root, None, body_model=body, resolution=None)
        subj = everything.subject
        num_cameras = subj.num_cameras if everything.layout == "zju" else 1
        rule = synthetic_splits(subj.num_frames, num_cameras)
        sets = {name: AvatarDataset(root, None, body_model=body, resolution=None, frames=fr, cameras=cams)
                for name, (fr, cams) in rule.items()}
        return sets.pop("train"), sets, "black"
    proto = get_protocol(job.protocol)
    fit = "scale" if job.dataset == "synthetic" else "error"  # generated subjects are shorter than the protocol
    kw = dict(fit=fit, body_model=body, smpl_model_path=smpl)
    train = AvatarDataset(root, proto, "train", **kw)
    tests = {s: AvatarDataset(root, proto, s, **kw) for s in SPLITS if s in proto.split_names}
    return train, tests, proto.background


def _body_model(job: SubjectJob):
    from avatar.body import AnnyBody, load_body_model
    from avatar.data import read_body_model_info

    info = read_body_model_info(Path(job.folder))
    return AnnyBody() if info.name == "anny" else load_body_model(info.name, model_path=job.smpl_dir)


def _cpu(gaussians):
    return dataclasses.replace(gaussians, **{f.name: getattr(gaussians, f.name).cpu() for f in
                                             dataclasses.fields(gaussians) if getattr(gaussians, f.name) is not None})


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fit_evaluate_export(job: SubjectJob, out: Path) -> dict[str, Any]:
    import torch

    from avatar.eval import evaluate
    from avatar.export.bundle import save_bundle
    from avatar.export.ply import write_splat_ply
    from avatar.fit.job import fit_subject, frame_to
    from avatar.render import render_gaussian_set
    from configs.presets import preset

    t0 = time.perf_counter()
    body = _body_model(job)
    train, tests, background = _datasets(job, body)
    if not tests:
        raise ValueError(f"{job.folder}: protocol {job.protocol!r} has no novel_view or novel_pose split")
    cfg = preset(job.preset, **dict(job.fit_overrides), **job.fit_kwargs)
    print(f"[job] {len(train)} training frames; splits {', '.join(f'{k}: {len(v)}' for k, v in tests.items())}; "
          f"config {json.dumps(dataclasses.asdict(cfg), default=str)}", flush=True)
    t_data = time.perf_counter() - t0
    result = fit_subject(train, body, cfg, out / "fit", resume=True, progress=False, device=job.device)
    avatar, refiner = result.avatar, result.refiner
    dev = avatar.means.device
    shape = train[0].shape.to(dev)
    refined = set() if refiner is None else {int(f) for f in refiner.frame_ids.tolist()}

    def transforms_of(frame):
        pose = frame_to(frame, dev).pose
        if refiner is not None and int(frame.frame_id) in refined:
            pose = refiner(pose, frame.frame_id)  # training frames seen from new cameras: the corrected pose
        t, _ = body.bone_transforms(pose, shape)
        return t[0].float()

    def render_fn(frame):
        r = render_gaussian_set(avatar.posed(transforms_of(frame)), frame_to(frame, dev).camera, background=None,
                                backend=cfg.backend)
        return r.colors[0].cpu(), r.alphas[0].cpu()

    bg = (0.0, 0.0, 0.0) if background == "black" else (1.0, 1.0, 1.0)
    t1 = time.perf_counter()
    with torch.no_grad():
        report = evaluate(render_fn, tests, background=bg, crop=job.crop, out_dir=out / "eval", seed=job.seed)
    t_eval = time.perf_counter() - t1
    bundle_bytes = None
    if job.export:
        with torch.no_grad():
            canonical = _cpu(avatar.canonical())
            save_bundle(out / "avatar", canonical, body.name, body.bone_names, body.bone_parents, shape.float().cpu(),
                        {"fit": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), "data": job.folder,
                         "batch_key": job.key},
                        {f"state.{k}": v.detach().cpu() for k, v in avatar.state_dict().items()},
                        shape_names=body.shape_names, overwrite=True)
            write_splat_ply(out / "canonical.ply", canonical)
        bundle_bytes = _folder_bytes(out / "avatar")
    metrics = {name: {"frames": s.num_frames, "psnr": s.psnr, "ssim": s.ssim, "lpips": s.lpips}
               for name, s in report.splits.items()}
    hist = result.history
    return {"status": "ok", "metrics": metrics, "lpips_info": report.lpips_reason,
            "lpips_available": report.lpips_available, "gaussians": avatar.num_gaussians,
            "train_frames": len(train), "fit_steps": cfg.steps, "fit_seconds": result.seconds,
            "data_seconds": t_data, "eval_seconds": t_eval, "bundle_bytes": bundle_bytes,
            "final_train_psnr": float(hist[-1]["psnr"]) if hist and "psnr" in hist[-1] else None,
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}


def _reset_if_stale(job: SubjectJob, out: Path) -> None:
    """Checkpoints of another configuration cannot be resumed: drop them when ``job.json`` names another key."""
    import shutil

    path = out / JOB_FILE
    try:
        old = json.loads(path.read_text()).get("key") if path.exists() else None
    except (OSError, json.JSONDecodeError, AttributeError):
        old = "unreadable"
    if old is not None and old != job.key:
        shutil.rmtree(out / "fit", ignore_errors=True)
        print(f"[job] dropped checkpoints of another configuration (key {old})", flush=True)
    atomic_write_text(path, json.dumps({"key": job.key, **{k: v for k, v in dataclasses.asdict(job).items()
                                                           if k != "fit_kwargs"}}, indent=2, default=str))


def run_subject(job: SubjectJob) -> dict[str, Any]:
    """Run one subject's job and write its ``result.json``; returns the record (``status`` "ok" or "failed")."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = _now()
    t0 = time.perf_counter()
    with open(out / LOG_FILE, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print(f"==== {started} run {job.run_id} subject {job.subject_id} ({job.folder}) pid {os.getpid()} "
              f"threads {job.threads} device {job.device or 'cpu'}", flush=True)
        try:
            import torch

            set_threads(job.threads)
            torch.manual_seed(job.seed)
            _reset_if_stale(job, out)
            record = _base_record(job) | _fit_evaluate_export(job, out)
            record |= {"started": started, "finished": _now(), "total_seconds": time.perf_counter() - t0}
            nv = record["metrics"]
            print("[job] ok: " + "; ".join(f"{k} PSNR {v['psnr']:.3f} SSIM {v['ssim']:.4f}" for k, v in nv.items()),
                  flush=True)
        except Exception as err:  # noqa: BLE001 - a subject's failure is its result, not the batch's
            tb = traceback.format_exc()
            print(tb, flush=True)
            record = failed_record(job, err, tb) | {"started": started, "total_seconds": time.perf_counter() - t0}
        write_result(out, record)
    return record

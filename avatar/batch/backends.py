"""Where jobs run: a local process pool (``concurrent.futures`` with the spawn context) or Ray tasks.

No scheduling of our own: the pool and Ray decide placement; each backend only submits every job, yields each
record as its job finishes (for progress and resumability) and turns a crashed worker into a failed record of that
subject. A local Ray started here is kept on 127.0.0.1 (see ``loopback_ray_env``) and stopped at the end; a cluster
given by address is only connected to.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from avatar.batch.config import SubjectJob
from avatar.batch.job import failed_record, read_result, run_subject, write_result

# Measured with Ray 2.60 on this project's machines (ARCHITECTURE.md): by default Ray listens on every interface and
# --node-ip-address=127.0.0.1 alone does not change that; with this variable at 0 every socket stays on 127.0.0.1.
# Usage stats would otherwise try to report to the network.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def available_memory_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GiB, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def parallelism(workers: int | None, threads: int | None, job_memory_gb: float) -> tuple[int, int]:
    """(concurrent jobs, threads per job): jobs = min(cores, available memory / per-job memory) unless given;
    threads = cores // jobs (at least 1) unless given. The same rule for both backends, so a seed gives the same
    thread count, hence the same metrics, on either."""
    cores = cpu_count()
    if workers is None:
        mem = available_memory_gb()
        by_mem = cores if mem is None else max(1, int(mem // job_memory_gb))
        workers = max(1, min(cores, by_mem))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


def _crashed(job: SubjectJob, err: BaseException) -> dict[str, Any]:
    """A record for a job whose worker died (the job itself could not write one)."""
    import traceback

    rec = failed_record(job, f"worker failed: {type(err).__name__}: {err}",
                        "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    write_result(job.out_dir, rec)
    return rec


def _die_with_parent(parent: int) -> None:
    """Pool-worker initializer: on Linux, ask the kernel to SIGKILL this worker when the driver dies, so a killed
    run leaves no orphan still fitting (and writing) a subject that the next run is about to redo."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the driver died before the call above
        os._exit(1)


def run_local(jobs: Sequence[SubjectJob], workers: int) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` on a spawn-context process pool of ``min(workers, len(jobs))`` processes; yield each record as
    its job ends. If the consumer stops early (an exception, Ctrl-C), the pool's processes are terminated, as a
    killed run would be; finished subjects keep their result files."""
    if not jobs:
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    clean = False
    try:
        futures = {pool.submit(run_subject, job): job for job in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                rec = fut.result()
            except Exception as err:  # noqa: BLE001 - BrokenProcessPool (a worker died) or a pickling error
                rec = _crashed(job, err)
            yield rec
        clean = True
    finally:
        if not clean:
            # concurrent.futures has no public "terminate workers" before Python 3.14.
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                with contextlib.suppress(Exception):
                    proc.terminate()
        pool.shutdown(wait=clean, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("backend 'ray' needs the ray package: pip install ray (plain ray, not ray[default])") \
            from None
    return ray


@contextlib.contextmanager
def _loopback_env() -> Iterator[Any]:
    """``LOOPBACK_RAY_ENV`` in ``os.environ`` (inherited by the GCS, raylet and workers) and in Ray's own constant,
    which Ray reads from the environment once, when ``ray`` is first imported: a driver that imported ray before
    (a test, a notebook) would otherwise pick a non-loopback node address. Yields the ray module; everything is
    restored on exit."""
    saved = {k: os.environ.get(k) for k in LOOPBACK_RAY_ENV}
    os.environ.update(LOOPBACK_RAY_ENV)
    try:
        ray = _import_ray()
        from ray._private import ray_constants

        was = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield ray
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = was
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address``, or start a local Ray with ``num_cpus`` CPUs bound to 127.0.0.1
    (and no usage reporting) and stop it on exit. A Ray already initialized in this process is used as it is."""
    if address is not None:
        ray = _import_ray()
        if ray.is_initialized():
            yield ray
            return
        ray.init(address=address, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    with _loopback_env() as ray:
        if ray.is_initialized():
            yield ray
            return
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            ip = ray.util.get_node_ip_address()
            if ip != "127.0.0.1":
                raise RuntimeError(f"the local Ray started on {ip}, not 127.0.0.1; refusing to run")
            yield ray
        finally:
            ray.shutdown()


def ray_has_gpus(ray) -> bool:
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def run_ray(jobs: Sequence[SubjectJob], ray, num_gpus: float = 0.0) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` as Ray tasks (``num_cpus`` = the job's threads, ``num_gpus`` each, no retries: a retried job
    would be a second attempt with the same seed, so a crash is reported instead); yield records as they end.
    Records are also written on the driver's side, so resuming works when the workers' disks are not shared."""
    if not jobs:
        return
    remote = ray.remote(run_subject)
    refs = {remote.options(num_cpus=job.threads, num_gpus=num_gpus, max_retries=0).remote(job): job for job in jobs}
    pending = list(refs)
    clean = False
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                job = refs[ref]
                try:
                    rec = ray.get(ref)
                    mine, _ = read_result(job.out_dir, job.key)
                    if mine != rec:  # the worker wrote it on another node's disk
                        write_result(job.out_dir, rec)
                except Exception as err:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                    rec = _crashed(job, err)
                yield rec
        clean = True
    finally:
        if not clean:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

"""``batch_reconstruct``: fit, evaluate and export every subject of a dataset, locally or on Ray; write the table.

    batch_reconstruct --dataset zju_mocap --root DIR --subjects 377 386 387 392 393 394 --protocol gauhuman \\
        --smpl-dir MODELS --out RESULTS
    batch_reconstruct --dataset peoplesnapshot --root DIR --out RESULTS
    batch_reconstruct --dataset synthetic --root DIR --backend ray --out RESULTS          # a local Ray on 127.0.0.1
    batch_reconstruct --dataset zju_mocap --root DIR --backend ray --address auto ...     # an existing cluster

Writes ``RESULTS/subjects/<id>/`` (result.json, job.log, eval/, avatar/, canonical.ply, fit/checkpoints/) and
``RESULTS/results.{csv,md,json,png}``. Rerunning the same command skips the finished subjects.

Exit status: 0 when every subject has a successful result, 1 when any subject failed (the table is still written and
lists each failure with its error), 2 for a bad command line (missing root, unknown subject or protocol).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import tyro


@dataclasses.dataclass
class BatchReconstructArgs:
    dataset: Literal["zju_mocap", "peoplesnapshot", "synthetic"]
    """Kind of the subject folders under --root."""
    root: Path
    """Folder holding one folder per subject."""
    out: Path = Path("out/batch")
    """Results folder."""
    subjects: tuple[str, ...] = ()
    """Subject ids or folder names (default: every subject under --root)."""
    protocol: str | None = None
    """Evaluation protocol or alias (gauhuman, gart, zju_monocular, zju_3dgs_avatar, zju_multiview, peoplesnapshot);
    default: zju_monocular, peoplesnapshot/<subject>, the synthetic split rule."""
    preset: Literal["fast", "quality"] = "fast"
    """Fitting preset."""
    steps: int | None = None
    """Override the preset's number of steps."""
    backend: Literal["local", "ray"] = "local"
    """Local process pool or Ray."""
    address: str | None = None
    """Ray cluster address ("auto": the running cluster); default: a local Ray bound to 127.0.0.1."""
    workers: int | None = None
    """Concurrent jobs (default: from cores and memory)."""
    threads: int | None = None
    """Threads per job (default: cores // workers)."""
    seed: int = 0
    """Seed of every fit and evaluation."""
    crop: Literal["none", "bbox"] = "none"
    """Evaluate on the whole image or inside the GT mask's bounding box (GauHuman)."""
    smpl_dir: Path | None = None
    """Folder with the SMPL model files (real datasets)."""
    device: str | None = None
    """Torch device of each job (default: cuda for Ray jobs given a GPU, else cpu)."""
    retry_failed: bool = True
    """Rerun subjects whose earlier result is a failure."""


def config_of(args: BatchReconstructArgs):
    from avatar.batch import BatchConfig

    return BatchConfig(dataset=args.dataset, root=args.root, out=args.out, subjects=tuple(args.subjects),
                       protocol=args.protocol, preset=args.preset, steps=args.steps, seed=args.seed, crop=args.crop,
                       backend=args.backend, address=args.address, workers=args.workers, threads=args.threads,
                       device=args.device, smpl_dir=args.smpl_dir, retry_failed=args.retry_failed)


def run(args: BatchReconstructArgs):
    from avatar.batch import run_batch

    return run_batch(config_of(args))


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(BatchReconstructArgs, args=argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"batch_reconstruct: error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""Batch reconstruction: one fit + evaluation + export job per subject, on a local process pool or Ray.

``run_batch(BatchConfig(...))`` finds the subjects, skips those with a valid result, runs the others (each writes
``RESULTS/subjects/<id>/result.json`` atomically and a log), and writes the results table (CSV, Markdown, JSON, PNG).
Importing this package does not import ray (only the Ray backend does, when it runs).
"""

from avatar.batch.config import BatchConfig, SubjectJob
from avatar.batch.discover import Subject, find_subjects, resolve_protocol, select_subjects, synthetic_splits
from avatar.batch.job import read_result, run_subject
from avatar.batch.runner import BatchResult, SubjectOutcome, run_batch

__all__ = [
    "BatchConfig",
    "SubjectJob",
    "Subject",
    "find_subjects",
    "resolve_protocol",
    "select_subjects",
    "synthetic_splits",
    "read_result",
    "run_subject",
    "BatchResult",
    "SubjectOutcome",
    "run_batch",
]

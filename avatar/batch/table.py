"""The results table of a batch: per-subject and mean metrics as CSV, Markdown, JSON and a bar-chart PNG.

Layout follows the per-subject tables of GauHuman / GART / Instant-NVR: one row per subject and a ``Mean`` row,
columns PSNR (dB, higher is better), SSIM (higher), LPIPS x1000 (lower) for novel view then novel pose, then fitting
time, Gaussian count and file size; the Markdown also has the transposed form (subjects as columns) that those
papers use for ZJU-MoCap subjects. Means are over the subjects that succeeded and have the split. LPIPS without
local backbone weights is "n/a" with the reason, never a number.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avatar.io import atomic_file, atomic_write_text

TABLE_FORMAT = "avatar-batch-table"
TABLE_VERSION = 1
SPLITS = ("novel_view", "novel_pose")
SPLIT_TITLE = {"novel_view": "Novel view", "novel_pose": "Novel pose"}
NAMES = {"csv": "results.csv", "markdown": "results.md", "json": "results.json", "png": "results.png"}


@dataclass(frozen=True)
class TableRow:
    """One subject (or the mean). Metric fields are None where the split is absent, LPIPS unavailable, or the
    subject failed; ``size_mb`` is the exported bundle's size in MB (10^6 bytes)."""

    subject: str
    status: str  # "ok", "failed", or "mean"
    novel_view_psnr: float | None
    novel_view_ssim: float | None
    novel_view_lpips_x1000: float | None
    novel_pose_psnr: float | None
    novel_pose_ssim: float | None
    novel_pose_lpips_x1000: float | None
    fit_seconds: float | None
    gaussians: float | None  # an int per subject, the mean may be fractional
    size_mb: float | None
    error: str = ""
    run_id: str = ""


METRIC_FIELDS = ("novel_view_psnr", "novel_view_ssim", "novel_view_lpips_x1000", "novel_pose_psnr",
                 "novel_pose_ssim", "novel_pose_lpips_x1000", "fit_seconds", "gaussians", "size_mb")


def row_of(record: dict[str, Any]) -> TableRow:
    """The table row of one ``result.json`` record."""
    vals: dict[str, float | None] = {k: None for k in METRIC_FIELDS}
    if record.get("status") == "ok":
        for split in SPLITS:
            m = record["metrics"].get(split)
            if m is None:
                continue
            vals[f"{split}_psnr"] = float(m["psnr"])
            vals[f"{split}_ssim"] = float(m["ssim"])
            lp = m.get("lpips")
            vals[f"{split}_lpips_x1000"] = None if lp is None else 1000.0 * float(lp)
        vals["fit_seconds"] = float(record["fit_seconds"])
        vals["gaussians"] = int(record["gaussians"])
        b = record.get("bundle_bytes")
        vals["size_mb"] = None if b is None else float(b) / 1e6
    err = record.get("error", "") if record.get("status") != "ok" else ""
    return TableRow(str(record["subject"]), str(record.get("status")), **vals, error=err,
                    run_id=str(record.get("run_id", "")))


def mean_row(rows: list[TableRow]) -> TableRow:
    """Means over the succeeded rows that have each value."""
    ok = [r for r in rows if r.status == "ok"]
    vals = {}
    for f in METRIC_FIELDS:
        xs = [getattr(r, f) for r in ok if getattr(r, f) is not None]
        vals[f] = math.fsum(xs) / len(xs) if xs else None
    failed = len(rows) - len(ok)
    return TableRow("Mean", "mean", **vals, error=f"{failed} failed" if failed else "")


def _fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


DIGITS = {"psnr": 2, "ssim": 4, "lpips_x1000": 1, "fit_seconds": 1, "gaussians": 0, "size_mb": 2}


def _digits(field: str) -> int:
    for k, d in DIGITS.items():
        if field.endswith(k):
            return d
    return 3


def table_csv(rows: list[TableRow]) -> str:
    """Every row (subjects, then Mean) with full-precision numbers; empty cells for missing values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fields = ["subject", "status", *METRIC_FIELDS, "error", "run_id"]
    w.writerow(fields)
    for r in rows:
        d = asdict(r)
        w.writerow(["" if d[f] is None else (repr(d[f]) if isinstance(d[f], float) else d[f]) for f in fields])
    return buf.getvalue()


def table_markdown(rows: list[TableRow], title: str, notes: list[str]) -> str:
    """Subjects as rows (GART / GauHuman supplementary layout), then subjects as columns (Instant-NVR / GauHuman
    per-subject tables), then the failures with their errors."""
    head = ["Subject"]
    for split in SPLITS:
        t = SPLIT_TITLE[split]
        head += [f"{t} PSNR↑", f"{t} SSIM↑", f"{t} LPIPS*↓ (x1000)"]
    head += ["Fit time (s)", "Gaussians", "Size (MB)", "Status"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        name = f"**{r.subject}**" if r.status == "mean" else r.subject
        cells = [name] + [_fmt(getattr(r, f), _digits(f)) for f in METRIC_FIELDS]
        status = {"ok": "ok", "failed": "**failed**", "mean": r.error or ""}[r.status]
        lines.append("| " + " | ".join(cells + [status]) + " |")
    lines += [""]
    # transposed: metrics as rows, subjects as columns
    cols = [r.subject for r in rows]
    lines += ["| Metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    labels = {"psnr": "PSNR↑", "ssim": "SSIM↑", "lpips_x1000": "LPIPS*↓ (x1000)"}
    for split in SPLITS:
        for k, lab in labels.items():
            f = f"{split}_{k}"
            lines.append(f"| {SPLIT_TITLE[split]} {lab} | " + " | ".join(_fmt(getattr(r, f), _digits(f)) for r in rows)
                         + " |")
    for f, lab in (("fit_seconds", "Fit time (s)"), ("gaussians", "Gaussians"), ("size_mb", "Size (MB)")):
        lines.append(f"| {lab} | " + " | ".join(_fmt(getattr(r, f), _digits(f)) for r in rows) + " |")
    lines += ["", "LPIPS* is LPIPS x1000 (lower is better); means are over the subjects that succeeded."]
    lines += [f"{n}" for n in notes]
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        lines += ["", "## Failed subjects", ""]
        lines += [f"- **{r.subject}**: `{r.error}` (log: `subjects/{r.subject}/job.log`)" for r in failed]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[TableRow], path: Path, title: str) -> Path | None:
    """Grouped bars per subject (novel view / novel pose) for PSNR, SSIM and, when available, LPIPS x1000, written
    atomically as PNG. Returns None (and says so) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        print("[batch] matplotlib is not installed: skipping the bar chart (pip install matplotlib)", flush=True)
        return None
    subj = [r for r in rows if r.status != "failed"]
    metrics = [("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑")]
    if any(getattr(r, f"{s}_lpips_x1000") is not None for r in subj for s in SPLITS):
        metrics.append(("lpips_x1000", "LPIPS x1000 ↓"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    x = list(range(len(subj)))
    width = 0.38
    for ax, (key, label) in zip(axes[0], metrics):
        for i, split in enumerate(SPLITS):
            ys = [getattr(r, f"{split}_{key}") for r in subj]
            if all(v is None for v in ys):
                continue
            ax.bar([xi + (i - 0.5) * width for xi in x], [math.nan if v is None else v for v in ys], width,
                   label=SPLIT_TITLE[split])
        ax.set_xticks(x, [r.subject for r in subj], rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if key == "ssim":
            lo = min((getattr(r, f"{s}_ssim") for r in subj for s in SPLITS if getattr(r, f"{s}_ssim") is not None),
                     default=0.0)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.grid(axis="y", alpha=0.3)
    if subj:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def write_tables(records: list[dict[str, Any]], out_dir: str | Path, title: str, notes: list[str],
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md``, ``results.json`` and ``results.png`` (if matplotlib is there) into
    ``out_dir``, each atomically; returns the paths written by kind."""
    out = Path(out_dir)
    rows = [row_of(r) for r in records]
    rows.append(mean_row(rows))
    paths = {"csv": atomic_write_text(out / NAMES["csv"], table_csv(rows)),
             "markdown": atomic_write_text(out / NAMES["markdown"], table_markdown(rows, title, notes))}
    doc = {"format": TABLE_FORMAT, "version": TABLE_VERSION, **meta, "notes": notes,
           "columns": list(METRIC_FIELDS), "rows": [asdict(r) for r in rows[:-1]], "mean": asdict(rows[-1])}
    paths["json"] = atomic_write_text(out / NAMES["json"], json.dumps(doc, indent=2, allow_nan=False, default=str))
    png = bar_chart(rows[:-1], out / NAMES["png"], title)
    if png is not None:
        paths["png"] = png
    return paths

"""Evaluate a renderer on protocol frames and write a report (JSON, Markdown, PNG grid), all atomically.

``evaluate`` does not know the model: the caller passes ``render_fn(frame) -> (rgb [H, W, 3], alpha [H, W])``.
Ground truth and prediction are composited on the protocol background (black for the ZJU-MoCap / PeopleSnapshot
protocols of REFERENCES.md): ``gt = image * mask + bg * (1 - mask)`` and, for a prediction rendered over black
(premultiplied colour, what ``rasterize_gaussians`` gives with ``background=None``), ``pred = rgb + bg * (1 - alpha)``
(``premultiplied=False``: ``rgb * alpha + bg * (1 - alpha)``).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from avatar.io import atomic_write_bytes
from avatar.data.frames import Frame
from avatar.eval.metrics import GeometryError, LpipsStatus, geometry_error, lpips_metric, psnr, ssim

REPORT_VERSION = 1
JSON_NAME, MARKDOWN_NAME, GRID_NAME = "metrics.json", "report.md", "grid.png"

RenderFn = Callable[[Frame], tuple[Tensor, Tensor]]
# (posed Gaussian centres [N, 3], ground-truth posed vertices [V, 3], faces [F, 3]) for a frame, or None to skip it
GeometryFn = Callable[[Frame], "tuple[Tensor, Tensor, Tensor] | None"]


@dataclass(frozen=True)
class FrameResult:
    """Metrics of one frame. ``lpips`` is None when LPIPS is unavailable; ``seconds`` is the render time."""

    split: str
    frame_id: int
    camera_id: str
    psnr: float
    ssim: float
    lpips: float | None
    seconds: float
    geometry: GeometryError | None = None


@dataclass(frozen=True)
class SplitSummary:
    """Means over the frames of one split (geometry means over the frames that had it)."""

    split: str
    num_frames: int
    psnr: float
    ssim: float
    lpips: float | None
    seconds_per_frame: float
    geometry: dict[str, float] | None = None


@dataclass(frozen=True)
class EvalReport:
    frames: tuple[FrameResult, ...]
    splits: dict[str, SplitSummary]
    lpips_reason: str  # what computed LPIPS, or why it is unavailable
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def lpips_available(self) -> bool:
        return all(f.lpips is not None for f in self.frames) and bool(self.frames)


# ------------------------------------------------------------------------------------------------ pure helpers
def composite(
    image: Tensor,  # [H, W, 3] in [0, 1]
    alpha: Tensor,  # [H, W] in [0, 1]
    background: Tensor,  # [3]
    premultiplied: bool = False,
) -> Tensor:  # [H, W, 3]
    """``image * alpha + bg * (1 - alpha)``, or ``image + bg * (1 - alpha)`` for a premultiplied image."""
    a = alpha[..., None].to(image.dtype)
    bg = background.to(image.device, image.dtype)
    return (image if premultiplied else image * a) + bg * (1 - a)


_CMAP = np.array([  # dark -> purple -> red -> orange -> yellow (inferno-like), for error heatmaps
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
    [252, 255, 164]], dtype=np.float64)


def error_heatmap(pred: Tensor, gt: Tensor, scale: float = 0.25) -> np.ndarray:
    """Per-pixel mean absolute error over channels, ``/ scale`` clipped to [0, 1], as uint8 [H, W, 3] colours."""
    err = (pred - gt).abs().mean(-1).detach().cpu().numpy() / scale
    x = np.clip(err, 0, 1) * (len(_CMAP) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_CMAP) - 2)
    t = (x - i)[..., None]
    return np.round(_CMAP[i] * (1 - t) + _CMAP[i + 1] * t).astype(np.uint8)


def to_uint8(image: Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8 numpy."""
    return np.round(image.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)


def make_grid(rows: list[tuple[str, Tensor, Tensor]], error_scale: float = 0.25) -> np.ndarray:
    """Rows of ``render | ground truth | error map`` (uint8 [R*H, 3*W, 3]); every cell takes the first row's size,
    and each row's label (e.g. ``novel_pose f30 c4``) is drawn in its top-left corner."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("make_grid needs at least one row")
    H, W = rows[0][1].shape[:2]
    canvas = Image.new("RGB", (3 * W, H * len(rows)))
    draw = ImageDraw.Draw(canvas)
    for r, (label, pred, gt) in enumerate(rows):
        for c, cell in enumerate((to_uint8(pred), to_uint8(gt), error_heatmap(pred, gt, error_scale))):
            im = Image.fromarray(cell)
            if im.size != (W, H):
                im = im.resize((W, H), Image.BILINEAR)
            canvas.paste(im, (c * W, r * H))
        draw.text((3, r * H + 2), label, fill=(255, 255, 255))
    return np.asarray(canvas)


def _iter_split_frames(frames) -> Iterable[tuple[str, Frame]]:
    if isinstance(frames, Mapping):
        for split, items in frames.items():
            for fr in items:
                yield str(split), fr
    else:
        for item in frames:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError("frames must be a mapping split -> iterable of Frame, or an iterable of "
                                f"(split, Frame) pairs; got an item of type {type(item).__name__}")
            yield item


def _check_render(frame: Frame, rgb: Tensor, alpha: Tensor) -> None:
    H, W = frame.image.shape[:2]
    if tuple(rgb.shape) != (H, W, 3) or tuple(alpha.shape) != (H, W):
        raise ValueError(f"render_fn for frame {frame.frame_id} camera {frame.camera_id} must return rgb "
                         f"[{H}, {W}, 3] and alpha [{H}, {W}], got {tuple(rgb.shape)} and {tuple(alpha.shape)}")


# -------------------------------------------------------------------------------------------------- evaluation
def evaluate(
    render_fn: RenderFn,
    frames: Mapping[str, Iterable[Frame]] | Iterable[tuple[str, Frame]],
    *,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    crop: str = "none",
    premultiplied: bool = True,
    lpips: LpipsStatus | str | None = "auto",
    geometry_fn: GeometryFn | None = None,
    geometry_samples: int = 20_000,
    seed: int = 0,
    out_dir: str | Path | None = None,
    grid_frames_per_split: int = 3,
    error_scale: float = 0.25,
) -> EvalReport:
    """Render every frame, composite both images on ``background`` and compute PSNR / SSIM / LPIPS per frame.

    frames:     ``{"novel_view": frames, "novel_pose": frames}`` or ``(split, frame)`` pairs.
    crop:       "none" (whole image) or "bbox" (inside the GT mask's 2D bounding box, as GauHuman evaluates).
    lpips:      "auto" (``lpips_metric()``: a number when it can run offline, else "unavailable: <reason>"), an
                ``LpipsStatus``, or None (not computed).
    geometry_fn: optional ground-truth geometry per frame (see ``GeometryFn``); adds Chamfer-like errors in mm.
    out_dir:    when given, writes ``metrics.json``, ``report.md`` and ``grid.png`` there (see ``write_report``).
    render_fn runs under ``torch.no_grad()``; its wall time per frame is reported.
    """
    if crop not in ("none", "bbox"):
        raise ValueError(f"crop must be 'none' or 'bbox', got {crop!r}")
    if lpips == "auto":
        lp = lpips_metric()
    elif lpips is None:
        lp = LpipsStatus(None, "not requested")
    elif isinstance(lpips, LpipsStatus):
        lp = lpips
    else:
        raise ValueError(f"lpips must be 'auto', an LpipsStatus or None, got {lpips!r}")
    gen = torch.Generator().manual_seed(seed)
    results: list[FrameResult] = []
    grid_rows: list[tuple[str, Tensor, Tensor]] = []
    shown: dict[str, int] = {}
    for split, frame in _iter_split_frames(frames):
        if not isinstance(frame, Frame):
            raise TypeError(f"frames of split {split!r} must be avatar.data.frames.Frame, got {type(frame).__name__}")
        bg = torch.tensor(background, dtype=frame.image.dtype, device=frame.image.device)
        with torch.no_grad():
            t0 = time.perf_counter()
            rgb, alpha = render_fn(frame)
            seconds = time.perf_counter() - t0
            _check_render(frame, rgb, alpha)
            gt = composite(frame.image, frame.mask, bg)
            pred = composite(rgb.to(gt.device, gt.dtype), alpha.to(gt.device, gt.dtype), bg, premultiplied)
            cm = frame.mask if crop == "bbox" else None
            p, s = float(psnr(pred, gt, cm)), float(ssim(pred, gt, cm))
            lv = float(lp.fn(pred, gt, cm)) if lp.fn is not None else None
            geo = None
            if geometry_fn is not None:
                g = geometry_fn(frame)
                if g is not None:
                    geo = geometry_error(g[0], g[1], g[2], geometry_samples, gen)
        results.append(FrameResult(split, int(frame.frame_id), str(frame.camera_id), p, s, lv, seconds, geo))
        if shown.get(split, 0) < grid_frames_per_split:
            shown[split] = shown.get(split, 0) + 1
            grid_rows.append((f"{split} f{frame.frame_id} c{frame.camera_id}", pred.cpu(), gt.cpu()))
    if not results:
        raise ValueError("evaluate got no frames")
    report = EvalReport(tuple(results), summarize(results), lp.reason,
                        {"background": list(background), "crop": crop, "premultiplied": premultiplied,
                         "ssim_window": 11, "geometry_samples": geometry_samples, "seed": seed,
                         "error_scale": error_scale})
    if out_dir is not None:
        write_report(report, out_dir, grid=make_grid(grid_rows, error_scale))
    return report


def summarize(results: Iterable[FrameResult]) -> dict[str, SplitSummary]:
    """Per-split means (splits in first-seen order)."""
    by_split: dict[str, list[FrameResult]] = {}
    for r in results:
        by_split.setdefault(r.split, []).append(r)
    out = {}
    for split, rs in by_split.items():
        lp = [r.lpips for r in rs]
        geos = [r.geometry for r in rs if r.geometry is not None]
        geo = None
        if geos:
            geo = {k: float(np.mean([asdict(g)[k] for g in geos]))
                   for k in ("to_mesh_mean_mm", "to_mesh_median_mm", "from_mesh_mean_mm", "from_mesh_median_mm",
                             "chamfer_mm")}
            geo["num_frames"] = len(geos)
        out[split] = SplitSummary(split, len(rs), float(np.mean([r.psnr for r in rs])),
                                  float(np.mean([r.ssim for r in rs])),
                                  None if any(v is None for v in lp) else float(np.mean(lp)),
                                  float(np.mean([r.seconds for r in rs])), geo)
    return out


# ----------------------------------------------------------------------------------------------------- writing
def _num(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else str(x)  # JSON has no inf / nan


def report_dict(report: EvalReport) -> dict[str, Any]:
    """The JSON document (see ``write_report``)."""
    unavailable = f"unavailable: {report.lpips_reason}"

    def lp(v):
        return _num(v) if v is not None else unavailable

    splits = {}
    for name, s in report.splits.items():
        splits[name] = {"num_frames": s.num_frames, "psnr": _num(s.psnr), "ssim": _num(s.ssim), "lpips": lp(s.lpips),
                        "lpips_x1000": lp(None if s.lpips is None else s.lpips * 1000),
                        "seconds_per_frame": s.seconds_per_frame, "geometry": s.geometry}
    frames = [{"split": f.split, "frame_id": f.frame_id, "camera_id": f.camera_id, "psnr": _num(f.psnr),
               "ssim": _num(f.ssim), "lpips": lp(f.lpips), "seconds": f.seconds,
               "geometry": None if f.geometry is None else asdict(f.geometry)} for f in report.frames]
    return {"format": "avatar-eval", "version": REPORT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": report.settings, "lpips": {"available": report.lpips_available, "info": report.lpips_reason},
            "splits": splits, "frames": frames}


def report_markdown(report: EvalReport) -> str:
    """A table per split (PSNR / SSIM / LPIPS x1000, frames, time per frame), then geometry if any."""
    lines = ["# Evaluation report", ""]
    s = report.settings
    lines += [f"Background {s.get('background')}, crop `{s.get('crop')}`, SSIM 11x11 Gaussian window, "
              f"LPIPS: {report.lpips_reason if report.lpips_available else 'unavailable: ' + report.lpips_reason}.",
              ""]
    for name, sp in report.splits.items():
        lp = f"{sp.lpips * 1000:.1f}" if sp.lpips is not None else "unavailable"
        lines += [f"## {name}", "", "| PSNR (dB) | SSIM | LPIPS (x1000) | frames | s / frame |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {sp.psnr:.2f} | {sp.ssim:.4f} | {lp} | {sp.num_frames} | {sp.seconds_per_frame:.3f} |", ""]
        if sp.geometry is not None:
            g = sp.geometry
            lines += ["| centre->mesh mean / median (mm) | mesh->centre mean / median (mm) | Chamfer (mm) | frames |",
                      "|---:|---:|---:|---:|",
                      f"| {g['to_mesh_mean_mm']:.2f} / {g['to_mesh_median_mm']:.2f} | "
                      f"{g['from_mesh_mean_mm']:.2f} / {g['from_mesh_median_mm']:.2f} | {g['chamfer_mm']:.2f} | "
                      f"{g['num_frames']} |", ""]
    return "\n".join(lines)


def write_report(report: EvalReport, out_dir: str | Path, grid: np.ndarray | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and (given a grid image) ``grid.png`` into ``out_dir``, each atomically.
    Returns the paths written by kind ("json", "markdown", "grid")."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME}
    atomic_write_bytes(paths["json"], json.dumps(report_dict(report), indent=2).encode())
    atomic_write_bytes(paths["markdown"], report_markdown(report).encode())
    if grid is not None:
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        paths["grid"] = out / GRID_NAME
        atomic_write_bytes(paths["grid"], buf.getvalue())
    return paths

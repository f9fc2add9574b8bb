"""From a raw monocular video to a subject folder the fitting job reads (``fit_avatar --video in.mp4``).

Stages, each timed and with a progress bar: decode + subsample + downscale (``avatar.data.video``), person mask and
landmarks per frame (``avatar.perception.landmarks``, MediaPipe), camera intrinsics from a focal length or field of
view, body fitting (``avatar.perception.bodyfit``), then writing the frames that show a person, their masks, the
camera and the fitted body parameters in InstantAvatar's PeopleSnapshot layout (with ``body_model.json``), so the
same loader and the same fitting job serve a video and a dataset. ``perception.json`` in that folder records what
was done: kept and skipped frames, timestamps, label swaps, reprojection errors and seconds per stage.

The folder is written atomically (``avatar.data.writers.atomic_subject_dir``): a failure at any stage leaves nothing.
The camera is fixed at the origin (world = camera coordinates); the person moves.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatar.perception.bodyfit import BodyFitConfig, fit_body

__all__ = ["VideoConfig", "VideoSubject", "intrinsics", "video_to_subject", "video_protocol", "DEFAULT_FOV_DEGREES"]

DEFAULT_FOV_DEGREES = 55.0  # horizontal field of view assumed without --focal / --fov (a phone's main camera ~ 65-70,
# a typical webcam / camcorder 50-60); the body fit's depth, not its image-space fit, depends on this guess


@dataclass
class VideoConfig:
    max_frames: int = 100
    """Frame budget: at most this many evenly spaced frames are used."""
    max_side: int = 540
    """Frames are downscaled so their longer side is at most this many pixels."""
    start: float = 0.0
    """Start of the time range used, seconds."""
    end: float | None = None
    """End of the time range used, seconds (None: the end of the video)."""
    focal: float | None = None
    """Focal length in pixels of the *source* video (scaled with the frames); overrides ``fov``."""
    fov: float | None = None
    """Horizontal field of view in degrees (default 55 when neither focal nor fov is given)."""
    model_complexity: int = 1
    """BlazePose model: 0 lite, 1 full, 2 heavy."""
    min_frames: int = 8
    """Fewer frames with a person than this is an error."""
    body: BodyFitConfig = field(default_factory=BodyFitConfig)

    def validate(self) -> None:
        if self.focal is not None and not self.focal > 0:
            raise ValueError(f"focal must be > 0 pixels, got {self.focal}")
        if self.fov is not None and not 1.0 <= self.fov <= 170.0:
            raise ValueError(f"fov must be in [1, 170] degrees, got {self.fov}")
        if self.model_complexity not in (0, 1, 2):
            raise ValueError(f"model_complexity must be 0, 1 or 2, got {self.model_complexity}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")
        self.body.validate()


@dataclass
class VideoSubject:
    """folder: the written subject; frames: kept frames; skipped: frames without a person; seconds per stage."""

    folder: Path
    frames: int
    skipped: int
    seconds: dict[str, float]
    messages: list[str]
    report: dict
    fit: object = None  # the BodyFit (shape, poses, initialization, errors) in memory


def intrinsics(width: int, height: int, focal: float | None = None, fov_degrees: float | None = None) -> torch.Tensor:
    """Pixel intrinsics ``[3, 3]``: principal point at the image centre, square pixels, focal from ``focal``
    (pixels) or the horizontal ``fov_degrees`` (default ``DEFAULT_FOV_DEGREES``)."""
    if focal is None:
        fov = DEFAULT_FOV_DEGREES if fov_degrees is None else fov_degrees
        focal = 0.5 * width / math.tan(math.radians(fov) / 2)
    return torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float32)


def video_protocol(num_frames: int):
    """The evaluation split of a video subject: the first 85 % of the frames train, the rest are held-out poses."""
    from avatar.data.protocols import FrameRange, Protocol, Split

    if num_frames < 2:
        raise ValueError(f"a video subject needs at least 2 frames, got {num_frames}")
    n_train = min(num_frames - 1, max(1, int(round(0.85 * num_frames))))
    test = Split(FrameRange(n_train, num_frames - 1), (0,))
    return Protocol("video", "peoplesnapshot", (("train", Split(FrameRange(0, n_train - 1), (0,))), ("test", test),
                                                  ("novel_pose", test)),
                    resolution=None, background="black", source="fit_avatar --video: first 85 % train, rest held out")


def video_to_subject(video: str | Path, out_dir: str | Path, name: str | None = None, cfg: VideoConfig | None = None,
                     body=None, overwrite: bool = False, progress: bool = True) -> VideoSubject:
    """Run the perception stages on ``video`` and write the subject folder ``out_dir/name`` (default: the video's
    stem); see the module docstring."""
    from PIL import Image

    from avatar.data.params import BodyModelInfo, write_body_model_info
    from avatar.data.video import read_video
    from avatar.data.writers import atomic_subject_dir
    from avatar.perception.landmarks import detect_landmarks

    cfg = cfg or VideoConfig()
    cfg.validate()
    video = Path(video)
    name = name or (video.stem or "video")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    clip = read_video(video, max_frames=cfg.max_frames, max_side=cfg.max_side, start=cfg.start, end=cfg.end,
                      progress=progress)
    seconds["decode"] = round(time.perf_counter() - t0, 2)
    for msg in clip.messages:
        print(f"[video] {video.name}: {msg}", flush=True)
    t0 = time.perf_counter()
    det = detect_landmarks(clip.images, model_complexity=cfg.model_complexity, progress=progress)
    seconds["landmarks"] = round(time.perf_counter() - t0, 2)
    keep = np.nonzero(det.found)[0]
    skipped = int(clip.num_frames - len(keep))
    if len(keep) == 0:
        raise ValueError(f"{video}: no person detected in any of the {clip.num_frames} frames used")
    if len(keep) < cfg.min_frames:
        raise ValueError(f"{video}: a person was detected in only {len(keep)} of {clip.num_frames} frames "
                         f"(at least {cfg.min_frames} needed; try a longer time range or a higher --max-frames)")
    if skipped:
        print(f"[video] {video.name}: {skipped} of {clip.num_frames} frames show no person and are skipped", flush=True)
    det = det.subset(keep)
    focal = None if cfg.focal is None else cfg.focal * clip.scale
    K = intrinsics(clip.width, clip.height, focal, cfg.fov)
    if body is None:
        from avatar.body import AnnyBody

        body = AnnyBody()
    t0 = time.perf_counter()
    fit = fit_body(body, det, K, clip.width, clip.height, clip.timestamps[keep], cfg.body, progress=progress)
    seconds["body_fit"] = round(time.perf_counter() - t0, 2)
    rot = fit.pose.rotations.numpy().astype(np.float32)
    N = rot.shape[0]
    report = {
        "video": str(video), "source": {"width": clip.info.width, "height": clip.info.height, "fps": clip.info.fps,
                                        "frames": clip.info.frames, "duration": clip.info.duration,
                                        "codec": clip.info.codec},
        "size": [clip.width, clip.height], "scale": clip.scale, "frames_used": clip.num_frames,
        "frames_kept": int(N), "frames_skipped": skipped, "source_frame_indices": clip.indices[keep].tolist(),
        "timestamps": [round(float(t), 4) for t in clip.timestamps[keep]],
        "intrinsics": K.tolist(), "focal_source": "--focal" if cfg.focal else ("--fov" if cfg.fov else
                                                                               f"default {DEFAULT_FOV_DEGREES} deg fov"),
        "body_model": body.name, "shape": fit.shape.tolist(),
        "reprojection_error_px": {"mean": round(float(fit.error_px.mean()), 2),
                                  "median": round(float(np.median(fit.error_px)), 2),
                                  "max": round(float(fit.error_px.max()), 2)},
        "label_swaps": {"arms": int(fit.swapped[:, 0].sum()), "legs": int(fit.swapped[:, 1].sum())},
        "body_fit_seconds": fit.seconds, "messages": clip.messages,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    t0 = time.perf_counter()
    with atomic_subject_dir(Path(out_dir), name, overwrite) as tmp:
        np.savez(tmp / "cameras.npz", intrinsic=K.numpy(), extrinsic=np.eye(4, dtype=np.float32),
                 height=np.array(clip.height), width=np.array(clip.width))
        np.savez(tmp / "poses.npz", betas=fit.shape.numpy().astype(np.float32)[None], global_orient=rot[:, 0],
                 body_pose=rot[:, 1:].reshape(N, -1), transl=fit.pose.translation.numpy().astype(np.float32))
        write_body_model_info(tmp, BodyModelInfo(body.name, body.num_bones, body.shape_dim))
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i, f in enumerate(keep):
            Image.fromarray(clip.images[f]).save(tmp / "images" / f"image_{i:04d}.png")
            np.save(tmp / "masks" / f"mask_{i:04d}.npy", (det.masks[i] > 0.5).astype(np.uint8))
        seconds["write"] = round(time.perf_counter() - t0, 2)
        report["seconds"] = seconds
        (tmp / "perception.json").write_text(json.dumps(report, indent=2))
    return VideoSubject(Path(out_dir) / name, int(N), skipped, seconds, clip.messages, report, fit)

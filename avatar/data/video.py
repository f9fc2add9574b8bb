"""Read a raw video for the ``fit_avatar --video`` path: decode with PyAV, subsample to a frame budget, downscale.

``read_video(path, max_frames=..., max_side=...)`` decodes the file once, keeps an evenly spaced subset of the frames
inside the requested time range (at most ``max_frames``), downscales them with libswscale (PyAV's ``reformat``) so
the longer side is at most ``max_side`` pixels, and returns them with their timestamps. What it did to a long or large
video is said in ``VideoClip.messages`` (and printed by the caller); nothing is written anywhere.

Bad input gets a ``ValueError`` / ``FileNotFoundError`` that names the file: a missing or empty file, a file that is
not a video (ffmpeg cannot open it or it has no video stream), a video with no decodable frame, or a time range that
holds no frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["VideoClip", "VideoInfo", "probe_video", "read_video"]


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (``frames`` and ``duration`` may be estimates)."""

    path: Path
    width: int
    height: int
    fps: float
    frames: int
    duration: float  # seconds
    codec: str


@dataclass
class VideoClip:
    """Decoded, subsampled and resized frames of a video.

    images:     uint8 [F, H, W, 3] RGB frames (after downscaling).
    timestamps: float64 [F] seconds from the start of the stream.
    indices:    int64 [F] index of each frame in the decoded stream.
    scale:      output size / source size (1.0 when not downscaled).
    messages:   what was done to the video (subsampling, downscaling), for the user.
    """

    info: VideoInfo
    images: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    scale: float
    messages: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])


def _open(path: Path):
    import av

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video file")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable video ({err})") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: has no video stream (is it a video file?)")
    return container


def _info(path: Path, container) -> VideoInfo:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1e6  # av.time_base: microseconds
    frames = int(stream.frames or 0)
    if frames <= 0 and fps > 0 and duration > 0:
        frames = int(round(duration * fps))
    name = stream.codec_context.name if stream.codec_context is not None else "?"
    return VideoInfo(path, int(stream.width), int(stream.height), fps, frames, duration, name)


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate, frame count and duration of ``path``'s first video stream (no decoding)."""
    path = Path(path)
    container = _open(path)
    try:
        return _info(path, container)
    finally:
        container.close()


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def read_video(
    path: str | Path,
    max_frames: int = 120,
    max_side: int = 540,
    start: float = 0.0,
    end: float | None = None,
    progress: bool = True,
) -> VideoClip:
    """Decode ``path`` and keep at most ``max_frames`` evenly spaced frames with timestamps in ``[start, end)``
    (seconds; ``end=None``: to the end), downscaled so the longer side is at most ``max_side`` pixels (even sizes)."""
    import av
    from tqdm import tqdm

    path = Path(path)
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16, got {max_side}")
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"the time range must satisfy 0 <= start < end, got start={start}, end={end}")
    container = _open(path)
    messages: list[str] = []
    try:
        info = _info(path, container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        span_end = info.duration if end is None or (info.duration and end > info.duration) else end
        expected = info.frames
        if info.fps > 0 and span_end and span_end > start:
            expected = max(1, int(math.ceil((span_end - start) * info.fps)))
        stride = max(1, int(math.ceil(expected / max_frames))) if expected else 1
        scale = min(1.0, max_side / max(info.width, info.height))
        out_w, out_h = (info.width, info.height) if scale == 1.0 else (_even(info.width * scale), _even(info.height * scale))
        images, stamps, indices = [], [], []
        in_range = 0
        tb = stream.time_base
        bar = tqdm(total=expected or None, desc="video: decode", unit="frame", disable=not progress)
        try:
            for index, frame in enumerate(container.decode(stream)):
                bar.update(1)
                t = float(frame.pts * tb) if frame.pts is not None and tb is not None else index / (info.fps or 25.0)
                if t < start - 1e-6:
                    continue
                if end is not None and t >= end - 1e-6:
                    break
                if in_range % stride == 0:
                    if scale != 1.0:
                        frame = frame.reformat(width=out_w, height=out_h)
                    images.append(frame.to_ndarray(format="rgb24"))
                    stamps.append(t)
                    indices.append(index)
                in_range += 1
        except av.error.FFmpegError as err:
            if not images:
                raise ValueError(f"{path}: cannot decode the video ({err})") from err
            messages.append(f"decoding stopped early at frame {in_range} ({err}); kept the frames before it")
        finally:
            bar.close()
    finally:
        container.close()
    if not images:
        where = "" if start == 0 and end is None else f" between {start:.2f} s and {end if end is not None else 'the end'}"
        raise ValueError(f"{path}: the video has no decodable frame{where}")
    if len(images) > max_frames:  # the container's frame count was an underestimate
        keep = np.unique(np.linspace(0, len(images) - 1, max_frames).round().astype(int))
        images, stamps, indices = [images[i] for i in keep], [stamps[i] for i in keep], [indices[i] for i in keep]
    if len(images) < in_range:
        messages.append(f"subsampled {in_range} frames to {len(images)} (frame budget {max_frames})")
    if scale != 1.0:
        messages.append(f"downscaled {info.width}x{info.height} to {out_w}x{out_h} (longest side {max_side})")
    return VideoClip(info, np.stack(images), np.asarray(stamps, np.float64), np.asarray(indices, np.int64),
                     out_w / info.width, messages)

"""Videos with PyAV: H.264 (yuv420p) when the build has an encoder for it, MPEG-4 Part 2 otherwise; atomic writes.

yuv420p needs even sizes: odd widths or heights are padded by one replicated row or column (and say so in the
returned ``VideoInfo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from avatar.io import atomic_file

CODECS = ("libx264", "h264", "libopenh264", "mpeg4")  # tried in this order


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    codec: str
    num_frames: int
    width: int  # as encoded (even)
    height: int
    fps: int
    padded: bool  # an odd input size was padded to even


def pick_codec(preferred: Iterable[str] = CODECS) -> str:
    """The first codec of ``preferred`` this PyAV build can encode."""
    import av

    for name in preferred:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # av raises UnknownCodecError / ValueError depending on version
            continue
    raise RuntimeError(f"PyAV has none of the encoders {list(preferred)}")


def _to_uint8(frame: Any, index: int) -> np.ndarray:
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        if frame.is_floating_point():
            frame = (frame.clamp(0, 1) * 255).round().to(torch.uint8)
        frame = frame.numpy()
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"video frame {index} must be [H, W, 3], got {frame.shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"video frame {index} must be uint8 (or a float tensor in [0, 1]), got {frame.dtype}")
    return frame


def write_video(
    path: str | Path,
    frames: Iterable[Any],  # uint8 [H, W, 3] arrays (float tensors in [0, 1] are converted)
    fps: int = 30,
    codec: str | None = None,
    crf: int = 18,
) -> VideoInfo:
    """Encode ``frames`` (all the same size) into ``path`` (.mp4 or .mkv), written to a temporary sibling and renamed.

    codec: None picks the first available of ``CODECS``; ``crf`` applies to the H.264 encoders.
    """
    import av

    path = Path(path)
    if int(fps) <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    codec = codec or pick_codec()
    path.parent.mkdir(parents=True, exist_ok=True)
    n, size, padded = 0, None, False
    with atomic_file(path) as tmp:
        with av.open(str(tmp), mode="w", format=path.suffix.lstrip(".") or "mp4") as container:
            stream = None
            for i, frame in enumerate(frames):
                img = _to_uint8(frame, i)
                if size is None:
                    size = img.shape[:2]
                    H, W = size[0] + size[0] % 2, size[1] + size[1] % 2
                    padded = (H, W) != size
                    stream = container.add_stream(codec, rate=int(fps))
                    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
                    if codec in ("libx264", "h264"):
                        stream.options = {"crf": str(crf)}
                elif img.shape[:2] != size:
                    raise ValueError(f"video frame {i} is {img.shape[:2]}, frame 0 was {size}")
                if padded:
                    img = np.pad(img, ((0, H - size[0]), (0, W - size[1]), (0, 0)), mode="edge")
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                    container.mux(packet)
                n += 1
            if stream is None:
                raise ValueError("write_video got no frames")
            for packet in stream.encode():
                container.mux(packet)
    return VideoInfo(path, codec, n, W, H, int(fps), padded)


def render_motion_video(
    path: str | Path,
    render_fn: Callable[[Any], Any],  # pose -> image [H, W, 3] (uint8, or float in [0, 1])
    poses: Iterable[Any],  # e.g. avatar.types.BodyPose per frame
    fps: int = 30,
    codec: str | None = None,
) -> VideoInfo:
    """Call ``render_fn`` on each pose (under ``torch.no_grad()``) and write the frames as a video (frames are
    streamed, not held in memory)."""

    def frames():
        for pose in poses:
            with torch.no_grad():
                yield render_fn(pose)

    return write_video(path, frames(), fps=fps, codec=codec)

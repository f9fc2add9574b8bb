"""Generate a synthetic subject with ground truth in the ZJU-MoCap or PeopleSnapshot layout.

    python -m tools.make_synthetic --out out/synthetic --layout zju
    python -m tools.make_synthetic --out out/synthetic --layout peoplesnapshot --frames 100 --size 512
    python -m tools.make_synthetic --out out/synthetic --layout zju --motion free --cameras 0 4 8 12 16 20

Defaults per layout: zju = "free" motion on the 23-camera ring, rendering camera 0 (training view) and cameras
6, 12, 18 (test views); peoplesnapshot = "turn" motion, one camera.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

import tyro


@dataclasses.dataclass(frozen=True)
class MakeSyntheticArgs:
    out: Path = Path("out/synthetic")
    """Parent folder of the subject folder."""
    layout: Literal["zju", "peoplesnapshot"] = "zju"
    """On-disk layout to write."""
    name: str | None = None
    """Subject folder name (default: CoreView_900 for zju, female-9-casual for peoplesnapshot)."""
    motion: Literal["turn", "free"] | None = None
    """Motion (default: free for zju, turn for peoplesnapshot)."""
    frames: int = 100
    """Frames of the sequence."""
    size: int = 512
    """Image width and height in pixels."""
    cameras: tuple[int, ...] | None = None
    """Ring cameras to render for zju (default: 0 6 12 18); peoplesnapshot always renders its one camera."""
    seed: int = 0
    """Seed of shape, clothing, texture and motion."""
    clothing: Literal["shirt_trousers", "shirt_skirt"] = "shirt_trousers"
    """Garments."""
    distortion: tuple[float, float, float, float, float] | None = None
    """OpenCV lens distortion k1 k2 p1 p2 k3 (default: none)."""
    shading: bool = True
    """Lambert shading."""
    texture_size: int = 1024
    """Texture resolution."""
    overwrite: bool = False
    """Replace an existing subject folder."""


def config_from_args(args: MakeSyntheticArgs):
    from avatar.data.synthetic import SyntheticConfig

    zju = args.layout == "zju"
    return SyntheticConfig(
        seed=args.seed,
        motion=args.motion or ("free" if zju else "turn"),
        num_frames=args.frames,
        width=args.size,
        height=args.size,
        rig="ring23" if zju else "mono",
        cameras=(args.cameras or (0, 6, 12, 18)) if zju else (0,),
        distortion=args.distortion,
        shading=args.shading,
        clothing=args.clothing,
        texture_size=args.texture_size,
    )


def run(args: MakeSyntheticArgs) -> Path:
    from avatar.body import AnnyBody
    from avatar.data.synthetic import make_subject
    from avatar.data.writers import write_peoplesnapshot, write_zju

    start = time.perf_counter()
    cfg = config_from_args(args)
    cfg.validate()
    body = AnnyBody()
    subject = make_subject(cfg, body)
    if args.layout == "zju":
        folder = write_zju(subject, body, args.out, args.name or "CoreView_900", overwrite=args.overwrite)
    else:
        folder = write_peoplesnapshot(subject, body, args.out, args.name or "female-9-casual", overwrite=args.overwrite)
    print(f"wrote {folder} ({cfg.num_frames} frames x {len(cfg.cameras)} cameras at {cfg.width}x{cfg.height}) "
          f"in {time.perf_counter() - start:.1f} s")
    return folder


def main() -> None:
    run(tyro.cli(MakeSyntheticArgs))


if __name__ == "__main__":
    main()

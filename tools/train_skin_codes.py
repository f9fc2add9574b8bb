"""``train_skin_codes``: train the skinning-code autoencoder and write the shipped codec.

    python -m tools.train_skin_codes                      # -> data/predictor/skin_codec_anny.safetensors (+ .json)
    python -m tools.train_skin_codes --steps 500 --out /tmp/codec.safetensors

Fixed seed (``--seed``, default 0): the same command writes the same file on the same machine. The JSON sidecar holds
the body, bone names, seed, training config and the measured held-out errors (mean L1 per point, LBS error in mm).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import tyro

from avatar.predict.skin_codes import SkinCodecConfig, save_skin_codec, shipped_codec_path, train_skin_codec


@dataclasses.dataclass
class TrainSkinCodesArgs:
    body: str = "anny"
    """Body model (anny is bundled; smpl/smplx need --model-path)."""
    model_path: Path | None = None
    """Folder with licensed SMPL / SMPL-X files (not needed for anny)."""
    out: Path | None = None
    """Output .safetensors (default: the shipped data/predictor/skin_codec_<body>.safetensors)."""
    seed: int = 0
    threads: int = 1
    """torch CPU threads (the codec is tiny: on a shared 2-core machine one thread was measured 10x faster per step
    than two)."""
    config: SkinCodecConfig = dataclasses.field(default_factory=SkinCodecConfig)


def run(args: TrainSkinCodesArgs) -> dict:
    from avatar.body import load_body_model

    torch.set_num_threads(args.threads)
    body = load_body_model(args.body, model_path=None if args.model_path is None else str(args.model_path))
    codec, report = train_skin_codec(body, args.config, seed=args.seed, log_every=max(args.config.steps // 10, 1))
    out = args.out or shipped_codec_path(body.name)
    meta = {"body": body.name, "bone_names": list(body.bone_names), "seed": args.seed,
            "config": dataclasses.asdict(args.config), "report": report,
            "command": "python -m tools.train_skin_codes " + " ".join(sys.argv[1:])}
    save_skin_codec(out, codec, meta)
    print(json.dumps(report, indent=2))
    print(f"[train_skin_codes] wrote {out} and {Path(out).with_suffix('.json')}")
    return report


def main() -> None:
    args = tyro.cli(TrainSkinCodesArgs)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_skin_codes: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

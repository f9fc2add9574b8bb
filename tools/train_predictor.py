"""``train_predictor``: train the depth + skinning-code network on synthetic renders and write the shipped weights.

    python -m tools.train_predictor                       # -> data/predictor/depthskin_anny.safetensors (+ .json)
    python -m tools.train_predictor --quick               # tiny run (tests): -> out/predictor/depthskin_quick.safetensors
    python -m tools.train_predictor --config.steps 500 --out /tmp/depthskin.safetensors

Fixed seeds (``--config.seed``, ``--config.train.seed``, ``--config.val.seed``): the same command writes the same
file on the same machine and thread count. The weights are stored as float16; the JSON sidecar holds the network
and training config, the seeds, the generation and training time, the validation errors of the stored weights beside
the prior-only baseline, and the SHA-256 of the skinning codec file the codes belong to.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import tyro

from avatar.predict.network import DepthSkinConfig
from avatar.predict.samples import SampleConfig
from avatar.predict.train import PredictorTrainConfig, file_sha256, save_predictor, train_predictor

QUICK = PredictorTrainConfig(
    net=DepthSkinConfig(size=64, widths=(8, 16, 32)),
    train=SampleConfig(seed=0, num_subjects=2, views_per_subject=8, size=64, texture_size=64, motion_frames=8),
    val=SampleConfig(seed=1_000_003, num_subjects=1, views_per_subject=4, size=64, texture_size=64, motion_frames=8),
    steps=60, batch_size=4, lr=3e-3, eval_every=0, log_every=20,
)


@dataclasses.dataclass
class TrainPredictorArgs:
    out: Path | None = None
    """Output .safetensors (default: the shipped data/predictor/depthskin_anny.safetensors; with --quick:
    out/predictor/depthskin_quick.safetensors)."""
    codec: Path | None = None
    """Skinning codec .safetensors (default: the shipped data/predictor/skin_codec_anny.safetensors)."""
    quick: bool = False
    """A tiny configuration (64 px, 16 views, 60 steps; about a minute): for tests, never for the shipped file."""
    threads: int = 2
    """torch CPU threads."""
    cache: bool = True
    """Keep the rendered training / validation views in the user cache (``<cache>/predictor-samples``), keyed by
    their config and the codec file's hash, so a re-run skips rendering."""
    config: PredictorTrainConfig = dataclasses.field(default_factory=PredictorTrainConfig)


def run(args: TrainPredictorArgs) -> dict:
    from avatar.body import AnnyBody
    from avatar.predict.infer import shipped_predictor_path
    from avatar.predict.skin_codes import load_skin_codec, shipped_codec_path

    cfg = QUICK if args.quick else args.config
    torch.set_num_threads(args.threads)
    codec_path = args.codec or shipped_codec_path("anny")
    codec = load_skin_codec(codec_path)
    out = args.out or (Path("out/predictor/depthskin_quick.safetensors") if args.quick else shipped_predictor_path())
    start = time.perf_counter()
    codec_sha = file_sha256(codec_path)
    cache_dir = None
    if args.cache:
        from avatar.body.anny_body import cache_root

        cache_dir = cache_root() / "predictor-samples"
    model, report = train_predictor(cfg, AnnyBody(), codec, log=lambda msg: print(msg, flush=True),
                                    cache_dir=cache_dir, codec_key=codec_sha)
    total = time.perf_counter() - start
    meta = {
        "body": "anny", "seed": cfg.seed, "train_seed": cfg.train.seed, "val_seed": cfg.val.seed,
        "config": dataclasses.asdict(cfg), "threads": args.threads, "torch": torch.__version__,
        "total_seconds": round(total, 1), "report": report,
        "codec": {"file": Path(codec_path).name, "sha256": codec_sha},
        "command": "python -m tools.train_predictor " + " ".join(sys.argv[1:]),
    }
    save_predictor(out, model, meta)
    summary = {k: report[k] for k in ("generate_seconds", "train_seconds", "train_views", "val_views", "parameters")}
    summary["val"] = report["val"]
    print(json.dumps(summary, indent=2))
    print(f"[train_predictor] wrote {out} and {Path(out).with_suffix('.json')} in {total:.0f} s")
    return meta


def main() -> None:
    args = tyro.cli(TrainPredictorArgs)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_predictor: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

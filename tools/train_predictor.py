"""``train_predictor``: train the depth + skinning-code network on synthetic renders and write the shipped weights.

    python -m tools.train_predictor                       # -> data/predictor/depthskin_anny.safetensors (+ .json)
    python -m tools.train_predictor --quick               # tiny run (tests): -> out/predictor/depthskin_quick.safetensors
    python -m tools.train_predictor --config.steps 500 --out /tmp/depthskin.safetensors
    python -m tools.train_predictor --thuman-root THuman2.0 --thuman-body anny --out mine.safetensors   # + scans
    python -m tools.train_predictor --thuman-root THuman2.0 --thuman-body smplx --body-model-dir models/ \
        --codec skin_codec_smplx.safetensors --out smplx.safetensors      # scans only: codes of another rig

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
    thuman_root: Path | None = None
    """A THuman2.0-layout folder (data/<id>/<id>.obj, <body>/<id>/<body>_param.pkl; avatar/predict/scans.py): its
    scans are rendered like the synthetic subjects. With anny fits they join the synthetic training views; with
    SMPL / SMPL-X fits (whose codes belong to another rig and need that rig's --codec) the network trains on the
    scans alone and the last scan is held out for validation."""
    thuman_body: str = "smplx"
    """Body model of the fits in --thuman-root: smpl, smplx or anny."""
    body_model_dir: Path | None = None
    """Folder of the licensed SMPL / SMPL-X model files (not needed for --thuman-body anny)."""
    config: PredictorTrainConfig = dataclasses.field(default_factory=PredictorTrainConfig)


def scan_training_sets(args: TrainPredictorArgs, cfg: PredictorTrainConfig, codec, cache_dir, codec_sha):
    """(train, val) sample sets with the scans of ``args.thuman_root`` (see ``TrainPredictorArgs.thuman_root``)."""
    from avatar.body import AnnyBody, load_body_model
    from avatar.predict.samples import cached_samples, generate_samples
    from avatar.predict.scans import mix_samples, thuman_ids, thuman_scan_samples

    body = load_body_model(args.thuman_body, None if args.body_model_dir is None else str(args.body_model_dir))
    ids = thuman_ids(args.thuman_root)
    if body.name == "anny":
        anny = AnnyBody()
        if cache_dir is not None:
            train = cached_samples(anny, codec, cfg.train, cache_dir, codec_sha)
            val = cached_samples(anny, codec, cfg.val, cache_dir, codec_sha)
        else:
            train, val = generate_samples(anny, codec, cfg.train), generate_samples(anny, codec, cfg.val)
        return mix_samples(train, thuman_scan_samples(args.thuman_root, body, codec, cfg.train, ids,
                                                      seed=cfg.train.seed)), val
    if len(ids) < 2:
        raise ValueError(f"{args.thuman_root}: training on {body.name} scans alone needs at least 2 scans "
                         f"(the last is held out), found {len(ids)}")
    train = thuman_scan_samples(args.thuman_root, body, codec, cfg.train, ids[:-1], seed=cfg.train.seed)
    val = thuman_scan_samples(args.thuman_root, body, codec, cfg.val, ids[-1:], seed=cfg.val.seed)
    return train, val


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
    samples = None
    if args.thuman_root is not None:
        samples = scan_training_sets(args, cfg, codec, cache_dir, codec_sha)
    model, report = train_predictor(cfg, AnnyBody(), codec, log=lambda msg: print(msg, flush=True),
                                    samples=samples, cache_dir=cache_dir, codec_key=codec_sha)
    total = time.perf_counter() - start
    meta = {
        "body": "anny" if args.thuman_root is None else args.thuman_body, "seed": cfg.seed,
        "scans": None if args.thuman_root is None else {"root": str(args.thuman_root), "body": args.thuman_body}, "train_seed": cfg.train.seed, "val_seed": cfg.val.seed,
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

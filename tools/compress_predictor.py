"""``compress_predictor``: a channel-pruned, distilled, int8-stored copy of the shipped depth + skinning-code network.

    python -m tools.compress_predictor                  # -> data/compressed/depthskin_anny_half.safetensors
    python -m tools.compress_predictor --keep 0.5 --steps 800 --out /tmp/half.safetensors

Recipe (``avatar/compress/predictor.py``): ``prune_depthskin_channels`` (every level keeps the ``keep`` fraction of
its channels with the largest filter norms) -> ``distill_predictor`` on the shipped net's own training views
(``PredictorTrainConfig().train``, read from the user cache that ``tools.train_predictor`` fills, rendered
otherwise) with the training loss against the ground truth plus the same loss against the dense net -> int8 conv
weights (``save_compact_predictor``). The shipped dense files in ``data/predictor/`` are read, never written.
The file's metadata holds the held-out errors (``evaluate_predictor`` on ``PredictorTrainConfig().val``) of the
dense net, of the stored int8 student in fp32 and in bf16 compute, the seeds, the command and the timings.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import tyro


@dataclasses.dataclass
class CompressPredictorArgs:
    out: Path = Path("data/compressed/depthskin_anny_half.safetensors")
    """Output .safetensors (int8 conv weights, fp16 rest, config + report in the manifest)."""
    keep: float = 0.5
    """Fraction of each level's channels kept."""
    steps: int = 800
    """Distillation steps (batch of PredictorTrainConfig().batch_size views)."""
    lr: float = 2e-3
    """Peak learning rate of the distillation."""
    seed: int = 0
    threads: int = 2
    """torch CPU threads."""


def run(args: CompressPredictorArgs) -> dict:
    from avatar.body import AnnyBody
    from avatar.body.anny_body import cache_root
    from avatar.compress.predictor import (
        CastPredictor,
        distill_predictor,
        load_compact_predictor,
        parameter_count,
        prune_depthskin_channels,
        quantize_predictor_weights,
        save_compact_predictor,
    )
    from avatar.compress.quantize import bf16_support
    from avatar.predict.infer import load_predictor, shipped_predictor_path
    from avatar.predict.samples import cached_samples
    from avatar.predict.skin_codes import load_skin_codec, shipped_codec_path
    from avatar.predict.train import PredictorTrainConfig, evaluate_predictor, file_sha256

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    teacher = load_predictor()
    codec = load_skin_codec()
    cfg = PredictorTrainConfig()
    codec_sha = file_sha256(shipped_codec_path("anny"))
    body = AnnyBody()
    cache = cache_root() / "predictor-samples"
    train_set = cached_samples(body, codec, cfg.train, cache, codec_sha, log=True)
    val_set = cached_samples(body, codec, cfg.val, cache, codec_sha)
    t_data = time.perf_counter() - start
    student = prune_depthskin_channels(teacher, args.keep)
    print(f"[compress_predictor] {len(train_set)} training views; widths {teacher.cfg.widths} -> "
          f"{student.cfg.widths}, {parameter_count(teacher)} -> {parameter_count(student)} parameters", flush=True)
    t1 = time.perf_counter()
    student, history = distill_predictor(student, teacher, train_set, args.steps, cfg, lr=args.lr, seed=args.seed,
                                         log=lambda m: print(m, flush=True))
    t_distill = time.perf_counter() - t1
    stored = quantize_predictor_weights(student)
    report = {"dense": evaluate_predictor(teacher, val_set, codec),
              "pruned_no_distill": evaluate_predictor(prune_depthskin_channels(teacher, args.keep), val_set, codec),
              "student_int8_fp32": evaluate_predictor(stored, val_set, codec)}
    bf_ok, _ = bf16_support()
    if bf_ok:
        report["student_int8_bf16"] = evaluate_predictor(CastPredictor(stored), val_set, codec)
    meta = {
        "teacher": {"file": shipped_predictor_path().name, "sha256": file_sha256(shipped_predictor_path()),
                    "widths": list(teacher.cfg.widths), "parameters": parameter_count(teacher)},
        "codec_sha256": codec_sha, "keep": args.keep, "steps": args.steps, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "torch": torch.__version__, "parameters": parameter_count(student),
        "data_seconds": round(t_data, 1), "distill_seconds": round(t_distill, 1), "history": history,
        "val": report, "command": "python -m tools.compress_predictor " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_compact_predictor(args.out, stored, meta)
    back = load_compact_predictor(args.out)
    x = torch.rand(1, 14, stored.cfg.size, stored.cfg.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(back(x), stored(x)):
            raise RuntimeError("compress_predictor: the written file does not load back to the evaluated network")
    summary = {k: {m: round(v, 4) for m, v in r.items() if m in ("depth_front_mm", "depth_back_mm", "codes_l1",
                                                                  "weights_l1")} for k, r in report.items()}
    print(json.dumps(summary, indent=2))
    print(f"[compress_predictor] wrote {args.out} ({args.out.stat().st_size} B) in {time.perf_counter() - start:.0f} s")
    return meta


def main() -> None:
    args = tyro.cli(CompressPredictorArgs)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"compress_predictor: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

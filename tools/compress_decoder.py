"""``compress_decoder``: a neuron-pruned, distilled, int8-stored copy of the shipped skinning-code decoder.

    python -m tools.compress_decoder                  # -> data/compressed/skin_decoder_anny.safetensors
    python -m tools.compress_decoder --keep 0.625 --steps 3000 --out /tmp/dec.safetensors
    python -m tools.compress_decoder --init /tmp/dec.safetensors --steps 0   # only the QAT steps, from a written file

Recipe (``avatar/compress/distill.py``): ``distill_codec_decoder`` -- the decoder's hidden widths times ``keep``
(whole neurons, largest norms first), distilled on the codes of the codec's own training points (the same
phenotypes, sample counts and generator seed as ``tools.train_skin_codes``, so the same points) with L1 +
cross-entropy to the dense decoder and the codec's LBS position term under its 4 training poses -> optionally
``--qat-steps`` more steps of the same loss with int8 fake-quantized weights (plain int8 rounding of the distilled
half-width decoder cost +0.27 mm of held-out LBS error; 300 QAT steps took it back to +0.02 mm) -> int8 weight
matrices (``save_compact_decoder``). ``--init FILE`` starts from a compact decoder written before (its metadata,
with its command, is kept under ``init``) instead of pruning the dense decoder. The shipped codec in ``data/predictor/`` is read, never written.

Held-out errors (``evaluate_skin_codec``: LBS position error in mm and weight L1 on a phenotype never trained on,
8 poses) of the dense decoder, of the pruned decoder before distillation, of the fp32 student and of the stored int8
student (fp32 and, where the CPU has it, bf16 compute) go into the file's metadata with the held-out set's recipe
(:func:`heldout_set` rebuilds it), the seeds, the command and the timings.
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
class CompressDecoderArgs:
    out: Path = Path("data/compressed/skin_decoder_anny.safetensors")
    """Output .safetensors (int8 weight matrices, fp32 biases, widths + report in the manifest)."""
    keep: float = 0.5
    """Fraction of each hidden width kept (64-128-256-128 -> 32-64-128-64 at 0.5)."""
    steps: int = 3000
    """Distillation steps (Adam, cosine decay)."""
    batch: int = 4096
    lr: float = 3e-3
    """Peak learning rate."""
    code_noise: float = 0.01
    """Gaussian noise added to the training codes (predicted codes are never exact)."""
    lbs_weight: float = 1.0
    """Weight of the LBS position term (cm) under the codec's training poses."""
    qat_steps: int = 300
    """Quantization-aware steps after the distillation (int8 fake-quantized weights, straight-through)."""
    qat_lr: float = 3e-4
    """Peak learning rate of the QAT steps."""
    init: Path | None = None
    """Start from this compact decoder file (e.g. one written without QAT) instead of pruning the dense decoder."""
    seed: int = 0
    """Seed of the distillation (batches, code noise)."""
    heldout_shape: int = 4
    """``sample_phenotype`` index of the held-out phenotype (the codec trained on 0-3)."""
    heldout_samples: int = 20_000
    """Surface points on the held-out phenotype (half of them get a normal-offset copy)."""
    heldout_seed: int = 1
    """Generator seed of the held-out points."""
    heldout_poses: int = 8
    heldout_pose_seed: int = 7919
    threads: int = 2
    """torch CPU threads."""


def heldout_set(body, spec: dict):
    """``(samples, shapes [1, D])``: the held-out points of a recorded ``spec`` (keys ``shape``, ``samples``,
    ``seed``; the metadata's ``heldout``), rebuilt exactly."""
    from avatar.data.synthetic import sample_phenotype
    from avatar.predict.skin_codes import sample_skin_points

    shapes = sample_phenotype(int(spec["shape"]), body.shape_dim)[None]
    pts = sample_skin_points(body, shapes, int(spec["samples"]), 0.5, 0.05,
                             torch.Generator().manual_seed(int(spec["seed"])), include_vertices=False)
    return pts, shapes


def codec_training_data(body, codec):
    """The codec's own training points and LBS poses (``SkinCodecConfig`` of its metadata, its seed): ``(samples,
    transforms [P, J, 12])``, as ``train_skin_codec`` draws them for anny."""
    from avatar.data.synthetic import sample_phenotype
    from avatar.predict.skin_codes import random_poses, sample_skin_points

    meta = getattr(codec, "meta", {})
    cfg, seed = meta.get("config", {}), int(meta.get("seed", 0))
    if body.name != "anny":
        raise ValueError(f"compress_decoder: the codec's training points are rebuilt for anny only, got {body.name!r}")
    n_shapes, lbs_poses = int(cfg.get("num_shapes", 4)), int(cfg.get("lbs_poses", 4))
    shapes = torch.stack([sample_phenotype(1000 * seed + i, body.shape_dim) for i in range(n_shapes)])
    pts = sample_skin_points(body, shapes, int(cfg.get("surface_samples", 40_000)),
                             float(cfg.get("offset_fraction", 0.5)), float(cfg.get("max_normal_offset", 0.05)),
                             torch.Generator().manual_seed(seed))
    pose = random_poses(body, shapes[0], lbs_poses, 10_000 + seed)
    with torch.no_grad():
        T, _ = body.bone_transforms(pose, shapes[:1].expand(lbs_poses, -1).to(body.dtype))
    return pts, T.float()[..., :3, :].flatten(-2)


def run(args: CompressDecoderArgs) -> dict:
    from avatar.body import AnnyBody
    from avatar.compress.distill import (
        codec_with_decoder,
        distill_codec_decoder,
        load_compact_decoder,
        save_compact_decoder,
    )
    from avatar.compress.prune import prune_sequential_neurons
    from avatar.compress.quantize import bf16_support, to_bfloat16
    from avatar.predict.skin_codes import evaluate_skin_codec, load_skin_codec, shipped_codec_path
    from avatar.predict.train import file_sha256

    if not 0 < args.keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    body = AnnyBody()
    codec = load_skin_codec()
    train, T = codec_training_data(body, codec)
    spec = {"shape": args.heldout_shape, "samples": args.heldout_samples, "seed": args.heldout_seed,
            "poses": args.heldout_poses, "pose_seed": args.heldout_pose_seed}
    test, test_shapes = heldout_set(body, spec)

    def evaluate(dec) -> dict:
        ev = evaluate_skin_codec(codec_with_decoder(codec, dec), body, test, test_shapes, args.heldout_poses,
                                 args.heldout_pose_seed)
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in ev.items()}

    def params(m) -> int:
        return sum(p.numel() for p in m.parameters())

    print(f"[compress_decoder] {train.weights.shape[0]} training points, {T.shape[0]} LBS poses; held-out "
          f"{test.weights.shape[0]} points", flush=True)
    init = load_compact_decoder(args.init) if args.init is not None else None
    keep = float(init.meta["keep"]) if init is not None else args.keep
    t1 = time.perf_counter()
    student = distill_codec_decoder(codec, train.weights, keep=keep, steps=args.steps, batch=args.batch,
                                    lr=args.lr, code_noise=args.code_noise, seed=args.seed,
                                    positions=train.canonical, transforms=T, lbs_weight=args.lbs_weight,
                                    qat_steps=args.qat_steps, qat_lr=args.qat_lr, init=init)
    t_distill = time.perf_counter() - t1
    tmp = args.out.with_name(args.out.name + ".tmp.safetensors")
    save_compact_decoder(tmp, student)
    stored = load_compact_decoder(tmp)  # the int8-rounded student, exactly as the file gives it back
    tmp.unlink()
    report = {"dense_fp32": evaluate(codec.decoder),
              "pruned_no_distill": evaluate(prune_sequential_neurons(codec.decoder, keep)),
              "student_fp32": evaluate(student),
              "student_int8_fp32": evaluate(stored)}
    bf_ok, _ = bf16_support()
    if bf_ok:
        report["student_int8_bf16"] = evaluate(to_bfloat16(stored))
    widths = [m.out_features for m in stored if isinstance(m, torch.nn.Linear)][:-1]
    meta = {
        "body": "anny", "teacher": {"file": shipped_codec_path("anny").name,
                                    "sha256": file_sha256(shipped_codec_path("anny")),
                                    "parameters": params(codec.decoder)},
        "keep": keep, "hidden_widths": widths, "parameters": params(stored), "steps": args.steps,
        "qat_steps": args.qat_steps, "qat_lr": args.qat_lr, "init": None if init is None else init.meta,
        "batch": args.batch, "lr": args.lr, "code_noise": args.code_noise, "lbs_weight": args.lbs_weight,
        "seed": args.seed, "codec_seed": int(codec.meta.get("seed", 0)), "train_points": int(train.weights.shape[0]),
        "heldout": spec, "threads": args.threads, "torch": torch.__version__,
        "distill_seconds": round(t_distill, 1), "val": report,
        "command": "python -m tools.compress_decoder " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_compact_decoder(args.out, student, meta)
    back = load_compact_decoder(args.out)
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(back(x), stored(x)):
            raise RuntimeError("compress_decoder: the written file does not load back to the evaluated network")
    summary = {k: {m: round(r[m], 4) for m in ("lbs_error_mm_mean", "lbs_error_mm_p99", "l1_mean")}
               for k, r in report.items()}
    print(json.dumps(summary, indent=2))
    print(f"[compress_decoder] wrote {args.out} ({args.out.stat().st_size} B, {params(stored)} vs "
          f"{params(codec.decoder)} parameters) in {time.perf_counter() - start:.0f} s (distill {t_distill:.0f} s)")
    return meta


def main() -> None:
    args = tyro.cli(CompressDecoderArgs)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"compress_decoder: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

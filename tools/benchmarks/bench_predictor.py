"""Depth + skinning-code predictor on held-out synthetic renders, beside the prior-only baseline; CPU time per view.

Baseline: the posed naked body model's own depth and skinning codes (the prior the network gets as input), extended
to the nearest body pixel where the clothed subject covers pixels the body does not. Held-out views come from
subjects, poses and cameras of a seed used by neither training nor validation. Error rows: mean over all person-mask
pixels (depth |error| in mm; code L1 = sum over the 3 channels; weight L1 = sum over the bones of the decoded
weights, ``SkinCodec.decode``), value = network, baseline = prior, ratio = baseline / value (>1: the network is
better). Timing rows: median ms per view of ``predict_views`` (crop, resample, network, paste back) on 512x512
views, one view and a batch (2 views with --quick, else 4); torch uses 2 threads.

    python tools/benchmarks/bench_predictor.py [--quick] [--json] [--weights file.safetensors]
"""

from __future__ import annotations

import dataclasses

import torch

from tools.benchmarks.common import emit, median_ms, parser, row


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="predictor .safetensors (default: the shipped one)")
    args = p.parse_args()
    torch.set_num_threads(2)

    from avatar.body import AnnyBody
    from avatar.predict.infer import load_predictor, predict_views
    from avatar.predict.samples import SampleConfig, generate_samples
    from avatar.predict.skin_codes import load_skin_codec
    from avatar.predict.train import evaluate_predictor, fill_from_prior
    from avatar.predict.views import DepthLayers

    body = AnnyBody()
    codec = load_skin_codec()
    model = load_predictor(args.weights)
    S = model.cfg.size
    held = SampleConfig(seed=2_000_003, num_subjects=2 if args.quick else 4, views_per_subject=3 if args.quick else 6, size=S)
    samples = generate_samples(body, codec, held)
    r = evaluate_predictor(model, samples, codec)
    r_nc = evaluate_predictor(model, samples, codec, prior_codes=False)
    n = f"{len(samples)} held-out views at {S} px"
    rows = [
        row(f"depth front, mean abs, mm ({n})", r["depth_front_mm"], "mm", r["prior_depth_front_mm"]),
        row("depth back, mean abs, mm", r["depth_back_mm"], "mm", r["prior_depth_back_mm"]),
        row("skinning codes front+back, mean L1", r["codes_l1"], "L1", r["prior_codes_l1"]),
        row("decoded weights front+back, mean L1", r["weights_l1"], "L1", r["prior_weights_l1"]),
        row("depth front, mm, net without prior codes", r_nc["depth_front_mm"], "mm", r_nc["prior_depth_front_mm"]),
        row("skinning codes, mean L1, net without prior codes", r_nc["codes_l1"], "L1", r_nc["prior_codes_l1"]),
    ]

    # the full inference path on larger views: crop + resample + net + paste back, against the same baseline
    nbig = 2 if args.quick else 4
    big_cfg = dataclasses.replace(held, size=512, num_subjects=1, views_per_subject=nbig)
    big = generate_samples(body, codec, big_cfg)
    priors = [DepthLayers(big.prior_mask[i], big.prior_depth[i, 0], big.prior_depth[i, 1],
                          big.prior_codes[i, ..., :3].float(), big.prior_codes[i, ..., 3:].float()) for i in range(len(big))]
    images = big.images.float() / 255
    preds = predict_views(model, images, big.masks, priors)
    base = fill_from_prior(big.prior_depth, big.prior_mask, big.masks)
    m = big.masks
    for k, name in ((0, "front"), (1, "back")):
        pred = torch.stack([p.depth_front if k == 0 else p.depth_back for p in preds])
        err = (pred - big.target_depth[:, k]).abs()[m].mean() * 1000
        err_prior = (base[:, k] - big.target_depth[:, k]).abs()[m].mean() * 1000
        rows.append(row(f"predict_views depth {name}, mm ({nbig} views at 512 px)", float(err), "mm", float(err_prior)))

    repeats = 3 if args.quick else 10
    one = median_ms(lambda: predict_views(model, images[:1], big.masks[:1], priors[:1]), repeats, warmup=1)
    many = median_ms(lambda: predict_views(model, images, big.masks, priors), repeats, warmup=1) / nbig
    rows.append(row("predict_views, 1 view at 512 px, ms per view", one, "ms", None))
    rows.append(row(f"predict_views, {nbig} views at 512 px, ms per view", many, "ms", None))
    emit(rows, args.json, "Depth + skinning-code predictor (held-out synthetic renders; error rows: ratio > 1 = lower error)",
         "prior only: the posed naked body's depth and codes")


if __name__ == "__main__":
    main()

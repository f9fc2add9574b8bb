"""Compression: pruning (LAMP, gradual, structured, 2:4), quantization (int8, bf16, QAT), compact weight files and
compact avatars. See ``design.md``."""

from avatar.compress.avatar_codec import (
    AvatarCodecConfig,
    decode_gaussians,
    encode_gaussians,
    finetune_pruned,
    gaussian_contributions,
    keep_mask,
    read_compact_avatar,
    select_gaussians,
    write_compact_avatar,
)
from avatar.compress.distill import (
    SparseWeightField,
    WeightSupport,
    codec_with_decoder,
    densify_weights,
    distill_codec_decoder,
    distill_weight_field,
    load_compact_decoder,
    save_compact_decoder,
    shipped_decoder_path,
)
from avatar.compress.predictor import (
    CastPredictor,
    distill_predictor,
    load_compact_predictor,
    prune_depthskin_channels,
    quantize_predictor_weights,
    save_compact_predictor,
)
from avatar.compress.prune import (
    GradualPruneConfig,
    GradualPruner,
    apply_masks,
    cubic_sparsity,
    global_lamp_masks,
    lamp_scores,
    nm_mask,
    prunable_weights,
    prune_linear_neurons,
    prune_sequential_neurons,
    semi_structured_support,
    sparsity_of,
)
from avatar.compress.quantize import (
    CastModule,
    Int8WeightLinear,
    bf16_support,
    dequantize_per_channel,
    qat_finetune,
    quantize_dynamic_int8,
    quantize_per_channel_int8,
    quantize_weight_only,
    to_bfloat16,
)
from avatar.compress.storage import load_compact, save_compact

__all__ = [
    "AvatarCodecConfig", "decode_gaussians", "encode_gaussians", "finetune_pruned", "gaussian_contributions", "keep_mask",
    "read_compact_avatar", "select_gaussians", "write_compact_avatar",
    "GradualPruneConfig", "GradualPruner", "apply_masks", "cubic_sparsity", "global_lamp_masks", "lamp_scores",
    "nm_mask", "prunable_weights", "prune_linear_neurons", "prune_sequential_neurons", "semi_structured_support",
    "sparsity_of",
    "CastModule", "Int8WeightLinear", "bf16_support", "dequantize_per_channel", "qat_finetune",
    "quantize_dynamic_int8", "quantize_per_channel_int8", "quantize_weight_only", "to_bfloat16",
    "load_compact", "save_compact",
    "SparseWeightField", "WeightSupport", "densify_weights", "distill_codec_decoder", "distill_weight_field",
    "codec_with_decoder", "load_compact_decoder", "save_compact_decoder", "shipped_decoder_path",
    "CastPredictor", "distill_predictor", "load_compact_predictor", "prune_depthskin_channels",
    "quantize_predictor_weights", "save_compact_predictor",
]

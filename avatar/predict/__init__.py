"""Sparse-view prediction: the skinning-code autoencoder (``skin_codes``), front/back depth layers of meshes
(``views``), and the depth + skinning-code network with its training (``network``, ``infer``). See design.md."""

from avatar.predict.skin_codes import (
    SkinCodec,
    SkinCodecConfig,
    load_skin_codec,
    save_skin_codec,
    train_skin_codec,
)
from avatar.predict.views import DepthLayers, backproject, render_depth_layers
from avatar.predict.network import DepthSkinConfig, DepthSkinNet
from avatar.predict.infer import ViewPrediction, load_predictor, predict_views
from avatar.predict.scans import ScanSubject, load_thuman2, scan_samples, thuman_scan_samples

__all__ = [
    "SkinCodec",
    "SkinCodecConfig",
    "train_skin_codec",
    "save_skin_codec",
    "load_skin_codec",
    "DepthLayers",
    "render_depth_layers",
    "backproject",
    "DepthSkinConfig",
    "DepthSkinNet",
    "ViewPrediction",
    "load_predictor",
    "predict_views",
    "ScanSubject",
    "load_thuman2",
    "scan_samples",
    "thuman_scan_samples",
]

"""Fitting: losses, densification, pose refinement, the training loop, checkpoints and the per-subject job."""

from avatar.fit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from avatar.fit.densify import DensifyConfig
from avatar.fit.job import FitResult, fit_subject
from avatar.fit.losses import LossConfig, LossTerms
from avatar.fit.mesh_refine import MeshRefineConfig, MeshStage, RefinedMesh, RefineView, refine_mesh
from avatar.fit.pose_refine import PoseRefiner
from avatar.fit.trainer import FitConfig, Trainer, fast_config, quality_config

__all__ = [
    "DensifyConfig", "FitConfig", "FitResult", "LossConfig", "LossTerms", "PoseRefiner", "Trainer", "fast_config",
    "fit_subject", "latest_checkpoint", "load_checkpoint", "quality_config", "save_checkpoint",
    "MeshRefineConfig", "MeshStage", "RefineView", "RefinedMesh", "refine_mesh",
]

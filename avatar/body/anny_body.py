"""The anny body model (bundled default): MakeHuman-based, 13,718 vertices, 27,420 triangles, 104 bones, z up.

anny's own first build takes about a minute and writes a ~790 MB cache. We build it once per machine into a
temporary cache, export its float32 model data (~27 MB of safetensors) and the COCO-17 keypoint regressor into the
project's cache directory, and delete anny's cache; every later load reads the export through
``anny.Anny.from_model_data`` in well under a second. Shape parameters are anny's six phenotype values in [0, 1]
(``gender, age, muscle, weight, height, proportions``, 0.5 = average).

Pose convention: per-bone axis-angle in world-aligned axes (anny's ``local-ref`` parameterization, like SMPL's),
root rotation about the root bone's head, then the translation. The zero pose is the rest pose.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from avatar.body.base import BodyModel
from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.types import BodyPose, RestBody

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
_MODEL_FILE = "model_data.safetensors"
_KEYPOINT_FILE = "keypoints_coco17.safetensors"
_META_FILE = "meta.json"


def cache_root() -> Path:
    """The project's cache directory: ``$AVATAR_CACHE_DIR`` or the user's cache dir (``~/.cache/avatar``)."""
    env = os.environ.get("AVATAR_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("avatar"))


def anny_export_dir() -> Path:
    import anny

    return cache_root() / f"anny-{anny.__version__}-float32-v{EXPORT_VERSION}"


def _export_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (_MODEL_FILE, _KEYPOINT_FILE, _META_FILE))


def ensure_anny_export(verbose: bool = True) -> Path:
    """Return the folder of the float32 anny export, building it first if this machine has none.

    The build runs anny's own builder against a temporary cache that is deleted afterwards, writes the export into
    a temporary folder beside the target and renames it into place (atomic: a killed build leaves nothing).
    """
    target = anny_export_dir()
    if _export_complete(target):
        return target
    import anny
    import anny.paths
    from anny.keypoints import KeypointsRegressor
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"[avatar] first use of the anny body model on this machine: building its float32 export in {target} (about a minute, once)", flush=True)
    start = time.perf_counter()
    previous_cache = anny.paths.get_anny_cache_path()
    with tempfile.TemporaryDirectory(prefix="anny-build-", dir=target.parent) as tmp:
        anny.paths.set_anny_cache_path(Path(tmp) / "anny-cache")
        try:
            model = anny.Anny(skinning_method="lbs")
        finally:
            anny.paths.set_anny_cache_path(previous_cache)
        data = model.to_model_data()
        data = dataclasses.replace(
            data,
            **{
                f.name: getattr(data, f.name).to(torch.float32)
                for f in dataclasses.fields(data)
                if torch.is_tensor(getattr(data, f.name)) and getattr(data, f.name).is_floating_point()
            },
        )
        staging = Path(tmp) / "export"
        staging.mkdir()
        data.save_safetensors(staging / _MODEL_FILE)
        regressor = KeypointsRegressor.coco(model)
        save_file(
            {"regression_weights": regressor.regression_weights.to(torch.float32).contiguous()},
            str(staging / _KEYPOINT_FILE),
            metadata={"labels": json.dumps(list(regressor.labels))},
        )
        meta = {
            "export_version": EXPORT_VERSION,
            "anny_version": anny.__version__,
            "pose_parameterization": model.pose_parameterization,
            "bone_orientation": model.bone_orientation,
            "root_identity_orientation": bool(model.root_identity_orientation),
            "phenotype_labels": list(model.phenotype_labels),
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        (staging / _META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.replace(staging, target)
        except OSError:
            if not _export_complete(target):  # another process may have won the race with a complete export
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
    if verbose:
        print(f"[avatar] anny export ready in {time.perf_counter() - start:.1f} s", flush=True)
    return target


class AnnyBody(BodyModel):
    """anny behind the :class:`BodyModel` interface, in float32 (``.to(torch.float64)`` works for gradchecks)."""

    name = "anny"
    up_axis = "z"

    def __init__(self, export_dir: str | Path | None = None) -> None:
        super().__init__()
        import anny
        from anny.models.model_data import ModelData
        from safetensors import safe_open

        folder = Path(export_dir) if export_dir is not None else ensure_anny_export()
        if not _export_complete(folder):
            raise FileNotFoundError(f"{folder}: not a complete anny export (expected {_MODEL_FILE}, {_KEYPOINT_FILE}, {_META_FILE})")
        meta = json.loads((folder / _META_FILE).read_text())
        data = ModelData.load_safetensors(folder / _MODEL_FILE)
        self._anny = anny.Anny.from_model_data(
            data,
            skinning_method="lbs",
            pose_parameterization=meta["pose_parameterization"],
            bone_orientation=meta["bone_orientation"],
            root_identity_orientation=meta["root_identity_orientation"],
        )
        self._anny.requires_grad_(False)
        self.bone_names = tuple(self._anny.bone_labels)
        self.bone_parents = tuple(int(p) for p in self._anny.bone_parents)
        self.shape_names = tuple(self._anny.phenotype_labels)
        self.register_buffer("faces", data.faces.to(torch.int64), persistent=False)
        self.register_buffer("skin_indices", data.vertex_bone_indices.to(torch.int64), persistent=False)
        self.register_buffer("skin_weights", data.vertex_bone_weights.to(torch.float32), persistent=False)
        self.register_buffer("uvs", data.texture_coordinates, persistent=False)
        self.register_buffer("face_uvs", data.face_texture_coordinate_indices.to(torch.int64), persistent=False)
        with safe_open(str(folder / _KEYPOINT_FILE), framework="pt") as f:
            self.keypoint_names = tuple(json.loads(f.metadata()["labels"]))
            self.register_buffer("keypoint_regressor", f.get_tensor("regression_weights"), persistent=False)

    def default_shape(self) -> Tensor:
        return torch.full((self.shape_dim,), 0.5, dtype=self.dtype, device=self.device)

    def _coefficients(self, shape: Tensor) -> Tensor:
        empty = shape.new_zeros(shape.shape[0], 0)
        return self._anny._get_phenotype_blendshape_coefficients(shape, empty, empty)

    def _rest(self, shape: Tensor) -> RestBody:
        out = self._anny.get_rest_model(self._coefficients(shape))
        return RestBody(vertices=out["rest_vertices"], bone_heads=out["rest_bone_heads"], bone_poses=out["rest_bone_poses"])

    def anny_deltas(self, pose: BodyPose, rest: RestBody) -> Tensor:
        """anny's own pose parameters ``[B, J, 4, 4]`` (``local-ref`` delta transforms) for our ``pose``.

        anny's identity deltas give its *reference* pose, a few degrees away from the rest mesh. We want the zero
        pose to be the rest pose and each bone's axis-angle to act in world axes about its head (as in SMPL), so
        for a bone c of parent p, with ``A_c = U_c R_c^T`` (rest -> reference orientation, ``U`` anny's reference
        orientations, ``R`` the rest bone orientations of this shape), ``D_c = A_p R(theta_c) A_c^T``. The root's
        delta makes its posed frame ``[R(theta_0) R_0 | h_0 + t]``: it turns about its rest head, then moves by t.
        """
        R = axis_angle_to_matrix(pose.rotations)  # [B, J, 3, 3]
        U = self._anny.reference_bone_orientations.to(R.dtype)  # [J, 3, 3]
        R_rest = rest.bone_poses[..., :3, :3]  # [B, J, 3, 3]
        A = U @ R_rest.transpose(-1, -2)
        parents = list(self.bone_parents)
        parents[0] = 0
        deltas = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
        deltas[..., 3, 3] = 1.0
        deltas[:, 1:, :3, :3] = A[:, parents[1:]] @ R[:, 1:] @ A[:, 1:].transpose(-1, -2)
        U0 = U[0]
        deltas[:, 0, :3, :3] = U0 @ R[:, 0] @ R_rest[:, 0] @ U0.T
        deltas[:, 0, :3, 3] = (rest.bone_heads[:, 0] + pose.translation) @ U0.T
        return deltas

    def _bone_transforms(self, pose: BodyPose, rest: RestBody) -> tuple[Tensor, Tensor]:
        transforms, poses = self._anny.get_bone_transforms(self.anny_deltas(pose, rest), rest.bone_poses)
        return transforms, poses[..., :3, 3]

    def anny_forward_vertices(self, pose: BodyPose, shape: Tensor | None = None) -> Tensor:
        """anny's own forward pass for ``pose`` (the reference our skinning is tested against), ``[B, V, 3]``."""
        pose = self._batched_pose(pose)
        shape = self._batched_shape(shape, pose.rotations.shape[0])
        rest = self._rest(shape)
        return self._anny(pose_parameters=self.anny_deltas(pose, rest), phenotype_kwargs=shape)["vertices"]

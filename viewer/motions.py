"""Motions the viewer plays: our own ``.npz`` format, the frames of a fitted dataset, SMPL/AMASS sequences retargeted
to the anny rig, and preset poses.

Our motion file (``avatar-motion`` version 1) is a plain ``.npz`` without pickled objects::

    format          str   "avatar-motion"
    format_version  int   1
    bone_names      [J]   unicode strings (the rig's bone names; a subset of the target rig's bones is fine)
    rotations       [T, J, 3] float32 axis-angle per bone (``avatar.types.BodyPose`` convention)
    translation     [T, 3] float32 metres (root, added after the root rotation)
    fps             float  frames per second (> 0)

SMPL/AMASS ``.npz`` (``poses [T, >= 72]`` axis-angle of SMPL's 24 joints (SMPL-H/X files carry hands after them),
``trans [T, 3]``, optional ``mocap_framerate`` / ``fps``) are retargeted by :func:`retarget_smpl`: SMPL and anny
both store per-bone rotations relative to the parent in world-aligned rest axes (``BodyPose``), so a SMPL joint's
rotation becomes the rotation of the anny bone that starts at the same anatomical joint, expressed in anny's axes
(``theta_anny = C theta_smpl`` with ``C`` the y-up -> z-up change of frame, see :data:`SMPL_TO_ANNY_AXES`). Bones of
anny without a SMPL counterpart (twist bones, toes, fingers, the extra spine bones) stay at rest; the composed
rotation down each chain is SMPL's. The table (:data:`SMPL_TO_ANNY`) is by name, checked against the rig.

Hand-written because no library maps SMPL to anny's MakeHuman skeleton; the mapping is a table and a change of
axes, tested with the fake SMPL model (tests/viewer/test_motions.py).
"""

from __future__ import annotations

import argparse
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from avatar.types import BodyPose

FORMAT = "avatar-motion"
FORMAT_VERSION = 1
DEFAULT_WALK = Path(__file__).resolve().parents[1] / "data" / "motions" / "walk.npz"

#: SMPL joint name (``avatar.body.smpl_body``'s names, SMPL's kinematic order) -> the anny bone whose head sits at the
#: same anatomical joint and which that joint's rotation turns. ``None``: not retargeted (anny bone stays at rest).
SMPL_TO_ANNY: dict[str, str | None] = {
    "pelvis": "root",
    "left_hip": "upperleg01.L",
    "right_hip": "upperleg01.R",
    "spine1": "spine04",
    "left_knee": "lowerleg01.L",
    "right_knee": "lowerleg01.R",
    "spine2": "spine02",
    "left_ankle": "foot.L",
    "right_ankle": "foot.R",
    "spine3": "spine01",
    "left_foot": None,  # SMPL's toe joint: anny has five toe chains
    "right_foot": None,
    "neck": "neck01",
    "left_collar": "clavicle.L",
    "right_collar": "clavicle.R",
    "head": "head",
    "left_shoulder": "upperarm01.L",
    "right_shoulder": "upperarm01.R",
    "left_elbow": "lowerarm01.L",
    "right_elbow": "lowerarm01.R",
    "left_wrist": "wrist.L",
    "right_wrist": "wrist.R",
    "left_hand": None,  # SMPL's hand joint: anny has finger chains
    "right_hand": None,
}
SMPL_JOINTS = tuple(SMPL_TO_ANNY)

#: Change of frame from SMPL's canonical axes (y up, body facing +z, left = +x) to anny's (z up, facing -y, left =
#: +x): a +90 degree rotation about x. Columns are SMPL's x, y, z in anny's frame.
SMPL_TO_ANNY_AXES = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class Motion:
    """A pose sequence on a named rig.

    bone_names:  [J] bone names; rotations: [T, J, 3] float32 axis-angle; translation: [T, 3] float32 metres;
    fps: frames per second; name: shown in the viewer.
    """

    bone_names: tuple[str, ...]
    rotations: Tensor
    translation: Tensor
    fps: float
    name: str = "motion"

    def __post_init__(self) -> None:
        J = len(self.bone_names)
        if self.rotations.ndim != 3 or self.rotations.shape[1:] != (J, 3):
            raise ValueError(f"Motion {self.name!r}: rotations must be [T, {J}, 3], got {tuple(self.rotations.shape)}")
        if self.translation.shape != (self.rotations.shape[0], 3):
            raise ValueError(f"Motion {self.name!r}: translation must be [{self.rotations.shape[0]}, 3], got "
                             f"{tuple(self.translation.shape)}")
        if self.rotations.shape[0] < 1:
            raise ValueError(f"Motion {self.name!r}: has no frames")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"Motion {self.name!r}: fps must be a positive number, got {self.fps}")
        if len(set(self.bone_names)) != J:
            raise ValueError(f"Motion {self.name!r}: bone names are not unique")

    @property
    def num_frames(self) -> int:
        return int(self.rotations.shape[0])

    def pose(self, frame: int) -> BodyPose:
        """The ``BodyPose`` (rotations [J, 3], translation [3]) of ``frame`` (wrapped around the sequence)."""
        i = int(frame) % self.num_frames
        return BodyPose(self.rotations[i], self.translation[i])

    def on_rig(self, rig_bone_names: Sequence[str]) -> "Motion":
        """The same motion on a rig's bone order: bones the motion lacks stay at rest; a bone the rig lacks is an
        error naming it."""
        rig = list(rig_bone_names)
        unknown = [b for b in self.bone_names if b not in rig]
        if unknown:
            raise ValueError(f"Motion {self.name!r}: bones {unknown[:8]} are not in the rig "
                             f"({len(rig)} bones: {', '.join(rig[:6])}, ...)")
        if tuple(rig) == self.bone_names:
            return self
        rot = torch.zeros(self.num_frames, len(rig), 3, dtype=self.rotations.dtype)
        rot[:, [rig.index(b) for b in self.bone_names]] = self.rotations
        return Motion(tuple(rig), rot, self.translation, self.fps, self.name)


# ------------------------------------------------------------------------------------------------------------------
# our .npz format


def save_motion(path: str | Path, motion: Motion) -> Path:
    """Write ``motion`` as an ``avatar-motion`` ``.npz`` atomically (no pickled objects)."""
    from avatar.io import atomic_file

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: motion files end in .npz")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, format=np.array(FORMAT), format_version=np.array(FORMAT_VERSION),
                     bone_names=np.array(motion.bone_names, dtype=np.str_),
                     rotations=motion.rotations.detach().cpu().numpy().astype(np.float32),
                     translation=motion.translation.detach().cpu().numpy().astype(np.float32),
                     fps=np.array(float(motion.fps)))
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such motion file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz motion file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz motion file ({err})") from None
    except ValueError as err:  # object arrays need pickle, which we never load
        raise ValueError(f"{path}: holds pickled objects or is corrupt; motion files must be plain arrays ({err})") \
            from None


def _array(path: Path, data: dict, key: str, ndim: int, what: str) -> np.ndarray:
    if key not in data:
        raise ValueError(f"{path}: missing field '{key}' ({what}); found {sorted(data)}")
    a = data[key]
    if a.ndim != ndim:
        raise ValueError(f"{path}: field '{key}' must be {what}, got shape {a.shape}")
    if a.dtype.kind in "fiu" and not np.isfinite(a).all():
        raise ValueError(f"{path}: field '{key}' holds NaN or infinite values")
    return a


def load_motion(path: str | Path) -> Motion:
    """Read and validate an ``avatar-motion`` ``.npz``; every problem is a ``ValueError`` naming the file and field
    (``FileNotFoundError`` for a missing file). A SMPL/AMASS file is recognised and pointed at :func:`load_smpl_motion`."""
    path = Path(path)
    data = _read_npz(path)
    if "format" not in data and "poses" in data:
        raise ValueError(f"{path}: a SMPL/AMASS motion ('poses', 'trans'); it needs a SMPL model folder to be "
                         f"retargeted to anny (avatar-viewer --smpl-dir DIR)")
    fmt = str(_array(path, data, "format", 0, "a string"))
    if fmt != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}, got {fmt!r}")
    version = _array(path, data, "format_version", 0, "an integer")
    if version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format_version' is {version!r}; this version reads {FORMAT_VERSION}")
    names = _array(path, data, "bone_names", 1, "[J] strings")
    if names.dtype.kind != "U":
        raise ValueError(f"{path}: field 'bone_names' must hold strings, got dtype {names.dtype}")
    rot = _array(path, data, "rotations", 3, "[T, J, 3] axis-angle")
    trans = _array(path, data, "translation", 2, "[T, 3] metres")
    fps = _array(path, data, "fps", 0, "a number")
    if rot.dtype.kind != "f" or rot.shape[1:] != (len(names), 3) or rot.shape[0] < 1:
        raise ValueError(f"{path}: field 'rotations' must be float [T, {len(names)}, 3] with T >= 1, got "
                         f"{rot.dtype} {rot.shape}")
    if trans.dtype.kind != "f" or trans.shape != (rot.shape[0], 3):
        raise ValueError(f"{path}: field 'translation' must be float [{rot.shape[0]}, 3], got {trans.dtype} "
                         f"{trans.shape}")
    if fps.dtype.kind not in "fiu" or not float(fps) > 0:
        raise ValueError(f"{path}: field 'fps' must be a positive number, got {fps!r}")
    try:
        return Motion(tuple(str(n) for n in names), torch.from_numpy(rot.astype(np.float32)),
                      torch.from_numpy(trans.astype(np.float32)), float(fps), path.stem)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ------------------------------------------------------------------------------------------------------------------
# SMPL / AMASS retargeting


def retarget_smpl(
    poses: Tensor,  # [T, 3 * K] with K >= 24 (SMPL's 24 joints first), axis-angle
    trans: Tensor,  # [T, 3] metres
    rig_bone_names: Sequence[str],
    smpl_joint_names: Sequence[str] = SMPL_JOINTS,
    up_axis: str = "y",
    relative_translation: bool = True,
) -> tuple[Tensor, Tensor]:
    """SMPL rotations and translation -> anny ``(rotations [T, J, 3], translation [T, 3])`` (see the module
    docstring). ``up_axis="y"`` converts SMPL's canonical y-up frame to anny's z-up frame; ``"z"`` keeps the axes
    (sequences already exported z-up). ``relative_translation`` starts the root at the rig's rest position
    (``trans - trans[0]``)."""
    if poses.ndim != 2 or poses.shape[1] < 72 or poses.shape[1] % 3:
        raise ValueError(f"retarget_smpl: poses must be [T, 3K] with K >= 24 joints, got {tuple(poses.shape)}")
    if trans.shape != (poses.shape[0], 3):
        raise ValueError(f"retarget_smpl: trans must be [{poses.shape[0]}, 3], got {tuple(trans.shape)}")
    if up_axis not in ("y", "z"):
        raise ValueError(f"retarget_smpl: up_axis must be 'y' or 'z', got {up_axis!r}")
    rig = list(rig_bone_names)
    missing = [b for b in SMPL_TO_ANNY.values() if b is not None and b not in rig]
    if missing:
        raise ValueError(f"retarget_smpl: the rig lacks the anny bones {missing}; retargeting targets the anny rig")
    C = torch.from_numpy(SMPL_TO_ANNY_AXES if up_axis == "y" else np.eye(3)).to(torch.float64)
    src = poses.to(torch.float64)[:, :72].unflatten(1, (24, 3))  # [T, 24, 3]
    out = torch.zeros(poses.shape[0], len(rig), 3, dtype=torch.float64)
    for j, name in enumerate(smpl_joint_names[:24]):
        target = SMPL_TO_ANNY.get(name)
        if target is not None:
            # a rotation vector changes frame like a vector: R' = C R C^T  <=>  theta' = C theta
            out[:, rig.index(target)] = src[:, j] @ C.T
    t = trans.to(torch.float64)
    if relative_translation:
        t = t - t[:1]
    return out.float(), (t @ C.T).float()


def load_smpl_motion(path: str | Path, rig_bone_names: Sequence[str], smpl_dir: str | Path, up_axis: str = "y",
                     fps: float | None = None) -> Motion:
    """A SMPL/AMASS ``.npz`` (``poses``, ``trans``, optional ``mocap_framerate``/``fps``) retargeted to the rig.

    ``smpl_dir`` must hold a SMPL model (``smpl/SMPL_NEUTRAL.pkl`` or the file itself): it is loaded to check that
    the sequence's joints are SMPL's 24 in SMPL's order (the model's kinematic tree must match the table's)."""
    from avatar.body import SMPLBody

    path = Path(path)
    data = _read_npz(path)
    poses = _array(path, data, "poses", 2, "[T, 3K] axis-angle, K >= 24")
    trans = _array(path, data, "trans", 2, "[T, 3] metres")
    if poses.shape[1] < 72 or poses.shape[1] % 3 or poses.shape[0] < 1:
        raise ValueError(f"{path}: field 'poses' must be [T, 3K] with K >= 24 SMPL joints, got {poses.shape}")
    if trans.shape != (poses.shape[0], 3):
        raise ValueError(f"{path}: field 'trans' must be [{poses.shape[0]}, 3], got {trans.shape}")
    smpl = SMPLBody(smpl_dir)
    if smpl.bone_names[:24] != SMPL_JOINTS:
        raise ValueError(f"{smpl_dir}: the SMPL model's joints are not SMPL's 24 ({smpl.bone_names[:4]} ...)")
    rate = fps
    for key in ("mocap_framerate", "fps", "mocap_frame_rate"):
        if rate is None and key in data:
            rate = float(data[key])
    rot, t = retarget_smpl(torch.from_numpy(poses.astype(np.float64)), torch.from_numpy(trans.astype(np.float64)),
                           rig_bone_names, smpl.bone_names, up_axis=up_axis)
    return Motion(tuple(rig_bone_names), rot, t, float(rate or 30.0), path.stem)


# ------------------------------------------------------------------------------------------------------------------
# the frames of a fitted dataset


def load_dataset_motion(root: str | Path, rig_bone_names: Sequence[str], smpl_dir: str | Path | None = None,
                        fps: float = 25.0, body=None) -> Motion:
    """The per-frame body poses of a dataset folder readable by ``avatar.data`` (ZJU-MoCap or PeopleSnapshot
    layouts, anny or SMPL parameters). SMPL parameters are retargeted (with ``smpl_dir``); anny ones are used as
    they are. Only the parameter files are read, never the images. ``body``: the anny body model (built if None)."""
    from avatar.data import detect_layout, read_body_model_info
    from avatar.data import peoplesnapshot as ps
    from avatar.data import zju

    root = Path(root)
    layout = detect_layout(root)
    info = read_body_model_info(root)
    if info.name not in ("anny", "smpl"):
        raise ValueError(f"{root}: the viewer plays anny or SMPL parameters, this dataset holds {info.name}")
    if info.name == "smpl" and smpl_dir is None:
        raise ValueError(f"{root}: this dataset holds SMPL parameters; pass a SMPL model folder (--smpl-dir) to "
                         f"retarget them to anny")
    if layout == "zju":
        subject = zju.open_zju(root)
        if info.name == "anny":
            from avatar.body import AnnyBody

            model = body if body is not None else AnnyBody()
        else:
            from avatar.body import SMPLBody

            model = SMPLBody(smpl_dir)
        heads = zju.RootHeads(model)
        rots, trans = [], []
        for f in range(subject.num_frames):
            params = zju.load_zju_params(subject.param_path(f), subject.body)
            pose = zju.params_to_pose(params, heads(params.shapes))
            rots.append(pose.rotations)
            trans.append(pose.translation)
        rot, tr = torch.stack(rots).float(), torch.stack(trans).float()
    else:
        subject = ps.open_snapshot(root)
        rot = torch.from_numpy(np.asarray(subject.poses.rotations, dtype=np.float32))
        tr = torch.from_numpy(np.asarray(subject.poses.translation, dtype=np.float32))
    if info.name == "smpl":
        rot, tr = retarget_smpl(rot.flatten(1), tr, rig_bone_names)
        return Motion(tuple(rig_bone_names), rot, tr, fps, root.name)
    if rot.shape[1] != len(rig_bone_names):
        raise ValueError(f"{root}: parameters for {rot.shape[1]} bones, the avatar's rig has {len(rig_bone_names)}")
    return Motion(tuple(rig_bone_names), rot, tr, fps, root.name)


def load_any_motion(path: str | Path, rig_bone_names: Sequence[str], smpl_dir: str | Path | None = None,
                    body=None) -> Motion:
    """A folder: dataset frames; an ``.npz`` with ``poses``: SMPL/AMASS (needs ``smpl_dir``); else our format."""
    path = Path(path)
    if path.is_dir():
        return load_dataset_motion(path, rig_bone_names, smpl_dir, body=body)
    if smpl_dir is not None and path.is_file():
        data = _read_npz(path)
        if "poses" in data and "format" not in data:
            return load_smpl_motion(path, rig_bone_names, smpl_dir)
    return load_motion(path).on_rig(rig_bone_names)


# ------------------------------------------------------------------------------------------------------------------
# presets and the shipped walk


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-12)


def _rotation_between(a: Tensor, b: Tensor) -> Tensor:
    """Axis-angle ``[3]`` of the shortest rotation taking direction ``a`` to direction ``b``."""
    a, b = _unit(a.double()), _unit(b.double())
    axis = torch.linalg.cross(a, b)
    s, c = axis.norm(), torch.dot(a, b)
    if float(s) < 1e-12:
        return torch.zeros(3, dtype=torch.float64)
    return axis / s * torch.atan2(s, c)


def preset_poses(body, rest_heads: Tensor, num_walk_frames: int = 4) -> dict[str, BodyPose]:
    """Named poses for the rig of ``body`` (anny) with ``rest_heads [J, 3]``: "A-pose" (anny's rest pose, arms
    about 45 degrees down), "T-pose" (upper arms raised to horizontal, forearms and hands following) and
    ``num_walk_frames`` frames of ``avatar.data.synthetic.make_motion``'s "free" motion ("walk 1", ...)."""
    from avatar.data.synthetic import make_motion

    J = body.num_bones
    heads = rest_heads.detach().cpu().double()
    presets = {"A-pose": BodyPose.zeros(J)}
    t_pose = torch.zeros(J, 3, dtype=torch.float64)
    for side in ("L", "R"):
        a, b = body.bone_index(f"upperarm01.{side}"), body.bone_index(f"lowerarm01.{side}")
        d = heads[b] - heads[a]
        horizontal = torch.stack([d[0], d[1], torch.zeros((), dtype=torch.float64)])
        t_pose[a] = _rotation_between(d, horizontal)
    presets["T-pose"] = BodyPose(t_pose.float(), torch.zeros(3))
    walk = make_motion(body, rest_heads, "free", 100, seed=0)
    for k in range(num_walk_frames):
        i = k * (100 // max(num_walk_frames, 1))
        presets[f"walk {k + 1}"] = BodyPose(walk.rotations[i], walk.translation[i])
    return presets


def walk_cycle(body, rest_heads: Tensor, num_frames: int = 50, fps: float = 25.0, stride: float = 0.45) -> Motion:
    """An in-place walking cycle (loops seamlessly) on anny: hips flex +-``stride`` radians in the sagittal plane
    in antiphase, knees bend during the swing, arms swing opposite to the legs with bent elbows, the pelvis bobs 2 cm
    twice per cycle and the chest counter-rotates. anny faces -y with z up."""
    if num_frames < 2:
        raise ValueError(f"walk_cycle: num_frames must be >= 2, got {num_frames}")
    J = body.num_bones
    heads = rest_heads.detach().cpu().double()
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    front = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    phase = 2 * math.pi * torch.arange(num_frames, dtype=torch.float64) / num_frames
    rot = torch.zeros(num_frames, J, 3, dtype=torch.float64)
    trans = torch.zeros(num_frames, 3, dtype=torch.float64)

    def bone_dir(a: str, b: str) -> Tensor:
        return _unit(heads[body.bone_index(b)] - heads[body.bone_index(a)])

    def axis(d: Tensor, towards: Tensor) -> Tensor:
        return _unit(torch.linalg.cross(d, towards))

    def add(name: str, ax: Tensor, angle: Tensor) -> None:
        rot[:, body.bone_index(name)] += angle[:, None] * ax[None]

    for side, offset in (("L", 0.0), ("R", math.pi)):
        p = phase + offset
        leg = bone_dir(f"upperleg01.{side}", f"lowerleg01.{side}")
        add(f"upperleg01.{side}", axis(leg, front), stride * torch.sin(p))
        shin = bone_dir(f"lowerleg01.{side}", f"foot.{side}")
        add(f"lowerleg01.{side}", axis(shin, -front), 0.1 + 0.6 * torch.clamp(torch.sin(p + math.pi / 3), min=0))
        arm = bone_dir(f"upperarm01.{side}", f"lowerarm01.{side}")
        add(f"upperarm01.{side}", axis(arm, front), -0.6 * stride * torch.sin(p))
        fore = bone_dir(f"lowerarm01.{side}", f"wrist.{side}")
        add(f"lowerarm01.{side}", axis(fore, front), 0.35 + 0.15 * torch.sin(p + math.pi))
    add("spine02", up, 0.08 * torch.sin(phase))
    trans[:, 2] = 0.02 * torch.cos(2 * phase)
    R = axis_angle_to_matrix(rot)
    rot = matrix_to_axis_angle(R)
    return Motion(tuple(body.bone_names), rot.float(), trans.float(), float(fps), "walk")


def write_walk(path: str | Path = DEFAULT_WALK) -> Path:
    """Generate the shipped walking motion (``data/motions/walk.npz``) on anny's mean shape."""
    from avatar.body import AnnyBody

    body = AnnyBody()
    with torch.no_grad():
        heads = body.rest().bone_heads[0]
    return save_motion(path, walk_cycle(body, heads))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Motion files for the avatar viewer.")
    p.add_argument("--write-walk", action="store_true", help=f"write the shipped walk cycle to {DEFAULT_WALK}")
    p.add_argument("--out", type=Path, default=DEFAULT_WALK, help="where --write-walk writes")
    args = p.parse_args(argv)
    if not args.write_walk:
        p.error("nothing to do: pass --write-walk")
    print(f"wrote {write_walk(args.out)}")


if __name__ == "__main__":
    main()

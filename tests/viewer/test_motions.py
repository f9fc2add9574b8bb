import numpy as np
import pytest
import torch

from avatar.body import SMPLBody
from avatar.types import BodyPose
from viewer.motions import (DEFAULT_WALK, SMPL_TO_ANNY, SMPL_TO_ANNY_AXES, Motion, load_any_motion,
                            load_dataset_motion, load_motion, load_smpl_motion, preset_poses, retarget_smpl,
                            save_motion, walk_cycle)


@pytest.fixture(scope="module")
def smpl_body(fake_smpl_file):
    return SMPLBody(fake_smpl_file)


def _motion(gen, T=7, names=("root", "spine", "arm")):
    return Motion(tuple(names), torch.randn(T, len(names), 3, generator=gen), torch.randn(T, 3, generator=gen),
                  30.0, "m")


def test_npz_round_trip(gen, tmp_path):
    m = _motion(gen)
    path = save_motion(tmp_path / "m.npz", m)
    back = load_motion(path)
    assert back.bone_names == m.bone_names and back.fps == 30.0 and back.num_frames == 7
    assert torch.equal(back.rotations, m.rotations) and torch.equal(back.translation, m.translation)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert {"format", "format_version", "bone_names", "rotations", "translation", "fps"} == set(data.files)
    # a pose wraps around the sequence; onto a bigger rig, missing bones are at rest
    assert torch.equal(back.pose(9).rotations, m.rotations[2])
    rig = back.on_rig(("x", "arm", "root", "spine"))
    assert torch.equal(rig.rotations[:, 0], torch.zeros(7, 3)) and torch.equal(rig.rotations[:, 1], m.rotations[:, 2])
    with pytest.raises(ValueError, match=r"bones \['spine'\] are not in the rig"):
        back.on_rig(("root", "arm"))


def _write(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _good(gen):
    m = _motion(gen)
    return dict(format=np.array("avatar-motion"), format_version=np.array(1), bone_names=np.array(m.bone_names),
                rotations=m.rotations.numpy(), translation=m.translation.numpy(), fps=np.array(30.0))


@pytest.mark.parametrize("case, exc, message", [
    ("missing", FileNotFoundError, "no such motion file"),
    ("garbage", ValueError, "not a readable .npz"),
    ("pickled", ValueError, "pickled objects"),
    ("no_rotations", ValueError, "missing field 'rotations'"),
    ("bad_shape", ValueError, "field 'rotations' must be float [T, 3, 3]"),
    ("nan", ValueError, "field 'translation' holds NaN"),
    ("fps", ValueError, "field 'fps' must be a positive number"),
    ("version", ValueError, "field 'format_version'"),
    ("format", ValueError, "field 'format' must be 'avatar-motion'"),
    ("translation", ValueError, "field 'translation' must be float [7, 3]"),
    ("smpl", ValueError, "SMPL/AMASS motion"),
])
def test_bad_files(gen, tmp_path, case, exc, message):
    path = tmp_path / "bad.npz"
    a = _good(gen)
    if case == "garbage":
        path.write_bytes(b"not a zip file")
    elif case == "pickled":
        a["bone_names"] = np.array([object(), 1, "x"], dtype=object)
        with open(path, "wb") as f:
            np.savez(f, **a)
    elif case != "missing":
        if case == "no_rotations":
            a.pop("rotations")
        elif case == "bad_shape":
            a["rotations"] = a["rotations"][:, :, :2]
        elif case == "nan":
            a["translation"][3, 1] = np.nan
        elif case == "fps":
            a["fps"] = np.array(0.0)
        elif case == "version":
            a["format_version"] = np.array(2)
        elif case == "format":
            a["format"] = np.array("other")
        elif case == "translation":
            a["translation"] = a["translation"][:, :2]
        elif case == "smpl":
            a = {"poses": np.zeros((3, 72)), "trans": np.zeros((3, 3))}
        _write(path, **a)
    with pytest.raises(exc) as info:
        load_motion(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_shipped_walk_is_the_generated_one(anny_body):
    m = load_motion(DEFAULT_WALK)
    assert m.bone_names == anny_body.bone_names and m.num_frames == 50 and m.fps == 25.0
    with torch.no_grad():
        again = walk_cycle(anny_body, anny_body.rest().bone_heads[0])
    torch.testing.assert_close(m.rotations, again.rotations, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.translation, again.translation, atol=1e-6, rtol=0)
    # it walks: the left thigh swings forward (-y) and back by roughly +-stride over the cycle
    with torch.no_grad():
        out = anny_body(BodyPose(m.rotations, m.translation))
    knee = anny_body.bone_index("lowerleg01.L")
    y = out.joints[:, knee, 1]
    assert float(y.max() - y.min()) > 0.2


def test_presets(anny_body):
    with torch.no_grad():
        heads = anny_body.rest().bone_heads[0]
        presets = preset_poses(anny_body, heads)
        assert {"A-pose", "T-pose", "walk 1", "walk 4"} <= set(presets)
        assert torch.equal(presets["A-pose"].rotations, torch.zeros(anny_body.num_bones, 3))
        out = anny_body(presets["T-pose"])
    for side in ("L", "R"):
        a, b = anny_body.bone_index(f"upperarm01.{side}"), anny_body.bone_index(f"lowerarm01.{side}")
        d = out.joints[0, b] - out.joints[0, a]
        assert abs(float(d[2])) < 1e-4 * float(d.norm()) + 1e-5  # the upper arm is horizontal
        d0 = heads[b] - heads[a]
        assert float(d0[2]) < -0.1  # it was not in the A-pose


def test_smpl_elbow_bends_annys_forearm_the_same_way(anny_body, smpl_body):
    """A SMPL rotation of the left elbow (and then of the shoulder too) moves anny's left forearm by the same
    rotation, expressed in anny's z-up axes; checked with both body models' own forward passes."""
    C = torch.from_numpy(SMPL_TO_ANNY_AXES).float()
    el, sh = smpl_body.bone_index("left_elbow"), smpl_body.bone_index("left_shoulder")
    fore = anny_body.bone_index("lowerarm01.L")
    for rotations in ({el: [0.0, 0.9, 0.0]}, {el: [0.0, 0.9, 0.0], sh: [0.3, 0.0, -0.5]}):
        poses = torch.zeros(2, 72)
        for j, r in rotations.items():
            poses[1, 3 * j:3 * j + 3] = torch.tensor(r)
        trans = torch.tensor([[0.0, 0.9, 0.0], [0.1, 0.95, 0.2]])
        rot, t = retarget_smpl(poses, trans, anny_body.bone_names)
        with torch.no_grad():
            so = smpl_body(BodyPose(poses.unflatten(1, (24, 3)), trans))
            ao = anny_body(BodyPose(rot, t))
            a0 = anny_body(BodyPose.zeros(anny_body.num_bones))
        R_smpl = so.bone_transforms[1, el, :3, :3].float()  # world rotation of SMPL's forearm
        R_anny = ao.bone_transforms[1, fore, :3, :3]
        torch.testing.assert_close(R_anny, C @ R_smpl @ C.T, atol=1e-5, rtol=0)
        # SMPL's left forearm (elbow -> wrist) turned by R_smpl; anny's by the same rotation in anny's axes
        wr_s = smpl_body.bone_index("left_wrist")
        ds0 = so.joints[0, wr_s] - so.joints[0, el]
        ds1 = so.joints[1, wr_s] - so.joints[1, el]
        torch.testing.assert_close(ds1, (R_smpl @ ds0.double().float()), atol=1e-5, rtol=0)
        wr_a = anny_body.bone_index("wrist.L")
        da0 = a0.joints[0, wr_a] - a0.joints[0, fore]
        da1 = ao.joints[1, wr_a] - ao.joints[1, fore]
        torch.testing.assert_close(da1, C @ R_smpl @ C.T @ da0, atol=1e-5, rtol=0)
        assert float(torch.linalg.vector_norm(da1 - da0)) > 0.05  # it really bent
        # translation: relative to the first frame, in anny's axes (SMPL +y up -> anny +z, SMPL +z -> anny -y)
        torch.testing.assert_close(t[1], torch.tensor([0.1, -0.2, 0.05]), atol=1e-6, rtol=0)


def test_smpl_file_and_table(anny_body, fake_smpl_file, tmp_path, gen):
    from avatar.body.smpl_body import _SMPL_BONES

    assert tuple(SMPL_TO_ANNY) == _SMPL_BONES  # the table covers SMPL's joints in SMPL's order
    poses = 0.3 * torch.randn(5, 156, generator=gen)  # SMPL-H width: hands after the 24 body joints
    path = _write(tmp_path / "amass.npz", poses=poses.numpy(), trans=np.zeros((5, 3)), mocap_framerate=np.array(60.0))
    m = load_any_motion(path, anny_body.bone_names, smpl_dir=fake_smpl_file.parent.parent)
    assert m.fps == 60.0 and m.rotations.shape == (5, anny_body.num_bones, 3)
    knee = anny_body.bone_index("lowerleg01.R")
    expected = poses[:, 3 * 5:3 * 6].double() @ torch.from_numpy(SMPL_TO_ANNY_AXES).T
    torch.testing.assert_close(m.rotations[:, knee], expected.float(), atol=1e-6, rtol=0)
    unmapped = [i for i, b in enumerate(anny_body.bone_names) if b not in SMPL_TO_ANNY.values()]
    assert torch.equal(m.rotations[:, unmapped], torch.zeros(5, len(unmapped), 3))
    with pytest.raises(ValueError, match="SMPL/AMASS motion"):
        load_any_motion(path, anny_body.bone_names)  # without a SMPL model folder
    bad = _write(tmp_path / "bad.npz", poses=np.zeros((5, 30)), trans=np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"bad.npz: field 'poses' must be \[T, 3K\]"):
        load_smpl_motion(bad, anny_body.bone_names, fake_smpl_file)


def test_dataset_frames(anny_body, tmp_path):
    from tests.data.fixtures_datasets import write_zju

    data = write_zju(tmp_path / "CoreView_377", anny_body, num_frames=3, num_cameras=1)
    m = load_dataset_motion(tmp_path / "CoreView_377", anny_body.bone_names, body=anny_body)
    assert m.num_frames == 3 and m.name == "CoreView_377"
    pose = data["pose"]
    # EasyMocap (Rh, Th) round trip: the root rotation and the translation come back, the body rotations exactly
    torch.testing.assert_close(m.rotations[:, 1:], pose.rotations[:, 1:].float(), atol=1e-5, rtol=0)
    with torch.no_grad():
        mine = anny_body(BodyPose(m.rotations, m.translation), data["shape"]).vertices
    np.testing.assert_allclose(mine.numpy(), np.stack(data["world"]), atol=2e-4)
    assert load_any_motion(tmp_path / "CoreView_377", anny_body.bone_names, body=anny_body).num_frames == 3
    with pytest.raises(FileNotFoundError, match="not a known dataset layout"):
        load_any_motion(tmp_path, anny_body.bone_names)

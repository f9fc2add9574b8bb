import math
import subprocess
import sys
from pathlib import Path

import torch

from avatar.types import BodyPose
from viewer.app import apply_controls, joint_controls, main, parse_args

REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "viewer.app", *map(str, args), "--port", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


class _InProcess:
    """``main()`` called in this process (same code path as the subprocess runs, without a second torch import)."""

    def __init__(self, capsys, *args):
        self.returncode = main([*map(str, args), "--port", "1"])
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("avatar-viewer: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_missing_bundle(tmp_path):
    r = _run(tmp_path / "nope")
    _assert_clean_error(r, str(tmp_path / "nope"), "no such avatar bundle folder")


def test_corrupt_bundles(tmp_path, tiny_bundle, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    (bad / "avatar.safetensors").write_bytes(b"garbage")
    _assert_clean_error(_run(bad), str(bad / "avatar.safetensors"), "not a readable safetensors")
    (bad / "avatar.json").write_text("{nope")
    _assert_clean_error(_InProcess(capsys, bad), str(bad / "avatar.json"), "not valid JSON")


def test_bundle_without_skin_weights_and_bad_motion(tmp_path, tiny_bundle, anny_body, capsys):
    from avatar.export.bundle import load_bundle, save_bundle

    b = load_bundle(tiny_bundle)
    g = b.gaussians
    from avatar.types import GaussianSet

    path = save_bundle(tmp_path / "noskin", GaussianSet(g.means, g.quats, g.scales, g.opacities, g.colors), "anny",
                       b.bone_names, b.bone_parents, b.shape, {})
    _assert_clean_error(_InProcess(capsys, path), str(path), "no skin weights")
    motion = tmp_path / "walk.npz"
    motion.write_bytes(b"\x00" * 10)
    _assert_clean_error(_InProcess(capsys, tiny_bundle, "--motion", motion), str(motion), "not a readable .npz")


def test_defaults_bind_loopback():
    a = parse_args(["some/bundle"])
    assert a.host == "127.0.0.1" and a.port == 8080 and a.motion is None and a.smpl_dir is None


def test_joint_controls_turn_the_named_bones(anny_body):
    with torch.no_grad():
        heads = anny_body.rest().bone_heads[0]
        controls = joint_controls(anny_body, heads)
        labels = [c.label for c in controls]
        assert {"Root turn", "Left shoulder", "Right elbow", "Left hip", "Right knee", "Spine", "Neck"} <= set(labels)
        zero = BodyPose.zeros(anny_body.num_bones)
        rest = anny_body(zero).joints[0]

        def joints(label, deg):
            degrees = [deg if c.label == label else 0 for c in controls]
            return anny_body(apply_controls(zero, controls, degrees, anny_body.bone_names)).joints[0]

        i = anny_body.bone_index
        # raising the left shoulder lifts the left elbow, not the right one
        up = joints("Left shoulder", 60)
        assert float(up[i("lowerarm01.L"), 2] - rest[i("lowerarm01.L"), 2]) > 0.1
        torch.testing.assert_close(up[i("lowerarm01.R")], rest[i("lowerarm01.R")])
        # flexing the right hip brings the right knee forward (-y)
        hip = joints("Right hip", 45)
        assert float(hip[i("lowerleg01.R"), 1] - rest[i("lowerleg01.R"), 1]) < -0.1
        # bending the left knee moves the left ankle back (+y)
        knee = joints("Left knee", 60)
        assert float(knee[i("foot.L"), 1] - rest[i("foot.L"), 1]) > 0.1
        # the root turn is a rotation about the vertical: heights are kept, the left hand goes round
        turn = joints("Root turn", 90)
        torch.testing.assert_close(turn[:, 2], rest[:, 2], atol=1e-5, rtol=0)
        h0 = rest[i("wrist.L")] - rest[0]
        h1 = turn[i("wrist.L")] - turn[0]
        ang = math.atan2(float(h1[1]), float(h1[0])) - math.atan2(float(h0[1]), float(h0[0]))
        assert abs((ang + math.pi) % (2 * math.pi) - math.pi - math.pi / 2) < 1e-3
        # sliders compose with a base pose instead of replacing it
        base = BodyPose(0.2 * torch.ones(anny_body.num_bones, 3), torch.zeros(3))
        same = apply_controls(base, controls, [0] * len(controls), anny_body.bone_names)
        assert torch.equal(same.rotations, base.rotations)


def test_viewer_inputs_with_a_motion(tiny_bundle, tmp_path, anny_body):
    from viewer.app import ViewerArgs, load_viewer_inputs
    from viewer.motions import DEFAULT_WALK, Motion, save_motion

    short = save_motion(tmp_path / "wave.npz", Motion(("upperarm01.L",), torch.full((4, 1, 3), 0.3),
                                                      torch.zeros(4, 3), 10.0, "wave"))
    poser, motions, presets = load_viewer_inputs(ViewerArgs(tiny_bundle, motion=short))
    assert list(motions) == ["wave", "walk (shipped)"]  # the user's motion first
    wave = motions["wave"]
    assert wave.bone_names == anny_body.bone_names and wave.fps == 10.0
    j = anny_body.bone_index("upperarm01.L")
    assert torch.equal(wave.rotations[:, j], torch.full((4, 3), 0.3))
    others = [i for i in range(anny_body.num_bones) if i != j]
    assert torch.equal(wave.rotations[:, others], torch.zeros(4, len(others), 3))  # other bones at rest
    assert motions["walk (shipped)"].num_frames == 50 and str(DEFAULT_WALK).endswith("data/motions/walk.npz")
    assert {"A-pose", "T-pose", "walk 1"} <= set(presets) and len(poser.gaussians) == 3000

import pytest
import torch

from avatar.body import SMPLBody, load_body_model
from avatar.types import BodyPose


@pytest.fixture(scope="module")
def smpl(fake_smpl_file):
    return SMPLBody(fake_smpl_file.parent.parent, model_type="smpl")


def test_structure(smpl):
    assert smpl.num_vertices == 6890 and smpl.num_bones == 24 and smpl.shape_dim == 10
    assert smpl.bone_names[0] == "pelvis" and smpl.bone_parents[:4] == (-1, 0, 0, 0)
    assert smpl.faces.shape == (13776, 3) and smpl.up_axis == "y"
    torch.testing.assert_close(smpl.dense_skin_weights().sum(1), torch.ones(6890), atol=1e-5, rtol=0)


def test_matches_smplx_forward(smpl, gen):
    for _ in range(3):
        pose = BodyPose(0.5 * torch.randn(3, 24, 3, generator=gen), torch.randn(3, 3, generator=gen))
        betas = torch.randn(3, 10, generator=gen)
        ours = smpl(pose, betas)
        ref = smpl.smplx_forward_vertices(pose, betas)
        assert (ours.vertices - ref).abs().max().item() <= 1e-5
        assert ours.pose_offsets.abs().max() > 0  # pose blend shapes are part of it


def test_zero_pose_is_rest(smpl):
    out = smpl(BodyPose.zeros(24))
    torch.testing.assert_close(out.vertices, out.rest.vertices, atol=1e-6, rtol=0)


def test_model_file_path_and_folder(fake_smpl_file):
    by_file = load_body_model("smpl", model_path=str(fake_smpl_file))
    assert by_file.num_vertices == 6890


def test_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="smpl.is.tue.mpg.de"):
        SMPLBody(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="SMPL_NEUTRAL"):
        SMPLBody(tmp_path)
    with pytest.raises(ValueError, match="model_path"):
        load_body_model("smpl")


def test_corrupt_file_names_the_file(tmp_path):
    import pickle

    bad = tmp_path / "SMPL_NEUTRAL.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"v_template": [[0, 0, 0]]}, f)
    with pytest.raises(ValueError, match="SMPL_NEUTRAL.pkl"):
        SMPLBody(bad)

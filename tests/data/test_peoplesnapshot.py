import re

import h5py
import numpy as np
import pytest
import torch

from avatar.body import SMPLBody
from avatar.data.dataset import AvatarDataset
from avatar.data.peoplesnapshot import read_video_frame
from tests.data.fixtures_datasets import K, W, color, mask_box, write_instant_avatar, write_snapshot_raw


@pytest.fixture(scope="module")
def smpl_body(fake_smpl_file):
    return SMPLBody(fake_smpl_file)


def test_raw_layout_smpl(tmp_path, smpl_body, fake_smpl_file):
    data = write_snapshot_raw(tmp_path / "male-3-casual", smpl_body, num_frames=8)
    np.testing.assert_allclose(read_video_frame(tmp_path / "male-3-casual" / "male-3-casual.mp4", 5)[10, 10],
                               data["frames"][5][10, 10], atol=6)
    ds = AvatarDataset(tmp_path / "male-3-casual", smpl_model_path=fake_smpl_file)
    assert len(ds) == 8
    fr = ds[5]
    assert fr.frame_id == 5 and fr.body_model == "smpl" and fr.image.shape == (W, W, 3)
    torch.testing.assert_close(fr.image[10, 10], torch.tensor(data["frames"][5][10, 10] / 255.0, dtype=torch.float32),
                               atol=0.03, rtol=0)
    assert torch.equal(fr.mask, torch.from_numpy(data["masks"][5]).float())
    torch.testing.assert_close(fr.camera.viewmats, torch.eye(4))
    torch.testing.assert_close(fr.pose.rotations, data["pose"].rotations[5])
    torch.testing.assert_close(fr.pose.translation, data["pose"].translation[5])
    torch.testing.assert_close(fr.shape, data["shape"])


def test_instant_avatar_anny_and_refined_poses(tmp_path, anny_body):
    data = write_instant_avatar(tmp_path / "female-3-casual", anny_body, num_frames=6)
    ds = AvatarDataset(tmp_path / "female-3-casual", "peoplesnapshot/female-3-casual", "train", fit="scale",
                       body_model=anny_body, resolution=(12, 16))
    fr = ds[1]
    f = ds.frames[1]
    assert fr.body_model == "anny" and fr.pose.rotations.shape == (104, 3) and fr.image.shape == (12, 16, 3)
    torch.testing.assert_close(fr.pose.rotations, data["pose"].rotations[f])
    torch.testing.assert_close(fr.camera.viewmats, torch.tensor(data["E"], dtype=torch.float32))
    expected = torch.tensor(K, dtype=torch.float32)
    expected[:2] *= 0.5
    torch.testing.assert_close(fr.camera.Ks, expected)
    # refined per-split poses: rows are the split's frames in order
    rot = np.full((len(ds.frames), 104, 3), 0.05, np.float32)
    (tmp_path / "female-3-casual" / "poses").mkdir()
    np.savez(tmp_path / "female-3-casual" / "poses" / "anim_nerf_train.npz", betas=data["shape"][None].numpy(),
             global_orient=rot[:, 0], body_pose=rot[:, 1:].reshape(len(rot), -1), transl=np.zeros((len(rot), 3)))
    ds = AvatarDataset(tmp_path / "female-3-casual", "peoplesnapshot/female-3-casual", "train", fit="scale",
                       body_model=anny_body)
    torch.testing.assert_close(ds[1].pose.rotations, torch.full((104, 3), 0.05))
    assert ds[0].image[3, 3].tolist() == pytest.approx((color(ds.frames[0], 0) / 255.0).tolist(), abs=1e-6)


def _m(path) -> str:
    return re.escape(str(path))


def test_camera_without_intrinsic(tmp_path, anny_body):
    write_instant_avatar(tmp_path / "s", anny_body, num_frames=2)
    np.savez(tmp_path / "s" / "cameras.npz", extrinsic=np.eye(4), height=24, width=32)
    with pytest.raises(ValueError, match=_m(tmp_path / "s" / "cameras.npz") + r".*'intrinsic'"):
        AvatarDataset(tmp_path / "s", body_model=anny_body)


def test_mask_wrong_size(tmp_path, anny_body):
    write_instant_avatar(tmp_path / "s", anny_body, num_frames=4)
    path = tmp_path / "s" / "masks" / "mask_0003.npy"
    np.save(path, np.ones((5, 5), np.float32))
    ds = AvatarDataset(tmp_path / "s", body_model=anny_body)
    assert ds[2].mask.sum() == mask_box(2).sum()
    with pytest.raises(ValueError, match=_m(path)):
        ds[3]


def test_params_wrong_shape(tmp_path, anny_body):
    write_instant_avatar(tmp_path / "s", anny_body, num_frames=2)
    path = tmp_path / "s" / "poses.npz"
    np.savez(path, betas=np.zeros((1, 6)), global_orient=np.zeros((2, 3)), body_pose=np.zeros((2, 69)),
             transl=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=_m(path) + ".*body_pose"):
        AvatarDataset(tmp_path / "s", body_model=anny_body)


def test_raw_missing_files_and_smpl_folder(tmp_path, smpl_body):
    root = tmp_path / "female-4-casual"
    write_snapshot_raw(root, smpl_body, num_frames=2)
    with pytest.raises(ValueError, match=_m(root) + r".*SMPL model folder is required"):
        AvatarDataset(root)
    (root / "masks.hdf5").unlink()
    with pytest.raises(FileNotFoundError, match="masks.hdf5"):
        AvatarDataset(root)


def test_raw_hdf5_bad_pose_shape(tmp_path, smpl_body, fake_smpl_file):
    root = tmp_path / "s"
    write_snapshot_raw(root, smpl_body, num_frames=2)
    with h5py.File(root / "reconstructed_poses.hdf5", "r+") as f:
        del f["pose"]
        f["pose"] = np.zeros((2, 60), np.float32)
    with pytest.raises(ValueError, match=_m(root / "reconstructed_poses.hdf5") + ".*pose"):
        AvatarDataset(root, smpl_model_path=fake_smpl_file)

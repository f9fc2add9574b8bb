import re

import numpy as np
import pytest
import torch

from avatar.body import SMPLBody
from avatar.data.dataset import AvatarDataset
from avatar.data.zju import distort_normalized, open_zju, undistort_image, undistort_normalized
from tests.data.fixtures_datasets import H, K, W, color, mask_box, write_zju


@pytest.fixture(scope="module")
def smpl_body(fake_smpl_file):
    return SMPLBody(fake_smpl_file)


def test_raw_layout_anny(tmp_path, anny_body):
    data = write_zju(tmp_path / "CoreView_377", anny_body, num_frames=3, num_cameras=2)
    ds = AvatarDataset(tmp_path / "CoreView_377", body_model=anny_body)
    assert len(ds) == 6 and ds.body_model_name == "anny"
    fr = ds[3]  # frame 1, camera 1 (frame-major)
    assert (fr.frame_id, fr.camera_id) == (1, "Camera_B2")
    assert fr.image.shape == (H, W, 3) and fr.image.dtype == torch.float32
    torch.testing.assert_close(fr.image[5, 5], torch.tensor(color(1, 1) / 255.0, dtype=torch.float32), atol=0.03, rtol=0)
    assert torch.equal(fr.mask, torch.from_numpy(mask_box(1)).float())
    torch.testing.assert_close(fr.camera.viewmats[:3, 3], torch.tensor([0.1, -0.2, 3.0]))  # millimetres -> metres
    torch.testing.assert_close(fr.camera.viewmats[:3, :3], torch.tensor(data["cams"]["R"][1], dtype=torch.float32))
    torch.testing.assert_close(fr.camera.Ks, torch.tensor(K, dtype=torch.float32))
    assert fr.pose.rotations.shape == (104, 3) and fr.shape.shape == (6,)
    # the pose loaded through easymocap_to_pose reproduces the world vertices the fixture wrote
    verts = anny_body(fr.pose, fr.shape).vertices[0]
    np.testing.assert_allclose(verts.numpy(), data["world"][1], atol=1e-4)


def test_313_naming_quirk(tmp_path, anny_body):
    data = write_zju(tmp_path / "CoreView_313", anny_body, num_frames=2, num_cameras=2, naming="313")
    subject = open_zju(tmp_path / "CoreView_313")
    assert subject.param_path(0).name == "1.npy"  # 1-based parameter files
    ds = AvatarDataset(tmp_path / "CoreView_313", body_model=anny_body)
    fr = ds[2]
    assert fr.frame_id == 1 and fr.camera_id == "Camera (1)"
    torch.testing.assert_close(fr.pose.rotations[1:], data["pose"].rotations[1, 1:])
    np.testing.assert_allclose(anny_body(fr.pose, fr.shape).vertices[0].numpy(), data["world"][1], atol=1e-4)


def test_refined_layout_smpl(tmp_path, smpl_body, fake_smpl_file):
    data = write_zju(tmp_path / "my_377", smpl_body, num_frames=2, num_cameras=3, naming="refined")
    ds = AvatarDataset(tmp_path / "my_377", smpl_model_path=fake_smpl_file.parent.parent, cameras=[2])
    assert ds.subject.layout == "refined" and len(ds) == 2
    fr = ds[1]
    assert fr.body_model == "smpl" and fr.camera_id == "images/02" and fr.pose.rotations.shape == (24, 3)
    np.testing.assert_allclose(smpl_body(fr.pose, fr.shape).vertices[0].numpy(), data["world"][1], atol=1e-4)


def test_resize_scales_K(tmp_path, anny_body):
    write_zju(tmp_path / "s", anny_body, num_frames=1, num_cameras=1)
    fr = AvatarDataset(tmp_path / "s", body_model=anny_body, resolution=(12, 16))[0]
    assert fr.image.shape == (12, 16, 3) and fr.mask.shape == (12, 16)
    assert (fr.camera.width, fr.camera.height) == (16, 12)
    expected = torch.tensor(K, dtype=torch.float32)
    expected[:2] *= 0.5
    torch.testing.assert_close(fr.camera.Ks, expected)
    assert set(fr.mask.unique().tolist()) <= {0.0, 1.0}


def test_protocol_selection_scaled(tmp_path, anny_body):
    write_zju(tmp_path / "s", anny_body, num_frames=10, num_cameras=6)
    with pytest.raises(ValueError, match="for_subject"):
        AvatarDataset(tmp_path / "s", "zju_monocular", "train", body_model=anny_body)
    train = AvatarDataset(tmp_path / "s", "zju_monocular", "train", fit="clip", body_model=anny_body, resolution=None)
    assert train.cameras == (4,) and train.frames == (0, 5)
    test = AvatarDataset(tmp_path / "s", "zju_monocular", "test", fit="scale", body_model=anny_body, resolution=None)
    assert test.cameras == (0, 1, 2, 3, 5) and test.frames[0] == 0
    assert test[0].camera_id == "Camera_B1"


def test_undistort_points_roundtrip():
    D = torch.tensor([-0.25, 0.08, 0.001, -0.002, 0.01], dtype=torch.float64)
    xy = torch.rand(100, 2, dtype=torch.float64) - 0.5
    torch.testing.assert_close(undistort_normalized(distort_normalized(xy, D), D), xy, atol=1e-9, rtol=0)


def test_undistort_image_removes_known_distortion():
    D = torch.tensor([-0.2, 0.05, 0.002, -0.001, 0.0], dtype=torch.float64)
    Hh, Ww = 60, 80
    Kt = torch.tensor([[70.0, 0, 40], [0, 70.0, 30], [0, 0, 1]], dtype=torch.float64)

    def pattern(u, v):  # smooth image on the undistorted (pinhole) pixel grid
        return 0.5 + 0.4 * torch.sin(u / 6.0) * torch.cos(v / 5.0)

    v, u = torch.meshgrid(torch.arange(Hh, dtype=torch.float64), torch.arange(Ww, dtype=torch.float64), indexing="ij")
    # the distorted camera's image: each distorted pixel sees the pattern at its undistorted location
    xy_d = torch.stack([(u - 40) / 70, (v - 30) / 70], -1)
    xy = undistort_normalized(xy_d, D)
    distorted = pattern(xy[..., 0] * 70 + 40, xy[..., 1] * 70 + 30)
    out = undistort_image(distorted[..., None].float(), Kt.float(), D.float())[..., 0]
    truth = pattern(u, v).float()
    inner = (slice(8, -8), slice(8, -8))
    assert (out[inner] - truth[inner]).abs().max() < 0.03
    assert (distorted.float()[inner] - truth[inner]).abs().max() > 0.08  # the distortion was not negligible
    # masks: nearest sampling keeps them binary
    m = undistort_image((distorted > 0.5)[..., None].float(), Kt.float(), D.float(), mode="nearest")
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_distorted_dataset_returns_pinhole_camera(tmp_path, anny_body):
    D = np.array([-0.2, 0.05, 0.0, 0.0, 0.0])
    write_zju(tmp_path / "s", anny_body, num_frames=1, num_cameras=1, D=D)
    fr = AvatarDataset(tmp_path / "s", body_model=anny_body)[0]
    torch.testing.assert_close(fr.camera.Ks, torch.tensor(K, dtype=torch.float32))
    assert set(fr.mask.unique().tolist()) <= {0.0, 1.0} and fr.mask.sum() > 0


# --- bad input -------------------------------------------------------------------------------------------------


def _m(path) -> str:
    return re.escape(str(path))


def test_missing_folder_and_annots(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        AvatarDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="annots.npy"):
        open_zju(tmp_path / "empty")


def test_camera_without_K(tmp_path, anny_body):
    write_zju(tmp_path / "s", anny_body, num_frames=1, num_cameras=1)
    annots = np.load(tmp_path / "s" / "annots.npy", allow_pickle=True).item()
    del annots["cams"]["K"]
    np.save(tmp_path / "s" / "annots.npy", annots, allow_pickle=True)
    with pytest.raises(ValueError, match=r"annots\.npy.*'K'"):
        AvatarDataset(tmp_path / "s", body_model=anny_body)


def test_mask_wrong_size(tmp_path, anny_body):
    from PIL import Image

    write_zju(tmp_path / "s", anny_body, num_frames=1, num_cameras=1)
    path = tmp_path / "s" / "mask" / "Camera_B1" / "000000.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    ds = AvatarDataset(tmp_path / "s", body_model=anny_body)
    with pytest.raises(ValueError, match=_m(path)):
        ds[0]


def test_missing_mask_and_params(tmp_path, anny_body):
    write_zju(tmp_path / "s", anny_body, num_frames=2, num_cameras=1)
    (tmp_path / "s" / "mask" / "Camera_B1" / "000001.png").unlink()
    (tmp_path / "s" / "new_params" / "0.npy").unlink()
    ds = AvatarDataset(tmp_path / "s", body_model=anny_body)
    with pytest.raises(FileNotFoundError, match=_m(tmp_path / "s" / "new_params" / "0.npy")):
        ds[0]
    with pytest.raises(FileNotFoundError, match="000001.png"):
        ds[1]


def test_params_wrong_shape(tmp_path, anny_body):
    write_zju(tmp_path / "s", anny_body, num_frames=1, num_cameras=1)
    path = tmp_path / "s" / "new_params" / "0.npy"
    p = np.load(path, allow_pickle=True).item()
    p["poses"] = np.zeros((1, 72), np.float32)
    np.save(path, p, allow_pickle=True)
    with pytest.raises(ValueError, match=_m(path) + r".*'poses'"):
        AvatarDataset(tmp_path / "s", body_model=anny_body)[0]


def test_smpl_dataset_needs_smpl_folder(tmp_path, smpl_body):
    write_zju(tmp_path / "CoreView_390", smpl_body, num_frames=1, num_cameras=1)
    with pytest.raises(ValueError, match=_m(tmp_path / "CoreView_390") + r".*SMPL model folder is required"):
        AvatarDataset(tmp_path / "CoreView_390")

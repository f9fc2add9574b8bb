import pytest
import torch

from tests.body.fake_smpl import write_fake_smpl


@pytest.fixture(scope="session")
def anny_body():
    from avatar.body import AnnyBody

    return AnnyBody()


@pytest.fixture(scope="session")
def fake_smpl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("smpl") / "smpl" / "SMPL_NEUTRAL.pkl"
    path.parent.mkdir(parents=True)
    write_fake_smpl(path)
    return path


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)

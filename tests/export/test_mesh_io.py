"""OBJ / PLY export of canonical and posed meshes: round trips, posed = our LBS, atomic writes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.export.mesh_io import read_mesh, write_mesh, write_posed_mesh
from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.skinning.lbs import lbs_points


@pytest.fixture
def mesh():
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2)
    g = torch.Generator().manual_seed(3)
    v = torch.from_numpy(np.asarray(m.vertices, np.float32))
    return v, torch.from_numpy(np.asarray(m.faces, np.int64)), torch.rand(len(v), 3, generator=g)


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_round_trip(mesh, tmp_path, suffix):
    v, f, c = mesh
    path = write_mesh(tmp_path / f"canonical{suffix}", v, f, c)
    v2, f2, c2 = read_mesh(path)
    np.testing.assert_allclose(v2.numpy(), v.numpy(), atol=1e-6)
    assert torch.equal(f2, f)
    np.testing.assert_allclose(c2.numpy(), c.numpy(), atol=0.5 / 255 + 1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [f"canonical{suffix}"]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_posed_mesh_is_our_lbs(mesh, tmp_path, suffix):
    v, f, _ = mesh
    J = 2
    w = torch.stack([(v[:, 2] < 0).float(), (v[:, 2] >= 0).float()], 1) * 0.8 + 0.1  # [V, 2]
    w = w / w.sum(1, keepdim=True)
    T = torch.eye(4).repeat(J, 1, 1)
    T[1, :3, :3] = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.5]))
    T[1, :3, 3] = torch.tensor([0.1, 0.0, -0.2])
    path = write_posed_mesh(tmp_path / f"posed{suffix}", v, f, w, T)
    v2, f2, c2 = read_mesh(path)
    np.testing.assert_allclose(v2.numpy(), lbs_points(v, w, T).numpy(), atol=1e-6)
    assert c2 is None and torch.equal(f2, f)


def test_bad_input_names_file(mesh, tmp_path):
    v, f, c = mesh
    with pytest.raises(ValueError, match="x.stl.*.obj or .ply"):
        write_mesh(tmp_path / "x.stl", v, f)
    with pytest.raises(ValueError, match="y.obj.*faces"):
        write_mesh(tmp_path / "y.obj", v, f + len(v))
    with pytest.raises(ValueError, match="z.ply.*colors"):
        write_mesh(tmp_path / "z.ply", v, f, c[:5])
    with pytest.raises(ValueError, match="w.ply.*vertices"):
        write_mesh(tmp_path / "w.ply", v.clone().fill_(float("nan")), f)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "junk.ply").write_bytes(b"ply\nformat nonsense\n")
    with pytest.raises(ValueError, match="junk.ply"):
        read_mesh(tmp_path / "junk.ply")

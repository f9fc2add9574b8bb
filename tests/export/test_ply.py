import numpy as np
import pytest
import torch

from avatar.export.ply import SH_C0, read_ply_header, read_splat_ply, splat_property_names, write_splat_ply
from avatar.types import GaussianSet

STANDARD_DEG0 = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                 "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def _gaussians(gen, n=200):
    q = torch.randn(n, 4, generator=gen)
    return GaussianSet(torch.randn(n, 3, generator=gen), q, torch.rand(n, 3, generator=gen) * 0.05 + 1e-4,
                       torch.rand(n, generator=gen) * 0.98 + 0.01, torch.rand(n, 3, generator=gen))


@pytest.mark.parametrize("deg", [0, 3])
def test_round_trip_and_header(gen, tmp_path, deg):
    g = _gaussians(gen)
    path = write_splat_ply(tmp_path / "a.ply", g, sh_degree=deg)
    head = path.read_bytes()[:4096].split(b"end_header\n")[0].decode().splitlines()
    assert head[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 200"]
    props = [line.split() for line in head[3:]]
    assert all(p[:2] == ["property", "float"] for p in props)
    names = [p[2] for p in props]
    rest = [f"f_rest_{i}" for i in range(45 if deg == 3 else 0)]
    assert names == STANDARD_DEG0[:9] + rest + STANDARD_DEG0[9:] == splat_property_names(deg)
    count, _, header_len = read_ply_header(path)
    assert count == 200 and path.stat().st_size == header_len + 200 * 4 * len(names)
    r = read_splat_ply(path)
    assert torch.equal(r.means, g.means)  # float32 stored as is
    assert torch.allclose(r.colors, g.colors, atol=1e-6, rtol=0)
    assert torch.allclose(r.opacities, g.opacities, atol=1e-6, rtol=0)
    assert torch.allclose(r.scales, g.scales, rtol=1e-6, atol=0)
    assert torch.allclose(r.quats, g.quats / g.quats.norm(dim=1, keepdim=True), atol=1e-6)
    assert r.skin_weights is None
    raw = np.fromfile(path, dtype=[(n, "<f4") for n in names], offset=header_len)
    assert np.allclose(raw["f_dc_0"], (g.colors[:, 0].numpy() - 0.5) / SH_C0, atol=1e-5)
    assert np.allclose(raw["scale_1"], np.log(g.scales[:, 1].numpy()), atol=1e-5)
    assert np.all(raw["nx"] == 0) and (deg == 0 or np.all(raw["f_rest_44"] == 0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.ply"]


def test_bad_files(gen, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        read_splat_ply(tmp_path / "nope.ply")
    p = tmp_path / "x.ply"
    p.write_bytes(b"hello\n")
    with pytest.raises(ValueError, match="x.ply: not a PLY"):
        read_splat_ply(p)
    p.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n")
    with pytest.raises(ValueError, match="x.ply: header field 'format'"):
        read_splat_ply(p)
    write_splat_ply(p, _gaussians(gen, 5))
    data = p.read_bytes()
    p.write_bytes(data.replace(b"property float opacity\n", b"property float opaque\n"))
    with pytest.raises(ValueError, match="x.ply: vertex property 'opacity' is missing"):
        read_splat_ply(p)
    p.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="x.ply: element 'vertex' needs"):
        read_splat_ply(p)
    g = _gaussians(gen, 5)
    with pytest.raises(ValueError, match="scales must be positive"):
        write_splat_ply(p, GaussianSet(g.means, g.quats, g.scales * 0, g.opacities, g.colors))

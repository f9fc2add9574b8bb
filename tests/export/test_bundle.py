import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from avatar.export.bundle import FORMAT_VERSION, load_bundle, save_bundle
from avatar.types import GaussianSet

BONES = ("root", "spine", "head", "arm.L")
PARENTS = (-1, 0, 1, 1)


def _gaussians(gen, n=50, j=4, skin=True):
    sw = torch.rand(n, j, generator=gen)
    return GaussianSet(torch.randn(n, 3, generator=gen), torch.randn(n, 4, generator=gen),
                       torch.rand(n, 3, generator=gen) * 0.02 + 1e-3, torch.rand(n, generator=gen),
                       torch.rand(n, 3, generator=gen), sw / sw.sum(1, keepdim=True) if skin else None)


def _save(tmp_path, gen, name="bundle", **kw):
    extra = {"weight_field.0.weight": torch.randn(16, 3, generator=gen),
             "weight_field.0.bias": torch.randn(16, generator=gen, dtype=torch.float64),
             "step": torch.tensor(7, dtype=torch.int64)}
    args = dict(gaussians=_gaussians(gen), body_model_name="anny", bone_names=BONES, bone_parents=PARENTS,
                shape=torch.randn(5, generator=gen), config={"fit": {"iters": 10, "lr": 1e-3}, "name": "x"},
                extra_tensors=extra)
    args.update(kw)
    return save_bundle(tmp_path / name, **args), args


def test_round_trip_bit_identical(gen, tmp_path):
    path, args = _save(tmp_path, gen, shape_names=[f"s{i}" for i in range(5)])
    b = load_bundle(path)
    g = args["gaussians"]
    for k in ("means", "quats", "scales", "opacities", "colors", "skin_weights"):
        x, y = getattr(g, k), getattr(b.gaussians, k)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.int32), y.view(torch.int32)), k
    assert torch.equal(b.shape, args["shape"])
    assert set(b.extra_tensors) == set(args["extra_tensors"])
    for k, v in args["extra_tensors"].items():
        assert b.extra_tensors[k].dtype == v.dtype and torch.equal(b.extra_tensors[k], v)
    assert b.body_model_name == "anny" and b.bone_names == BONES and b.bone_parents == PARENTS
    assert b.config == args["config"] and b.shape_names == tuple(f"s{i}" for i in range(5))
    meta = json.loads((path / "avatar.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["counts"]["gaussians"] == 50
    assert meta["tensors"]["gaussians.skin_weights"] == {"shape": [50, 4], "dtype": "float32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary leftovers


def test_no_skin_weights_and_overwrite(gen, tmp_path):
    path, _ = _save(tmp_path, gen, gaussians=_gaussians(gen, skin=False))
    assert load_bundle(path).gaussians.skin_weights is None
    with pytest.raises(FileExistsError, match="bundle"):
        _save(tmp_path, gen)
    _save(tmp_path, gen, overwrite=True)
    assert load_bundle(path).gaussians.skin_weights is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_bad_save_inputs(gen, tmp_path):
    with pytest.raises(ValueError, match="differ in length"):
        _save(tmp_path, gen, bone_parents=(-1, 0))
    with pytest.raises(ValueError, match="skin_weights has 3 columns"):
        _save(tmp_path, gen, gaussians=_gaussians(gen, j=3))
    with pytest.raises(TypeError, match="JSON"):
        _save(tmp_path, gen, config={"x": object()})
    assert not list(tmp_path.iterdir())


def _edit_json(path, fn):
    meta = json.loads((path / "avatar.json").read_text())
    fn(meta)
    (path / "avatar.json").write_text(json.dumps(meta))


def _edit_tensors(path, fn):
    t = load_file(str(path / "avatar.safetensors"))
    fn(t)
    save_file(t, str(path / "avatar.safetensors"))


@pytest.mark.parametrize("case, exc, where, field", [
    ("no_folder", FileNotFoundError, "missing", "avatar bundle folder"),
    ("no_json", FileNotFoundError, "avatar.json", "missing bundle file"),
    ("no_tensors", FileNotFoundError, "avatar.safetensors", "missing bundle file"),
    ("bad_json", ValueError, "avatar.json", "not valid JSON"),
    ("version", ValueError, "avatar.json", "'format_version'"),
    ("format", ValueError, "avatar.json", "'format'"),
    ("no_field", ValueError, "avatar.json", "'counts'"),
    ("missing_tensor", ValueError, "avatar.safetensors", "'gaussians.colors'"),
    ("unlisted_tensor", ValueError, "avatar.safetensors", "'extra.stray'"),
    ("wrong_shape", ValueError, "avatar.safetensors", "'gaussians.means'"),
    ("wrong_dtype", ValueError, "avatar.safetensors", "'shape'"),
    ("manifest_shape", ValueError, "avatar.json", "'gaussians.quats'"),
    ("manifest_missing", ValueError, "avatar.json", "'gaussians.opacities'"),
    ("not_safetensors", ValueError, "avatar.safetensors", "not a readable safetensors"),
])
def test_bad_bundles(gen, tmp_path, case, exc, where, field):
    path, _ = _save(tmp_path, gen)
    if case == "no_folder":
        path = tmp_path / "missing"
    elif case == "no_json":
        (path / "avatar.json").unlink()
    elif case == "no_tensors":
        (path / "avatar.safetensors").unlink()
    elif case == "bad_json":
        (path / "avatar.json").write_text("{nope")
    elif case == "version":
        _edit_json(path, lambda m: m.update(format_version=99))
    elif case == "format":
        _edit_json(path, lambda m: m.update(format="other"))
    elif case == "no_field":
        _edit_json(path, lambda m: m.pop("counts"))
    elif case == "missing_tensor":
        _edit_tensors(path, lambda t: t.pop("gaussians.colors"))
    elif case == "unlisted_tensor":
        _edit_tensors(path, lambda t: t.update({"extra.stray": torch.zeros(2)}))
    elif case == "wrong_shape":
        _edit_tensors(path, lambda t: t.update({"gaussians.means": torch.zeros(49, 3)}))
    elif case == "wrong_dtype":
        _edit_tensors(path, lambda t: t.update({"shape": t["shape"].double()}))
    elif case == "manifest_shape":
        _edit_json(path, lambda m: m["tensors"]["gaussians.quats"].update(shape=[50, 3]))
    elif case == "manifest_missing":
        _edit_json(path, lambda m: m["tensors"].pop("gaussians.opacities"))
    elif case == "not_safetensors":
        (path / "avatar.safetensors").write_bytes(b"garbage")
    with pytest.raises(exc) as info:
        load_bundle(path)
    msg = str(info.value)
    assert where in msg and field in msg, msg


def test_permissions_not_private(gen, tmp_path):
    path, _ = _save(tmp_path, gen)
    assert path.stat().st_mode & 0o777 == 0o755

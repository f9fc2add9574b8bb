import json

import pytest
import torch

from avatar.compress.quantize import dequantize_per_channel, quantize_per_channel_int8
from avatar.compress.storage import load_compact, save_compact


def test_round_trip_exact_for_every_encoding(tmp_path, gen):
    w = torch.randn(24, 40, generator=gen)
    w[torch.rand(24, 40, generator=gen) < 0.6] = 0
    tensors = {"dense": torch.randn(5, 3, generator=gen), "sparse": w, "int8": torch.randn(8, 16, generator=gen),
               "sparse_int8": w.clone(), "fp16": torch.randn(7, generator=gen), "ids": torch.arange(10),
               "bf": torch.randn(4, 4, generator=gen).bfloat16()}
    enc = {k: k for k in ("dense", "sparse", "int8", "sparse_int8", "fp16")} | {"ids": "dense", "bf": "sparse"}
    p = save_compact(tmp_path / "m.safetensors", tensors, enc, metadata={"arch": "mlp"})
    out, meta = load_compact(p)
    assert meta == {"arch": "mlp"}
    for k in ("dense", "sparse", "ids", "bf"):
        assert out[k].dtype == tensors[k].dtype and torch.equal(out[k], tensors[k]), k
    for k in ("int8", "sparse_int8"):
        q, s = quantize_per_channel_int8(tensors[k])
        assert torch.equal(out[k], dequantize_per_channel(q, s)), k
    assert torch.equal(out["fp16"], tensors["fp16"].half().float())
    # sparse + int8 files are smaller than dense float32
    dense = save_compact(tmp_path / "d.safetensors", {"w": w}, "dense").stat().st_size
    sp = save_compact(tmp_path / "s.safetensors", {"w": w}, "sparse").stat().st_size
    spq = save_compact(tmp_path / "q.safetensors", {"w": w}, "sparse_int8").stat().st_size
    assert sp < dense and spq < sp


def test_auto_encoding_and_model_state(tmp_path, gen):
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    sd = m.state_dict()
    p = save_compact(tmp_path / "m.safetensors", sd, quantize=True)
    out, _ = load_compact(p)
    assert torch.equal(out["0.bias"], sd["0.bias"])
    m2 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    m2.load_state_dict(out)
    x = torch.randn(10, 32, generator=gen)
    assert float((m2(x) - m(x)).detach().abs().max()) < 0.02


def test_bad_files_raise_value_errors_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_compact(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_compact(bad)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="manifest"):
        load_compact(plain)
    broken = tmp_path / "broken.safetensors"
    save_file({"a.q": torch.zeros(2, 2, dtype=torch.int8)}, str(broken), metadata={
        "avatar.compact": json.dumps({"version": 1, "tensors": {"a": {"encoding": "int8", "shape": [2, 2],
                                                                      "dtype": "torch.float32"}}})})
    with pytest.raises(ValueError, match="a.scale"):
        load_compact(broken)
    with pytest.raises(ValueError, match="encoding"):
        save_compact(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, "zip")

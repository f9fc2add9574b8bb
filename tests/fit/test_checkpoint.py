import json
import os

import pytest
import torch

from avatar.fit import checkpoint as ck


def test_round_trip_and_keep_last(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(3.0), "rng": torch.Generator().get_state()}
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, t, {"x": 1.5, "step_note": step}, keep_last=2)
    found = ck.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000002.json", "step_00000003.json"]
    assert not (tmp_path / "step_00000001.safetensors").exists()
    tensors, meta = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert meta["step"] == 3 and meta["x"] == 1.5 and meta["shapes"]["a"] == [2, 3]
    for k, v in t.items():
        assert torch.equal(tensors[k], v)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_checkpoint_is_never_partial(tmp_path, monkeypatch):
    t = {"a": torch.ones(3)}
    ck.save_checkpoint(tmp_path, 1, t, {})
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, {"a": torch.zeros(3)}, {})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    # nothing under a final name for step 2, no temporary left, step 1 intact and still the latest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.json", "step_00000001.safetensors"]
    tensors, meta = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert meta["step"] == 1 and torch.equal(tensors["a"], torch.ones(3))


def test_tensors_without_sidecar_are_not_a_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, 1, {"a": torch.ones(1)}, {})
    ck.save_checkpoint(tmp_path, 2, {"a": torch.ones(1)}, {}, keep_last=0)
    (tmp_path / "step_00000002.json").unlink()  # as if killed between the two renames
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001.json"


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "step_00000001.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="step_00000001.json"):
        ck.load_checkpoint(bad)
    bad.write_text(json.dumps({"step": 1, "tensors": "missing.safetensors"}))
    with pytest.raises(ValueError, match="missing.safetensors"):
        ck.load_checkpoint(bad)


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.rand(4, 3))
    q = torch.nn.Parameter(torch.rand(2))
    opt = torch.optim.Adam([dict(name="p", params=[p], lr=0.1), dict(name="q", params=[q], lr=0.2)])
    (p.sum() + q.square().sum()).backward()
    opt.step()
    tensors, groups = ck.optimizer_tensors(opt)
    assert set(tensors) == {f"optim/{n}/0/{k}" for n in "pq" for k in ("step", "exp_avg", "exp_avg_sq")}
    groups = json.loads(json.dumps(groups))
    opt2 = torch.optim.Adam([dict(name="p", params=[p], lr=0.5), dict(name="q", params=[q], lr=0.5)])
    ck.load_optimizer_tensors(opt2, tensors, groups)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[1]["betas"] == (0.9, 0.999)
    assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    with pytest.raises(ValueError, match="not in the optimizer"):
        ck.load_optimizer_tensors(torch.optim.Adam([dict(name="z", params=[p])]), tensors, groups)

import json

import numpy as np
import pytest
from PIL import Image

from tools.demo import DemoConfig, run


def test_demo_poses_and_renders_the_body(tmp_path, anny_body):
    summary = run(DemoConfig(out=tmp_path, frames=2, size=96))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["canonical.ply", "contact_sheet.png", "frame_000.png", "frame_001.png", "posed_000.ply", "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["vertices"] == 13718 == summary["vertices"]
    a = np.asarray(Image.open(tmp_path / "frame_000.png"))
    b = np.asarray(Image.open(tmp_path / "frame_001.png"))
    assert a.shape == (96, 96, 3)
    covered = (a < 250).any(-1).mean()
    assert 0.02 < covered < 0.6  # a person, not an empty or a filled frame
    assert (a != b).any(-1).mean() > 0.005  # the pose changed between frames


def test_demo_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        run(DemoConfig(out=tmp_path, frames=0))

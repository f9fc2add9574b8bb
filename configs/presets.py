"""Named fitting presets (typed ``FitConfig`` values; see ``avatar.fit.trainer`` for every field).

- ``fast``: the CPU preset (2 cores): ~100 frames at 512x512 in a few minutes with the compiled CPU rasterizer.
- ``quality``: the GPU preset (gsplat): more steps and Gaussians, pose refinement on.
"""

from __future__ import annotations

from avatar.fit.trainer import FitConfig, fast_config, quality_config

PRESETS = {"fast": fast_config, "quality": quality_config}


def preset(name: str, **overrides) -> FitConfig:
    """The preset ``name`` with ``overrides`` applied (field names of ``FitConfig``)."""
    try:
        return PRESETS[name](**overrides)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None

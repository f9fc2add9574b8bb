"""Learned skinning-weight fields: a residual over base weights (GauHuman's scheme).

``w = softmax(log(w_base + eps) + delta(x))`` where ``delta`` is a small MLP of the canonical position ``x`` with a
sinusoidal encoding. The MLP's last layer starts at zero, so at initialization ``w == (w_base + eps) / (1 + J eps)``,
i.e. the base weights up to ``J * eps`` (1e-7 for J=104 with eps=1e-9). Gaussians that drift off the body surface
can then learn weights of their own instead of keeping their parent surface point's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

EPS = 1e-9


def sinusoidal_encoding(points: Tensor, num_freqs: int, scale: float = 1.0) -> Tensor:
    """NeRF-style encoding of ``points [..., D]``: ``[x, sin(2^k pi x / scale), cos(2^k pi x / scale)]`` for
    k < num_freqs, giving ``[..., D * (1 + 2 num_freqs)]``. ``scale`` (metres) is the length mapped to one period
    of the lowest frequency's half-wave."""
    if points.ndim < 1:
        raise ValueError(f"sinusoidal_encoding: points must be [..., D], got {tuple(points.shape)}")
    if num_freqs < 0:
        raise ValueError(f"sinusoidal_encoding: num_freqs must be >= 0, got {num_freqs}")
    if num_freqs == 0:
        return points
    freqs = (2.0 ** torch.arange(num_freqs, dtype=points.dtype, device=points.device)) * (math.pi / scale)
    x = points.unsqueeze(-1) * freqs  # [..., D, K]
    enc = torch.cat([torch.sin(x), torch.cos(x)], dim=-1).flatten(-2)  # [..., D * 2K]
    return torch.cat([points, enc], dim=-1)


def residual_skin_weights(base_weights: Tensor, log_offsets: Tensor, eps: float = EPS) -> Tensor:
    """``softmax(log(base_weights + eps) + log_offsets)`` over the last (bone) axis.

    base_weights: [..., N, J] rows summing to 1; log_offsets: [..., N, J]. Returns [..., N, J] rows summing to 1.
    """
    if base_weights.shape != log_offsets.shape:
        raise ValueError(f"residual_skin_weights: base_weights {tuple(base_weights.shape)} and log_offsets "
                         f"{tuple(log_offsets.shape)} must have the same shape [..., N, J]")
    return torch.softmax(torch.log(base_weights + eps) + log_offsets, dim=-1)


class ResidualWeightField(nn.Module):
    """MLP ``encode(x) -> hidden -> ... -> J`` log-space offsets; last layer zero-initialized.

    num_bones: J. hidden: width. layers: number of hidden layers (>= 1). num_freqs: encoding octaves.
    scale: metres per lowest-frequency half-period (about the body's size).
    generator: draws the hidden layers' initial weights (PyTorch's default uniform(+-1/sqrt(fan_in)) scheme); a
    fixed-seed generator when None, never the global RNG.
    """

    def __init__(self, num_bones: int, hidden: int = 64, layers: int = 2, num_freqs: int = 4, scale: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_bones < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"ResidualWeightField: num_bones, hidden and layers must be >= 1, got "
                             f"{num_bones}, {hidden}, {layers}")
        self.num_bones, self.num_freqs, self.scale = num_bones, num_freqs, float(scale)
        dims = [3 * (1 + 2 * num_freqs)] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(hidden, num_bones)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self.body:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 2 * bound - bound)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def offsets(self, points: Tensor) -> Tensor:
        """Log-space offsets ``[N, J]`` at canonical ``points [N, 3]``."""
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"ResidualWeightField: points must be [N, 3], got {tuple(points.shape)}")
        return self.head(self.body(sinusoidal_encoding(points, self.num_freqs, self.scale)))

    def forward(self, points: Tensor, base_weights: Tensor) -> Tensor:
        """Weights ``[N, J]`` at canonical ``points [N, 3]`` given ``base_weights [N, J]``."""
        if base_weights.ndim != 2 or base_weights.shape != (points.shape[0], self.num_bones):
            raise ValueError(f"ResidualWeightField: base_weights must be [{points.shape[0]}, {self.num_bones}], "
                             f"got {tuple(base_weights.shape)}")
        return residual_skin_weights(base_weights, self.offsets(points))

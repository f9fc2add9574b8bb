"""Weight pruning: LAMP scores, global and gradual magnitude pruning, structured neuron pruning, N:M masks.

- ``lamp_scores``: the layer-adaptive magnitude score of Lee et al. (ICLR 2021): ``w_u^2 / sum_{v >= u} w_v^2`` over
  the layer's weights sorted by magnitude, i.e. a weight's squared magnitude relative to all weights at least as
  large in its layer. One global threshold on these scores prunes every layer adaptively with no hyperparameter,
  and never empties a layer (its largest weight scores 1).
- ``global_lamp_masks``: masks that remove the requested fraction of all weights by LAMP score.
- ``cubic_sparsity`` / ``GradualPruner``: Zhu & Gupta's (2017) schedule ``s_t = s_f + (s_i - s_f)(1 - p)^3``, applied
  from a training loop as a callback (``pruner.step(iteration)`` after each optimizer step).
- ``prune_linear_neurons``: structured pruning of whole hidden neurons of a chain of ``nn.Linear`` layers with
  element-wise activations in between, producing *smaller dense* layers. This is the only kind of pruning that
  speeds up dense CPU kernels (unstructured zeros cost the same FLOPs; sparse formats are slower at these densities).
- ``nm_mask`` / ``semi_structured``: 2:4 masks (keep the 2 largest of every 4 consecutive input weights), and
  torch's ``to_sparse_semi_structured`` which only runs on CUDA (refused on CPU with the reason).

Written here rather than taken from ``torch.nn.utils.prune``: that module has no LAMP score, no physical removal of
neurons, and keeps masks as forward hooks and ``weight_orig`` parameters that change the state dict; here masks are
plain tensors and the module stays an ordinary ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def lamp_scores(weight: Tensor) -> Tensor:
    """LAMP scores of one layer's ``weight`` (any shape), same shape: ``w_u^2 / sum_{|w_v| >= |w_u|} w_v^2`` (ties
    broken by sort order, so exactly one weight per layer, the largest, scores 1)."""
    w2 = weight.detach().flatten().double().square()
    order = torch.argsort(w2)  # ascending
    s = w2[order]
    tail = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # sum of s[j] for j >= i
    scores = torch.empty_like(w2)
    scores[order] = s / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.view_as(weight).to(weight.dtype if weight.is_floating_point() else torch.float32)


def prunable_weights(model: nn.Module, types: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
                     ) -> dict[str, Tensor]:
    """``{name: weight}`` of the model's linear and convolution layers (biases are never pruned)."""
    return {f"{n}.weight" if n else "weight": m.weight for n, m in model.named_modules()
            if isinstance(m, types) and getattr(m, "weight", None) is not None}


def global_lamp_masks(weights: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Boolean keep-masks (same shapes) removing ``round(sparsity * total)`` weights with the lowest LAMP scores
    over all layers together (ties resolved by index, so the count is exact)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"global_lamp_masks: sparsity must be in [0, 1), got {sparsity}")
    if not weights:
        raise ValueError("global_lamp_masks: no weights given")
    names = list(weights)
    scores = torch.cat([lamp_scores(weights[n]).flatten().double() for n in names])
    n_prune = int(round(sparsity * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if n_prune:
        keep[torch.argsort(scores, stable=True)[:n_prune]] = False
    masks, start = {}, 0
    for n in names:
        k = weights[n].numel()
        masks[n] = keep[start:start + k].view(weights[n].shape).to(weights[n].device)
        start += k
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the pruned weights in place (``masks`` from :func:`global_lamp_masks`, keyed like ``named_parameters``)."""
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"apply_masks: the model has no parameter {name!r}")
        if params[name].shape != m.shape:
            raise ValueError(f"apply_masks: mask for {name!r} is {tuple(m.shape)}, weight {tuple(params[name].shape)}")
        params[name].mul_(m.to(params[name].dtype))


def sparsity_of(tensors: Iterable[Tensor]) -> float:
    """Fraction of exact zeros over ``tensors``."""
    z = n = 0
    for t in tensors:
        z += int((t == 0).sum())
        n += t.numel()
    return z / max(n, 1)


def cubic_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule: ``initial`` before ``begin``, ``final`` from ``end`` on, and
    ``final + (initial - final)(1 - (step - begin)/(end - begin))^3`` in between (prunes fast early, slowly late)."""
    if end <= begin:
        raise ValueError(f"cubic_sparsity: end ({end}) must be after begin ({begin})")
    if not (0.0 <= initial <= final < 1.0):
        raise ValueError(f"cubic_sparsity: need 0 <= initial <= final < 1, got {initial}, {final}")
    if step <= begin:
        return initial
    if step >= end:
        return final
    p = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - p) ** 3


@dataclass(frozen=True)
class GradualPruneConfig:
    """Gradual global LAMP pruning during training."""

    final_sparsity: float = 0.5
    """Fraction of the prunable weights removed at the end."""
    begin: int = 0
    """Iteration at which pruning starts."""
    end: int = 1000
    """Iteration at which the final sparsity is reached."""
    every: int = 50
    """Masks are recomputed every this many iterations (and re-applied after every step)."""


class GradualPruner:
    """Callback for a training loop: call :meth:`step` after each optimizer step. Masks are recomputed on the
    schedule (global LAMP over the model's linear / conv weights) and re-applied after every step, so pruned
    weights stay zero while the others keep training."""

    def __init__(self, model: nn.Module, cfg: GradualPruneConfig = GradualPruneConfig()):
        cubic_sparsity(cfg.begin, cfg.final_sparsity, cfg.begin, cfg.end)  # validates
        if cfg.every < 1:
            raise ValueError(f"GradualPruneConfig.every must be >= 1, got {cfg.every}")
        self.model, self.cfg = model, cfg
        self.masks: dict[str, Tensor] = {}
        self.target = 0.0

    def step(self, iteration: int) -> float:
        """Update masks when due and apply them; returns the scheduled sparsity."""
        c = self.cfg
        due = iteration >= c.begin and ((iteration - c.begin) % c.every == 0 or iteration >= c.end)
        target = cubic_sparsity(iteration, c.final_sparsity, c.begin, c.end)
        if due and (target != self.target or not self.masks):
            self.masks = global_lamp_masks(prunable_weights(self.model), target)
            self.target = target
        if self.masks:
            apply_masks(self.model, self.masks)
        return target


# ----------------------------------------------------------------------------------------------------------------
# structured pruning


def neuron_scores(first: nn.Linear, second: nn.Linear) -> Tensor:
    """Importance ``[H]`` of the hidden neurons between ``first`` (H outputs) and ``second`` (H inputs): the product
    of the L2 norms of the neuron's incoming row (with bias) and outgoing column. A neuron with zero incoming
    weights and bias (and a zero-preserving activation) contributes nothing and scores 0."""
    w_in = torch.cat([first.weight.detach(), first.bias.detach()[:, None]], 1) if first.bias is not None \
        else first.weight.detach()
    return w_in.norm(dim=1) * second.weight.detach().norm(dim=0)


@torch.no_grad()
def prune_linear_neurons(linears: Sequence[nn.Linear], keep: float | Sequence[int]) -> list[nn.Linear]:
    """New, smaller ``nn.Linear`` layers for a chain ``linears[0] -> act -> linears[1] -> ... -> linears[-1]`` where
    the activations are element-wise with ``act(0) = 0`` (ReLU, SiLU, GELU, tanh...). Each hidden width ``H_i``
    (outputs of ``linears[i]``, i < last) keeps ``ceil(keep * H_i)`` neurons (or ``keep[i]`` neurons) with the largest
    :func:`neuron_scores`; inputs and outputs of the chain are unchanged. Weights are copied (the originals are
    untouched); if the removed neurons are all-zero the outputs are identical."""
    linears = list(linears)
    if len(linears) < 2:
        raise ValueError("prune_linear_neurons: need a chain of at least two nn.Linear layers")
    for a, b in zip(linears[:-1], linears[1:]):
        if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or a.out_features != b.in_features:
            raise ValueError(f"prune_linear_neurons: layers do not chain: {a} -> {b}")
    hidden = [l.out_features for l in linears[:-1]]
    if isinstance(keep, (int, float)) and not isinstance(keep, bool) and not isinstance(keep, Sequence):
        if not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"prune_linear_neurons: keep fraction must be in (0, 1], got {keep}")
        counts = [max(1, int(-(-float(keep) * h // 1))) for h in hidden]
    else:
        counts = [int(c) for c in keep]
        if len(counts) != len(hidden) or any(not 1 <= c <= h for c, h in zip(counts, hidden)):
            raise ValueError(f"prune_linear_neurons: keep counts {counts} must be in [1, H] for widths {hidden}")
    kept = []
    for i, c in enumerate(counts):
        s = neuron_scores(linears[i], linears[i + 1])
        kept.append(torch.sort(torch.topk(s, c).indices).values)
    out = []
    for i, l in enumerate(linears):
        rows = kept[i] if i < len(kept) else torch.arange(l.out_features)
        cols = kept[i - 1] if i > 0 else torch.arange(l.in_features)
        new = nn.Linear(len(cols), len(rows), bias=l.bias is not None, device=l.weight.device, dtype=l.weight.dtype)
        new.weight.copy_(l.weight[rows][:, cols])
        if l.bias is not None:
            new.bias.copy_(l.bias[rows])
        out.append(new)
    return out


def prune_sequential_neurons(seq: nn.Sequential, keep: float | Sequence[int]) -> nn.Sequential:
    """:func:`prune_linear_neurons` on an ``nn.Sequential`` of Linear layers and parameter-free activations;
    returns a new Sequential with the same activations (shared, they hold no state)."""
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    others = [m for m in seq if not isinstance(m, nn.Linear)]
    if any(any(True for _ in m.parameters()) for m in others):
        raise ValueError("prune_sequential_neurons: only Linear layers and parameter-free activations are supported")
    new = iter(prune_linear_neurons(linears, keep))
    return nn.Sequential(*[next(new) if isinstance(m, nn.Linear) else m for m in seq])


# ----------------------------------------------------------------------------------------------------------------
# N:M semi-structured sparsity


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Boolean keep-mask of ``weight [out, in]`` (``in`` divisible by ``m``): the ``n`` largest-magnitude weights of
    every ``m`` consecutive inputs of each row (NVIDIA's 2:4 pattern for n=2, m=4)."""
    if weight.ndim != 2:
        raise ValueError(f"nm_mask: weight must be [out, in], got {tuple(weight.shape)}")
    if not 0 < n <= m or weight.shape[1] % m:
        raise ValueError(f"nm_mask: need 0 < n <= m and in_features divisible by m={m}, got n={n}, "
                         f"shape {tuple(weight.shape)}")
    g = weight.detach().abs().reshape(weight.shape[0], -1, m)
    idx = torch.topk(g, n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(weight.shape)


def semi_structured_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether torch's ``to_sparse_semi_structured`` (2:4 sparse tensor cores) can run on ``device``, and why not."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, (f"2:4 semi-structured kernels (cuSPARSELt / CUTLASS) need a CUDA device of compute capability "
                       f">= 8.0; {dev} has none, so 2:4 masks only zero weights here (no speed-up on CPU)")
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this torch build"
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 8:
        return False, f"2:4 sparse tensor cores need compute capability >= 8.0, got {major}.x"
    return True, ""


@torch.no_grad()
def semi_structured(linear: nn.Linear) -> nn.Linear:
    """Apply a 2:4 mask to ``linear`` and, on a supporting CUDA device, convert its weight with
    ``torch.sparse.to_sparse_semi_structured``. Raises ``RuntimeError`` with the reason elsewhere (callers that
    want the mask alone use :func:`nm_mask`)."""
    ok, why = semi_structured_support(linear.weight.device)
    if not ok:
        raise RuntimeError(f"semi_structured: {why}")
    from torch.sparse import to_sparse_semi_structured  # CUDA-only kernels; imported lazily

    w = linear.weight * nm_mask(linear.weight)
    linear.weight = nn.Parameter(to_sparse_semi_structured(w.half() if w.dtype == torch.float32 else w))
    return linear

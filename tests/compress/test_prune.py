import pytest
import torch
from torch import nn

from avatar.compress.prune import (
    GradualPruneConfig,
    GradualPruner,
    apply_masks,
    cubic_sparsity,
    global_lamp_masks,
    lamp_scores,
    nm_mask,
    prunable_weights,
    prune_linear_neurons,
    prune_sequential_neurons,
    semi_structured,
    semi_structured_support,
    sparsity_of,
)


def test_lamp_scores_hand_computed():
    w = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    # sorted squares: 0.25, 1, 4, 9 -> tails 14.25, 14, 13, 9
    expected = torch.tensor([[1 / 14, 9 / 9], [4 / 13, 0.25 / 14.25]])
    torch.testing.assert_close(lamp_scores(w), expected)
    assert float(lamp_scores(w).max()) == 1.0


def test_global_lamp_hits_sparsity_and_keeps_every_layer(gen):
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    ws = prunable_weights(model)
    total = sum(w.numel() for w in ws.values())
    for s in (0.3, 0.75, 0.95):
        masks = global_lamp_masks(ws, s)
        removed = sum(int((~m).sum()) for m in masks.values())
        assert removed == round(s * total)
        assert all(bool(m.any()) for m in masks.values())
    apply_masks(model, global_lamp_masks(ws, 0.75))
    assert sparsity_of(ws.values()) == pytest.approx(0.75, abs=1 / total)


def test_lamp_prunes_small_layers_less_than_global_magnitude():
    # a layer with uniformly tiny weights is not wiped out by LAMP (its largest weight always scores 1)
    ws = {"a": torch.full((10, 10), 1e-3), "b": torch.linspace(0.1, 1.0, 1000).reshape(10, 100)}
    masks = global_lamp_masks(ws, 0.5)
    assert int(masks["a"].sum()) >= 1


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.8, 10, 110) == 0.0
    assert cubic_sparsity(110, 0.8, 10, 110) == 0.8
    assert cubic_sparsity(60, 0.8, 10, 110) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    with pytest.raises(ValueError, match="end"):
        cubic_sparsity(0, 0.5, 10, 10)


def test_gradual_pruner_in_a_training_loop(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(64, 4, generator=gen)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, GradualPruneConfig(final_sparsity=0.6, begin=5, end=45, every=10))
    for it in range(60):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        pruner.step(it)
    assert sparsity_of(prunable_weights(model).values()) == pytest.approx(0.6, abs=0.01)
    with torch.no_grad():
        assert float(((model(x) - y) ** 2).mean()) < float((y ** 2).mean())


def test_structured_pruning_exact_when_removed_neurons_are_zero(gen):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    with torch.no_grad():
        model[0].weight[[1, 5, 9, 14]] = 0
        model[0].bias[[1, 5, 9, 14]] = 0
        model[2].weight[[0, 7, 11]] = 0
        model[2].bias[[0, 7, 11]] = 0
    small = prune_sequential_neurons(model, [12, 9])
    assert [m.weight.shape for m in small if isinstance(m, nn.Linear)] == [(12, 8), (9, 12), (3, 9)]
    x = torch.randn(100, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x), atol=1e-14, rtol=0)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    half = prune_linear_neurons([model[0], model[2], model[4]], 0.5)
    assert [l.out_features for l in half] == [8, 6, 3]
    with pytest.raises(ValueError, match="chain"):
        prune_linear_neurons([nn.Linear(3, 4), nn.Linear(5, 2)], 0.5)


def test_nm_mask_two_of_four(gen):
    w = torch.randn(6, 16, generator=gen)
    m = nm_mask(w)
    assert m.reshape(6, 4, 4).sum(-1).eq(2).all()
    g = w.abs().reshape(6, 4, 4)
    kept_min = torch.where(m.reshape(6, 4, 4), g, torch.inf).min(-1).values
    dropped_max = torch.where(m.reshape(6, 4, 4), -torch.inf, g).max(-1).values
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.randn(2, 6))


def test_semi_structured_refused_on_cpu_with_reason():
    ok, why = semi_structured_support("cpu")
    assert not ok and "CUDA" in why
    with pytest.raises(RuntimeError, match="CUDA"):
        semi_structured(nn.Linear(16, 8))

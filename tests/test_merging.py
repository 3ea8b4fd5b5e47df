"""Merging methods (soups, Model Stock, Fisher, RegMean, SWA, ensemble), the plane grid and the shifted
MNIST-1D test set, on hand-made models with known answers and against plain reference versions."""

import copy
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lmc.core.data.shifted import DEFAULT_SHIFT, mnist1d_shifted
from lmc.core.merging import (
    _fisher_layers,
    average,
    best_child,
    ensemble_evaluate,
    evaluate_each,
    fisher_diagonal,
    fisher_merge,
    gram_matrices,
    greedy_soup,
    model_stock,
    model_stock_ratio,
    regmean_merge,
    swa,
    uniform_soup,
)
from lmc.core.normalization import reset_bn_stats
from lmc.core.plane import plane_basis, plane_grid
from lmc.core.training import evaluate, seeded_init
from lmc.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def mlp(width=16, classes=3, inputs=6):
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def conv_bn(width=4):
    return nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def perturbed(sd, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}


def close(sd_a, sd_b, atol=1e-6):
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert torch.allclose(sd_a[k].double(), sd_b[k].double(), atol=atol, rtol=0), k


def data(n=64, inputs=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g), torch.randint(0, classes, (n,), generator=g)


# --- two children with equal weights give the child, for every method -------------------------------
def test_every_method_returns_the_child_when_both_children_are_equal():
    model = seeded_init(mlp, 0)
    child = perturbed(model.state_dict(), 1)
    parent = model.state_dict()
    x, y = data()
    children = [child, {k: v.clone() for k, v in child.items()}]
    close(uniform_soup(children), child)
    close(average(children, [0.3, 0.7]), child)
    close(model_stock(parent, children).state_dict, child)
    fishers = [fisher_diagonal(model, sd, [x]) for sd in children]
    close(fisher_merge(children, fishers), child)
    grams = [gram_matrices(model, sd, [x]) for sd in children]
    close(regmean_merge(children, grams), child)
    close(regmean_merge(children, grams, alpha=1.0, bias="augment"), child, atol=1e-5)
    close(swa(children), child)
    soup = greedy_soup(model, children, x, y)
    close(soup.state_dict, child)
    assert soup.kept == [0, 1]  # a tie is kept (the paper's ≥)
    assert ensemble_evaluate(model, children, x, y) == pytest.approx(evaluate(model, x, y, params=child))


def test_average_weights_and_integer_buffers():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(7)}
    out = average([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([1.5, 1.0])) and out["n"].item() == 3
    with pytest.raises(ConfigError, match="non-negative numbers with a positive sum"):
        average([a, b], [1.0, -1.0])
    with pytest.raises(ConfigError, match="model 1 has other entries"):
        average([a, {"w": b["w"]}])


# --- Model Stock ---------------------------------------------------------------------------------------
def test_model_stock_ratio_formula():
    assert model_stock_ratio(1.0, 2) == 1.0 and model_stock_ratio(0.0, 2) == 0.0
    assert model_stock_ratio(0.5, 2) == pytest.approx(2 / 3)  # 2cos / (1 + cos)
    assert model_stock_ratio(0.5, 5) == pytest.approx(2.5 / 3)  # k cos / (1 + (k-1) cos)


def test_model_stock_orthogonal_updates_give_the_parent_and_parallel_ones_the_mean():
    parent = {"w": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0])}
    ortho = [{"w": parent["w"] + torch.tensor([1.0, 0, 0]), "b": torch.tensor([1.0, 0.0])},
             {"w": parent["w"] + torch.tensor([0, 2.0, 0]), "b": torch.tensor([0.0, 3.0])}]
    merged = model_stock(parent, ortho)
    assert merged.ratios == {"w": 0.0, "b": 0.0} and merged.cosines == {"w": 0.0, "b": 0.0}
    close(merged.state_dict, parent)
    parallel = [{"w": parent["w"] + torch.tensor([1.0, 1.0, 0]), "b": torch.tensor([1.0, 1.0])},
                {"w": parent["w"] + torch.tensor([3.0, 3.0, 0]), "b": torch.tensor([0.5, 0.5])}]
    merged = model_stock(parent, parallel)
    assert merged.ratios["w"] == pytest.approx(1.0) and merged.ratios["b"] == pytest.approx(1.0)
    close(merged.state_dict, uniform_soup(parallel))
    # at 60 degrees, t = 2/3 of the way from the parent to the children's mean
    sixty = [{"w": parent["w"] + torch.tensor([1.0, 0, 0]), "b": parent["b"]},
             {"w": parent["w"] + torch.tensor([0.5, 3**0.5 / 2, 0]), "b": parent["b"]}]
    merged = model_stock(parent, sixty)
    assert merged.cosines["w"] == pytest.approx(0.5)
    expected = parent["w"] + 2 / 3 * (uniform_soup(sixty)["w"] - parent["w"])
    assert torch.allclose(merged.state_dict["w"], expected)
    assert merged.ratios["b"] == 0.0  # no update: cosine 0, the parent's value


def test_model_stock_k_children_and_negative_cosines():
    parent = {"w": torch.zeros(3)}
    # three children at pairwise cosine 0.5: mean cosine 0.5, t = 3·0.5 / (1 + 2·0.5) = 0.75
    e = torch.eye(3)
    children = [{"w": e[0] + e[1]}, {"w": e[1] + e[2]}, {"w": e[0] + e[2]}]
    merged = model_stock(parent, children)
    assert merged.cosines["w"] == pytest.approx(0.5) and merged.ratios["w"] == pytest.approx(0.75)
    assert torch.allclose(merged.state_dict["w"], 0.75 * uniform_soup(children)["w"])
    opposite = [{"w": torch.tensor([1.0, 0.1, 0])}, {"w": torch.tensor([-1.0, 0.1, 0])}]
    assert model_stock(parent, opposite).ratios["w"] == 0.0  # clipped: the parent
    raw = model_stock(parent, opposite, clip=False)
    cos = (0.01 - 1) / 1.01
    assert raw.ratios["w"] == pytest.approx(2 * cos / (1 + cos))
    with pytest.raises(ConfigError, match="at least 2 children"):
        model_stock(parent, children[:1])


def test_model_stock_averages_batchnorm_running_statistics():
    model = conv_bn()
    parent = model.state_dict()
    children = [perturbed(parent, 1), perturbed(parent, 2)]
    merged = model_stock(parent, children)
    assert "1.running_mean" not in merged.ratios and "1.weight" in merged.ratios
    assert torch.allclose(merged.state_dict["1.running_var"], uniform_soup(children)["1.running_var"])


# --- Fisher --------------------------------------------------------------------------------------------
def test_fisher_merge_weights_each_entry_by_its_fisher():
    a = {"w": torch.tensor([1.0, 1.0, 5.0]), "buf": torch.tensor([2.0])}
    b = {"w": torch.tensor([3.0, 3.0, 9.0]), "buf": torch.tensor([4.0])}
    fa = {"w": torch.tensor([0.0, 1.0, 0.0])}
    fb = {"w": torch.tensor([2.0, 3.0, 0.0])}
    out = fisher_merge([a, b], [fa, fb])
    # entry 0: A's Fisher is zero -> B's value; entry 1: (1·1 + 3·3) / 4; entry 2: both zero -> the average
    assert torch.allclose(out["w"], torch.tensor([3.0, 2.5, 7.0]), atol=1e-5)
    assert out["buf"].item() == 3.0  # no Fisher: averaged
    weighted = fisher_merge([a, b], [fa, fb], weights=[3.0, 1.0])
    assert weighted["w"][1].item() == pytest.approx((3 * 1 * 1 + 1 * 3 * 3) / (3 * 1 + 1 * 3))
    normalized = fisher_merge([a, b], [fa, fb], normalize=True)  # λ_i = 1 / ‖F_i‖: ‖F_A‖ = 1, ‖F_B‖ = √13
    la, lb = 1.0, 1 / 13**0.5
    assert normalized["w"][1].item() == pytest.approx((la * 1 * 1 + lb * 3 * 3) / (la * 1 + lb * 3), rel=1e-5)


def _reference_fisher(model, params, x, labels, targets=None, sampled=None):
    """Plain per-example, per-class autograd loop."""
    net = copy.deepcopy(model)
    net.load_state_dict(params)
    net.eval()
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(len(x)):
        log_p = net(x[i : i + 1]).log_softmax(-1)[0]
        probs = log_p.exp().detach()
        if labels == "exact":
            classes = [(c, probs[c]) for c in range(len(probs))]
        elif labels == "sampled":
            classes = [(int(sampled[i]), 1.0)]
        else:
            classes = [(int(targets[i]), 1.0)]
        for c, weight in classes:
            grads = torch.autograd.grad(log_p[c], list(net.parameters()), retain_graph=True)
            for (n, _), g in zip(net.named_parameters(), grads):
                total[n] += weight * g.square()
    return {n: t / len(x) for n, t in total.items()}


class SharedLayer(nn.Module):
    """A linear layer run twice per forward pass (its Fisher needs per-example gradients by vmap)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))


def conv1d_net():
    return nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 3, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(9, 3))


def images_net():
    return nn.Sequential(nn.Flatten(), nn.Unflatten(1, (2, 3, 1)), nn.Conv2d(2, 3, (2, 1), padding=(1, 0)),
                         nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))


def norms_net():
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Unflatten(1, (2, 4)), nn.GroupNorm(1, 2),
                         nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("labels", ["exact", "sampled", "empirical"])
@pytest.mark.parametrize("build", [lambda: mlp(width=8), SharedLayer, conv1d_net, images_net, norms_net],
                         ids=["mlp", "shared", "conv1d", "conv2d_bn", "layer_group_norm"])
def test_fisher_diagonal_matches_a_plain_per_example_loop(labels, build):
    model = seeded_init(build, 0)
    params = perturbed(model.state_dict(), 3)
    if "3.running_var" in params:
        params["3.running_var"] = params["3.running_var"].abs() + 0.5
    x, y = data(n=20)
    batches, targets = [x[:12], x[12:]], [y[:12], y[12:]]
    fisher = fisher_diagonal(model, params, batches, labels=labels, targets=targets, seed=5)
    sampled = None
    if labels == "sampled":  # the same draws: one generator, batch after batch
        g = torch.Generator().manual_seed(5)
        model.eval()  # as fisher_diagonal draws them: BatchNorm with its running statistics
        with torch.no_grad():
            sampled = torch.cat([torch.multinomial(torch.func.functional_call(model, params, (b,)).softmax(-1), 1,
                                                   generator=g).squeeze(1) for b in batches])
    reference = _reference_fisher(model, params, x, labels, targets=y, sampled=sampled)
    assert set(fisher) == set(reference)
    for n in reference:
        assert torch.allclose(fisher[n], reference[n], rtol=1e-4, atol=1e-9), n
        assert reference[n].sum() > 0, n
    # every layer but the one run twice takes the path through inputs and output gradients
    fast = set(_fisher_layers(model, params, x[:1]))
    assert fast == {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))} - {"shared"}
    assert torch.equal(model.state_dict()[next(iter(params))], seeded_init(build, 0).state_dict()[next(iter(params))])


def test_fisher_diagonal_bad_labels():
    model = mlp()
    x, _ = data()
    with pytest.raises(ConfigError, match="unknown Fisher labels 'true'; valid: exact, sampled, empirical"):
        fisher_diagonal(model, model.state_dict(), [x], labels="true")
    with pytest.raises(ConfigError, match="needs one tensor of true labels per batch"):
        fisher_diagonal(model, model.state_dict(), [x], labels="empirical")


# --- RegMean -------------------------------------------------------------------------------------------
def test_regmean_on_a_linear_model_is_least_squares_on_the_pooled_inputs():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 3, bias=False).double() for _ in range(3)]
    inputs = [torch.randn(40, 5, dtype=torch.float64) * (i + 1) for i in range(3)]
    sds = [m.state_dict() for m in layers]
    grams = [gram_matrices(m, sd, [x[:25], x[25:]]) for m, sd, x in zip(layers, sds, inputs)]
    merged = regmean_merge(sds, grams, alpha=1.0)
    # plain reference: min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², one least-squares problem on the stacked inputs
    xs = torch.cat(inputs)
    targets = torch.cat([x @ sd["weight"].T for x, sd in zip(inputs, sds)])
    expected = torch.linalg.lstsq(xs, targets).solution.T
    assert torch.allclose(merged["weight"], expected, atol=1e-8)
    # with biases, solved jointly ("augment"): least squares with an intercept
    layers = [nn.Linear(5, 3).double() for _ in range(2)]
    sds = [m.state_dict() for m in layers]
    grams = [gram_matrices(m, sd, [x]) for m, sd, x in zip(layers, sds, inputs)]
    merged = regmean_merge(sds, grams, alpha=1.0, bias="augment")
    xs1 = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in inputs[:2]])
    targets = torch.cat([m(x) for m, x in zip(layers, inputs)]).detach()
    solution = torch.linalg.lstsq(xs1, targets).solution.T
    assert torch.allclose(merged["weight"], solution[:, :5], atol=1e-8)
    assert torch.allclose(merged["bias"], solution[:, 5], atol=1e-8)
    # the paper's default keeps biases averaged
    assert torch.allclose(regmean_merge(sds, grams, alpha=1.0)["bias"], (sds[0]["bias"] + sds[1]["bias"]) / 2)


def test_regmean_alpha_zero_is_a_per_input_weighted_average():
    w_a, w_b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    g_a = torch.tensor([[1.0, 5.0, 0.0], [5.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    g_b = torch.tensor([[3.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    merged = regmean_merge([{"l.weight": w_a}, {"l.weight": w_b}], [{"l": g_a}, {"l": g_b}], alpha=0.0)
    # column j: (G_a[j, j]·W_a[:, j] + G_b[j, j]·W_b[:, j]) / (G_a[j, j] + G_b[j, j])
    assert torch.allclose(merged["l.weight"], torch.tensor([[(1 + 9) / 4, (6 + 6) / 4]]), atol=1e-6)


def test_regmean_dead_inputs_take_the_average():
    w_a, w_b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    gram = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # input 1 is always zero
    merged = regmean_merge([{"l.weight": w_a}, {"l.weight": w_b}], [{"l": gram}, {"l": gram}], alpha=1.0)
    assert torch.allclose(merged["l.weight"], torch.tensor([[2.0, 4.0]]), atol=1e-6)


def _patches_plainly(x, kernel, stride, padding):
    """(N·L, C·k) rows of a 1-D convolution's input patches, by slicing."""
    x = F.pad(x, (padding, padding))
    rows = []
    for n in range(x.shape[0]):
        for start in range(0, x.shape[2] - kernel + 1, stride):
            rows.append(x[n, :, start : start + kernel].reshape(-1))
    return torch.stack(rows)


def test_regmean_on_convolutions_is_least_squares_on_the_patches():
    torch.manual_seed(1)
    convs = [nn.Conv1d(2, 3, 3, stride=2, padding=1, bias=False).double() for _ in range(2)]
    inputs = [torch.randn(4, 2, 9, dtype=torch.float64) for _ in range(2)]
    sds = [m.state_dict() for m in convs]
    grams = [gram_matrices(m, sd, [x]) for m, sd, x in zip(convs, sds, inputs)]
    patches = [_patches_plainly(x, 3, 2, 1) for x in inputs]
    for p, g in zip(patches, grams):
        assert torch.allclose(g[""][:-1, :-1], p.T @ p) and g[""][-1, -1] == len(p)
    merged = regmean_merge(sds, grams, alpha=1.0)
    targets = torch.cat([m(x).detach().transpose(1, 2).reshape(-1, 3) for m, x in zip(convs, inputs)])
    expected = torch.linalg.lstsq(torch.cat(patches), targets).solution.T.reshape(3, 2, 3)
    assert torch.allclose(merged["weight"], expected, atol=1e-8)
    # 2-D convolutions: the Gram matrix of the unfolded patches, in weight.flatten(1) order
    conv2 = nn.Conv2d(2, 3, 3, padding=1).double()
    x2 = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    gram2 = gram_matrices(conv2, conv2.state_dict(), [x2])[""]
    patches2 = F.unfold(x2, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    assert torch.allclose(gram2[:-1, :-1], patches2.T @ patches2)
    out = patches2 @ conv2.weight.detach().flatten(1).T + conv2.bias.detach()
    assert torch.allclose(out, conv2(x2).detach().permute(0, 2, 3, 1).reshape(-1, 3))


def test_gram_matrices_of_an_mlp_are_its_layers_inputs():
    model = seeded_init(mlp, 0)
    x, _ = data()
    grams = gram_matrices(model, model.state_dict(), [x[:30], x[30:]])
    assert set(grams) == {"0", "2", "4"}
    hidden = torch.relu(model[0](x)).detach().double()
    assert torch.allclose(grams["2"][:-1, :-1], hidden.T @ hidden)
    assert torch.allclose(grams["2"][-1, :-1], hidden.sum(0)) and grams["2"][-1, -1] == 64
    with pytest.raises(ConfigError, match="RegMean cannot merge module '1'"):
        gram_matrices(model, model.state_dict(), [x], modules=["1"])


# --- greedy soup, best child, ensemble ------------------------------------------------------------------
def test_greedy_soup_never_lowers_validation_accuracy_and_rejects_a_bad_child():
    model = seeded_init(mlp, 0)
    x, _ = data(n=200)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the parent gets right: its perturbations are good, a far model is not
    good = model.state_dict()
    children = [perturbed(good, s, scale=0.05) for s in range(4)] + [perturbed(good, 9, scale=5.0)]
    soup = greedy_soup(model, children, x, y)
    assert soup.val_acc >= max(soup.child_val_acc)
    assert soup.order[0] == max(range(5), key=lambda i: (soup.child_val_acc[i], -i))
    accs = [step["val_acc"] for step in soup.steps if step["kept"]]
    assert accs == sorted(accs)  # each kept step is no worse than the soup before
    assert 4 not in soup.kept  # the garbage child
    assert [s["child"] for s in soup.steps] == soup.order
    assert evaluate(model, x, y, params=soup.state_dict)[1] == soup.val_acc
    close(soup.state_dict, uniform_soup([children[i] for i in soup.kept]))
    strict = greedy_soup(model, [good, good], x, y, accept_ties=False)
    assert strict.kept == [0]


def test_best_child_and_each_childs_metrics():
    model = seeded_init(mlp, 0)
    x, y = data(n=200)
    children = [perturbed(model.state_dict(), s, scale=1.0) for s in range(3)]
    each = evaluate_each(model, children, x, y)
    assert best_child(model, children, x, y) == max(range(3), key=lambda i: (each[i][1], -i))


def test_ensemble_of_hand_made_linear_models():
    model = nn.Linear(2, 2, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    a = {"weight": torch.tensor([[2.0, 0.0], [0.0, -4.0]])}
    b = {"weight": torch.tensor([[0.0, 0.0], [0.0, 6.0]])}
    # mean logits: example 0 -> (1, 0) right; example 1 -> (0, 1) right
    loss, acc = ensemble_evaluate(model, [a, b], x, y)
    assert acc == 1.0
    assert loss == pytest.approx(float(F.cross_entropy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), y)))
    loss_p, _ = ensemble_evaluate(model, [a, b], x, y, combine="probs")
    p = (torch.stack([F.softmax(x @ sd["weight"].T, -1) for sd in (a, b)]).mean(0))
    assert loss_p == pytest.approx(float(F.nll_loss(p.log(), y)), rel=1e-6)
    with pytest.raises(ConfigError, match="unknown ensemble combine 'vote'"):
        ensemble_evaluate(model, [a, b], x, y, combine="vote")


# --- SWA -----------------------------------------------------------------------------------------------
def test_swa_of_identical_checkpoints_is_the_checkpoint_and_recomputes_batchnorm():
    model = seeded_init(conv_bn, 0)
    sd = perturbed(model.state_dict(), 1)
    close(swa([sd, sd, sd]), sd)
    batches = [torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = swa([sd, sd], model=model, batches=batches)
    expected = reset_bn_stats(model, sd, batches)
    assert torch.allclose(out["1.running_mean"], expected["1.running_mean"])
    assert not torch.allclose(out["1.running_mean"], sd["1.running_mean"])
    with pytest.raises(ConfigError, match="needs training batches"):
        swa([sd], model=model)


# --- plane ---------------------------------------------------------------------------------------------
def test_plane_basis_coordinates():
    sd0 = {"w": torch.tensor([0.0, 0.0, 0.0])}
    sd1 = {"w": torch.tensor([3.0, 0.0, 0.0])}
    sd2 = {"w": torch.tensor([1.0, 2.0, 2.0])}
    basis = plane_basis(sd0, sd1, sd2)
    assert np.allclose(basis.coords, [[0, 0], [3, 0], [1, 8**0.5]])
    assert torch.allclose(basis.point(1.0, 8**0.5)["w"], sd2["w"])
    assert basis.project({"w": torch.tensor([2.0, 5.0, 5.0])}) == pytest.approx((2.0, 50**0.5))
    with pytest.raises(ConfigError, match="lie on one line"):
        plane_basis(sd0, sd1, {"w": torch.tensor([-2.0, 0.0, 0.0])})


def test_plane_grid_at_the_models_coordinates_equals_their_own_metrics():
    model = seeded_init(mlp, 0)
    sds = [model.state_dict(), perturbed(model.state_dict(), 1, 0.5), perturbed(model.state_dict(), 2, 0.5)]
    x, y = data(n=100)
    splits = {"test": (x, y), "train": (x[:50], y[:50])}
    grid = plane_grid(model, *sds, splits, num_points=5, margin=0.2)
    assert grid.loss["test"].shape == (len(grid.b), len(grid.a)) and len(grid.a) >= 5
    for sd, (i, j) in zip(sds, grid.model_index):
        for split, (xs, ys) in splits.items():
            loss, acc = evaluate(model, xs, ys, params=sd)
            assert grid.loss[split][i, j] == pytest.approx(loss, abs=1e-5) and grid.acc[split][i, j] == acc
    assert grid.model_index[0] == (int(np.flatnonzero(grid.b == 0)[0]), int(np.flatnonzero(grid.a == 0)[0]))
    # the margin: the grid reaches 20% of the span beyond the models on each side
    span = grid.model_coords[:, 1].max()
    assert grid.b[0] == pytest.approx(-0.2 * span) and grid.b[-1] == pytest.approx(1.2 * span)
    assert len(grid.rows()) == 2 * grid.loss["test"].size


def test_plane_grid_with_batchnorm_reset():
    model = seeded_init(conv_bn, 0)
    sds = [perturbed(model.state_dict(), s, 0.3) for s in range(3)]
    x = torch.randn(32, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    batches = [x[:16], x[16:]]
    grid = plane_grid(model, *sds, {"test": (x, y)}, num_points=3, bn_batches=batches)
    for sd, (i, j) in zip(sds, grid.model_index):
        loss, _ = evaluate(model, x, y, params=reset_bn_stats(model, sd, batches))
        assert grid.loss["test"][i, j] == pytest.approx(loss, abs=1e-5)


# --- shifted MNIST-1D ----------------------------------------------------------------------------------
def test_unshifted_generator_reproduces_the_embedded_test_set(mnist1d):
    x, y = mnist1d_shifted({}, num_samples=5000, seed=42)  # make_dataset's defaults: train = first 4000
    assert torch.equal(x[4000:], mnist1d.x_test) and torch.equal(y[4000:], mnist1d.y_test)


def test_shifted_mnist1d_is_seeded_and_shifted():
    state = (np.random.get_state()[1].copy(), random.getstate())
    x, y = mnist1d_shifted(num_samples=200, seed=3)
    assert np.array_equal(np.random.get_state()[1], state[0]) and random.getstate() == state[1]
    x2, y2 = mnist1d_shifted(num_samples=200, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (200, 40) and x.dtype == torch.float32 and torch.equal(y.bincount(), torch.full((10,), 20))
    plain, _ = mnist1d_shifted({}, num_samples=200, seed=3)
    assert not torch.allclose(x, plain, atol=1e-2)  # the shift changes the examples
    assert set(DEFAULT_SHIFT) <= {"corr_noise_scale", "iid_noise_scale", "shear_scale", "scale_coeff"}


def test_shifted_mnist1d_bad_settings():
    with pytest.raises(ConfigError, match="unknown mnist1d shift setting"):
        mnist1d_shifted({"final_seq_length": 20})
    with pytest.raises(ConfigError, match="max_translation must be an integer in 1..72"):
        mnist1d_shifted({"max_translation": 100})
    with pytest.raises(ConfigError, match="positive multiple of 10"):
        mnist1d_shifted(num_samples=15)
    with pytest.raises(ConfigError, match="iid_noise_scale must be a non-negative number"):
        mnist1d_shifted({"iid_noise_scale": -1})


# --- benchmark smoke test ------------------------------------------------------------------------------
@pytest.mark.slow  # 18-64 s on a loaded 2-core machine (two models, every method, one interpreter start)
def test_merging_benchmark_runs(data_root):
    script = ROOT / "experiments" / "benchmarks" / "merging.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--data-root", str(data_root)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for method in ("uniform soup", "greedy soup", "model stock", "fisher merge", "regmean merge", "ensemble"):
        assert method in proc.stdout, method
    assert "evaluation pass" in proc.stdout

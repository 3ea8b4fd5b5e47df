"""Soft tree ensembles: routing by hand, the declared symmetry group, alignment (vectorised against a
plain loop reference), the depth-1 perceptron, and the benchmark's smoke run."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmc.core.permutation.trees as trees_module
from lmc.core.interpolation import lerp_state, sweep
from lmc.core.models.trees import SoftTreeEnsemble, build, perceptron_of
from lmc.core.permutation.trees import TREE_KINDS, TreeShape, TreeSymmetry, TreeTransform, ablations
from lmc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KIND_DEPTHS = [(kind, depth) for kind in TREE_KINDS for depth in (1, 2, 3)]
IDS = [f"{k}-{d}" for k, d in KIND_DEPTHS]


def ensemble(kind, depth, trees=6, features=5, classes=3, seed=0):
    torch.manual_seed(seed)
    model = SoftTreeEnsemble((features,), classes, trees=trees, depth=depth, kind=kind).double()
    with torch.no_grad():  # spread the parameters so that the trees differ clearly
        for p in model.parameters():
            p.normal_()
    return model


def loaded(model, state_dict):
    clone = SoftTreeEnsemble((model.in_features,), model.num_classes, trees=model.trees, depth=model.depth,
                             kind=model.kind).double()
    clone.load_state_dict(state_dict)
    return clone


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --- routing, by hand -------------------------------------------------------------------------------

LN3 = math.log(3.0)  # σ(ln 3) = 3/4, σ(−ln 3) = 1/4


@pytest.mark.parametrize("kind,weights,expected", [
    # perfect: root σ = 3/4; left child σ = 1/2; right child σ = 1/4 (leaves LL, LR, RL, RR)
    ("perfect", [LN3, 0.0, -LN3], [0.375, 0.375, 0.0625, 0.1875]),
    # oblivious: level 0 σ = 3/4, level 1 σ = 1/4
    ("oblivious", [LN3, -LN3], [0.1875, 0.5625, 0.0625, 0.1875]),
    # decision list: exit at node 0 with 3/4, at node 1 with 1/4 · 1/4, the terminal leaf takes 1/4 · 3/4
    ("decision_list", [LN3, -LN3], [0.75, 0.0625, 0.1875]),
    ("modified_decision_list", [LN3, -LN3], [0.75, 0.0625]),
])
def test_leaf_probabilities_and_output_by_hand(kind, weights, expected):
    model = SoftTreeEnsemble((1,), 1, trees=1, depth=2, kind=kind).double()
    with torch.no_grad():
        model.split_weight.copy_(torch.tensor(weights).view(1, -1, 1))
        model.split_bias.zero_()
        model.leaf_value.copy_(torch.arange(1.0, len(expected) + 1).view(1, -1, 1))
    x = torch.ones(1, 1, dtype=torch.double)
    _, prob = model.routing(x)
    assert torch.allclose(prob[0, 0], torch.tensor(expected, dtype=torch.double))
    output = sum(p * (i + 1) for i, p in enumerate(expected))
    assert model(x).item() == pytest.approx(output)
    assert model.tree_outputs(x).sum().item() == pytest.approx(output)


def test_shapes_and_parameter_counts():
    x = torch.randn(4, 2, 20)
    for kind, nodes, leaves in [("perfect", 7, 8), ("oblivious", 3, 8), ("decision_list", 3, 4),
                                ("modified_decision_list", 3, 3)]:
        model = build((2, 20), 5, trees=9, depth=3, kind=kind)
        assert model(x).shape == (4, 5)
        assert model.split_weight.shape == (9, nodes, 40)
        assert model.split_bias.shape == (9, nodes)
        assert model.leaf_value.shape == (9, leaves, 5)


@pytest.mark.parametrize("option,value,message", [
    ("kind", "bushy", "unknown model.kind 'bushy'"),
    ("depth", 0, "model.depth must be a positive integer, got 0"),
    ("trees", -3, "model.trees must be a positive integer, got -3"),
])
def test_bad_options_are_one_line(option, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        SoftTreeEnsemble((4,), 2, **{option: value})
    assert "\n" not in str(err.value)


# --- the depth-1 perceptron ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TREE_KINDS)
def test_depth_one_ensemble_is_a_two_layer_perceptron(kind):
    model = ensemble(kind, 1, trees=7, features=6, classes=4)
    mlp = perceptron_of(model)
    x = torch.randn(32, 6, dtype=torch.double)
    assert torch.allclose(mlp(x), model(x), atol=1e-12)
    # the perceptron's parameters are the trees': split (w, b), then μ_0 − μ_1 and Σ μ_1
    leaf = model.leaf_value.detach()
    right = leaf[:, 1] if kind != "modified_decision_list" else torch.zeros_like(leaf[:, 0])
    assert torch.equal(mlp.hidden.weight, model.split_weight[:, 0])
    assert torch.allclose(mlp.head.weight, (leaf[:, 0] - right).T)
    assert torch.allclose(mlp.head.bias, right.sum(0))


def test_perceptron_of_refuses_deeper_trees():
    with pytest.raises(ValueError, match="depth 2"):
        perceptron_of(ensemble("perfect", 2))


# --- the symmetry group -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,depth", KIND_DEPTHS + [("perfect", 4), ("oblivious", 4)], ids=IDS + ["p4", "o4"])
def test_random_group_elements_preserve_outputs(kind, depth):
    model = ensemble(kind, depth)
    sym = model.symmetry()
    x = torch.randn(64, 5, dtype=torch.double)
    for seed in range(4):
        element = sym.random(seed)
        moved = sym.apply(element, model.state_dict())
        assert not same_state(moved, model.state_dict())  # the trees at least were permuted
        assert torch.allclose(loaded(model, moved)(x), model(x), atol=1e-12)


@pytest.mark.parametrize("kind,depth,flippable,order", [
    ("perfect", 3, 7, False), ("oblivious", 3, 3, True), ("decision_list", 3, 1, False),
    ("modified_decision_list", 3, 0, False), ("oblivious", 1, 1, False),
])
def test_random_elements_use_every_invariance_the_kind_has(kind, depth, flippable, order):
    sym = TreeSymmetry(TreeShape(kind, depth), 400)
    element = sym.random(0)
    assert int(element.flips.any(0).sum()) == flippable  # over 400 trees every flippable node flips somewhere
    changed_order = bool((element.order != torch.arange(depth)).any())
    assert changed_order == order
    only_perm = sym.random(0, invariances=("perm",))
    assert not only_perm.flips.any() and torch.equal(only_perm.order, torch.arange(depth).repeat(400, 1))


def test_a_single_flip_by_hand():
    """Flipping the root of a depth-2 perfect tree negates it and swaps its two subtrees whole."""
    model = ensemble("perfect", 2, trees=1)
    sym = model.symmetry()
    flips = torch.tensor([[True, False, False]])
    moved = sym.apply(TreeTransform(torch.tensor([0]), flips, torch.arange(2)[None]), model.state_dict())
    sd = model.state_dict()
    assert torch.equal(moved["split_weight"][0], torch.stack([-sd["split_weight"][0, 0], sd["split_weight"][0, 2],
                                                              sd["split_weight"][0, 1]]))
    assert torch.equal(moved["leaf_value"][0], sd["leaf_value"][0, [2, 3, 0, 1]])


def test_an_order_change_by_hand():
    """Swapping an oblivious tree's two levels transposes its leaves: leaf (b0, b1) ← leaf (b1, b0)."""
    model = ensemble("oblivious", 2, trees=1)
    moved = model.symmetry().apply(TreeTransform(torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bool),
                                                 torch.tensor([[1, 0]])), model.state_dict())
    sd = model.state_dict()
    assert torch.equal(moved["split_weight"][0], sd["split_weight"][0, [1, 0]])
    assert torch.equal(moved["leaf_value"][0], sd["leaf_value"][0, [0, 2, 1, 3]])


def test_flips_where_the_kind_has_none_are_refused():
    model = ensemble("decision_list", 3)
    bad = model.symmetry().identity()
    bad.flips[0, 0] = True  # only the terminal node (2) of a decision list can flip
    with pytest.raises(ValueError, match="cannot flip"):
        model.symmetry().apply(bad, model.state_dict())


def test_transform_round_trips_through_plain_tensors():
    element = TreeSymmetry(TreeShape("oblivious", 3), 5).random(3)
    back = TreeTransform.from_dict(element.to_dict())
    assert all(torch.equal(getattr(back, k), getattr(element, k)) for k in ("perm", "flips", "order"))


@pytest.mark.parametrize("kind,depth,counts", [
    ("perfect", 3, {("perm",): 1, ("perm", "flip"): 128, ("perm", "flip", "order"): 128}),
    ("oblivious", 3, {("perm",): 1, ("perm", "flip"): 8, ("perm", "order"): 6, ("perm", "flip", "order"): 48}),
    ("decision_list", 3, {("perm",): 1, ("perm", "flip", "order"): 2}),
    ("modified_decision_list", 3, {("perm", "flip", "order"): 1}),
])
def test_pattern_counts_are_the_papers(kind, depth, counts):
    shape = TreeShape(kind, depth)
    for invariances, count in counts.items():
        flips, order = shape.patterns(invariances)
        assert len(flips) == len(order) == count
        assert not flips[0].any() and torch.equal(order[0], torch.arange(depth))  # pattern 0 is the identity


def test_bad_invariances_and_too_many_patterns_are_one_line():
    shape = TreeShape("perfect", 5)
    with pytest.raises(ConfigError, match="bad align.invariances") as err:
        shape.patterns(("perm", "swap"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="bad align.invariances"):
        shape.patterns(("flip",))
    with pytest.raises(ConfigError, match="2147483648 flip/order patterns") as err:
        shape.patterns(("perm", "flip"))
    assert "\n" not in str(err.value)


def test_ablation_rows_follow_the_kind():
    def rows(kind):
        return list(ablations(TreeSymmetry(TreeShape(kind, 2), 3)))

    assert rows("oblivious") == ["perm", "perm+flip", "perm+flip+order"]
    assert rows("perfect") == rows("decision_list") == ["perm", "perm+flip"]
    assert rows("modified_decision_list") == ["perm"]


# --- alignment ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,depth", KIND_DEPTHS, ids=IDS)
def test_weight_matching_recovers_a_transformed_copy_exactly(kind, depth):
    model = ensemble(kind, depth, trees=16)
    sym = model.symmetry()
    sd = model.state_dict()
    copy = sym.apply(sym.random(7), sd)
    found = sym.weight_matching(sd, copy)
    assert same_state(sym.apply(found, copy), sd)


@pytest.mark.parametrize("kind,depth", KIND_DEPTHS, ids=IDS)
def test_activation_matching_recovers_a_transformed_copy_exactly(kind, depth):
    model = ensemble(kind, depth, trees=16)
    sym = model.symmetry()
    copy = loaded(model, sym.apply(sym.random(11), model.state_dict()))
    x = torch.randn(300, 5, dtype=torch.double)
    found = sym.align("activation_matching", model, copy, x, num_samples=64, seed=1)
    assert same_state(sym.apply(found, copy.state_dict()), model.state_dict())


def test_permutation_alone_cannot_undo_flips():
    """With flips in play, matching by tree permutation only leaves the copy misaligned: what the
    paper's ablation measures."""
    model = ensemble("perfect", 2, trees=16)
    sym = model.symmetry()
    sd = model.state_dict()
    flipped = sym.apply(sym.random(5), sd)
    assert not same_state(sym.apply(sym.weight_matching(sd, flipped, ("perm",)), flipped), sd)
    only_permuted = sym.apply(sym.random(5, invariances=("perm",)), sd)
    assert same_state(sym.apply(sym.weight_matching(sd, only_permuted, ("perm",)), only_permuted), sd)


def reference_node_weights(kind, depth):
    """The number of leaves under each node, counted from the definitions (not from TreeShape)."""
    if kind == "perfect":
        return [2 ** (depth - int(math.floor(math.log2(n + 1)))) for n in range(2 ** depth - 1)]
    if kind == "oblivious":
        return [2 ** depth] * depth
    leaves = depth + 1 if kind == "decision_list" else depth
    return [leaves - n for n in range(depth)]


def reference_patterns(kind, depth, invariances):
    """Every (flips, order) of one tree, by itertools."""
    nodes = 2 ** depth - 1 if kind == "perfect" else depth
    free = {"perfect": list(range(nodes)), "oblivious": list(range(depth)), "decision_list": [depth - 1],
            "modified_decision_list": []}[kind] if "flip" in invariances else []
    orders = list(itertools.permutations(range(depth))) if kind == "oblivious" and "order" in invariances else [
        tuple(range(depth))]
    for order in orders:
        for bits in itertools.product([False, True], repeat=len(free)):
            flips = torch.zeros(1, nodes, dtype=torch.bool)
            flips[0, free] = torch.tensor(bits, dtype=torch.bool)
            yield flips, torch.tensor([order])


def reference_weight_matching(model, sd_a, sd_b, invariances):
    """Plain loops: every pair of trees × every pattern, transforming one tree at a time with
    ``apply``, then one linear assignment."""
    from scipy.optimize import linear_sum_assignment

    M = model.trees
    one = TreeSymmetry(model.shape, 1)
    omega2 = torch.tensor(reference_node_weights(model.kind, model.depth), dtype=torch.double)
    patterns = list(reference_patterns(model.kind, model.depth, invariances))
    best = torch.full((M, M), -math.inf, dtype=torch.double)
    best_pattern = {}
    for j in range(M):
        tree_b = {k: v[j : j + 1] for k, v in sd_b.items()}
        for flips, order in patterns:
            moved = one.apply(TreeTransform(torch.tensor([0]), flips, order), tree_b)
            for i in range(M):
                nodes = (sd_a["split_weight"][i] * moved["split_weight"][0]).sum(1) \
                    + sd_a["split_bias"][i] * moved["split_bias"][0]
                value = (omega2 * nodes).sum() + (sd_a["leaf_value"][i] * moved["leaf_value"][0]).sum()
                if value > best[i, j]:
                    best[i, j] = value
                    best_pattern[i, j] = (flips[0], order[0])
    _, cols = linear_sum_assignment(best.numpy(), maximize=True)
    perm = torch.from_numpy(cols).long()
    flips = torch.stack([best_pattern[i, int(j)][0] for i, j in enumerate(perm)])
    order = torch.stack([best_pattern[i, int(j)][1] for i, j in enumerate(perm)])
    return best, TreeTransform(perm, flips, order)


@pytest.mark.parametrize("kind,depth,invariances", [
    ("perfect", 2, ("perm", "flip")), ("perfect", 3, ("perm", "flip")), ("perfect", 2, ("perm",)),
    ("oblivious", 3, ("perm", "flip", "order")), ("oblivious", 2, ("perm", "order")),
    ("oblivious", 3, ("perm", "flip")),
    ("decision_list", 3, ("perm", "flip")), ("modified_decision_list", 2, ("perm", "flip", "order")),
])
def test_vectorised_weight_matching_equals_the_loop_reference(kind, depth, invariances, monkeypatch):
    """Two independent ensembles (no exact answer to recover): the same similarities, permutation and
    patterns as the plain loops, also when the rows are processed in chunks of 2 trees."""
    model_a, model_b = ensemble(kind, depth, trees=7, seed=1), ensemble(kind, depth, trees=7, seed=2)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    sym = model_a.symmetry()
    best_ref, ref = reference_weight_matching(model_a, sd_a, sd_b, invariances)
    for chunk_elements in (trees_module._CHUNK_ELEMENTS, 2 * 7 * 128):
        monkeypatch.setattr(trees_module, "_CHUNK_ELEMENTS", chunk_elements)
        flips, order = sym.shape.patterns(invariances)
        nodes_a = torch.cat([sd_a["split_weight"], sd_a["split_bias"][..., None]], -1)
        nodes_b = torch.cat([sd_b["split_weight"], sd_b["split_bias"][..., None]], -1)
        best, _ = trees_module.pattern_similarity(sym.shape, sym.node_weights(), flips, order, nodes_a, nodes_b,
                                                  sd_a["leaf_value"], sd_b["leaf_value"])
        assert torch.allclose(best, best_ref, rtol=1e-12, atol=1e-9)
        if kind == "perfect" and "flip" in invariances:  # the recursion reaches the same maxima
            omega2 = sym.node_weights() ** 2
            recursive = trees_module.perfect_flip_similarity(depth, omega2, nodes_a, nodes_b, sd_a["leaf_value"],
                                                             sd_b["leaf_value"])
            assert torch.allclose(recursive, best_ref, rtol=1e-12, atol=1e-9)
        found = sym.weight_matching(sd_a, sd_b, invariances)
        assert torch.equal(found.perm, ref.perm)
        assert same_state(sym.apply(found, sd_b), sym.apply(ref, sd_b))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_recursive_and_enumerated_flip_search_agree(depth):
    model_a, model_b = ensemble("perfect", depth, trees=12, seed=3), ensemble("perfect", depth, trees=12, seed=4)
    sym = model_a.symmetry()
    x = torch.randn(40, 5, dtype=torch.double)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    pairs = [(sym.weight_matching(sd_a, sd_b, search="enumerate"), sym.weight_matching(sd_a, sd_b, search="recursive")),
             (sym.activation_matching(model_a, model_b, x, search="enumerate"),
              sym.activation_matching(model_a, model_b, x, search="recursive"))]
    for enumerated, recursive in pairs:
        assert torch.equal(enumerated.perm, recursive.perm) and torch.equal(enumerated.flips, recursive.flips)
        assert enumerated.flips.any()  # flips were needed


def test_recursion_aligns_deep_perfect_trees_beyond_the_enumeration():
    """Depth 6: 2^63 flip patterns, none enumerated; the recursion still recovers a transformed copy."""
    model = ensemble("perfect", 6, trees=10)
    sym = model.symmetry()
    copy = sym.apply(sym.random(2), model.state_dict())
    assert same_state(sym.apply(sym.weight_matching(model.state_dict(), copy), copy), model.state_dict())
    with pytest.raises(ConfigError, match="patterns"):
        sym.weight_matching(model.state_dict(), copy, search="enumerate")


def test_alignment_methods_and_their_errors():
    model = ensemble("oblivious", 2)
    sym = model.symmetry()
    assert same_state(sym.apply(sym.align("none", model, model), model.state_dict()), model.state_dict())
    with pytest.raises(ConfigError, match="unknown align.method 'ste'"):
        sym.align("ste", model, model)
    with pytest.raises(ValueError, match="needs training data"):
        sym.align("activation_matching", model, model)
    with pytest.raises(ConfigError, match="unknown align.search 'greedy'"):
        sym.weight_matching(model.state_dict(), model.state_dict(), search="greedy")
    with pytest.raises(ConfigError, match="search=recursive needs perfect trees"):
        sym.weight_matching(model.state_dict(), model.state_dict(), search="recursive")
    with pytest.raises(ValueError, match="missing"):
        sym.weight_matching({"leaf_value": model.leaf_value}, model.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        TreeSymmetry(TreeShape("oblivious", 3), 6).apply(sym.identity(), model.state_dict())


def test_aligned_ensemble_trains_interpolates_and_keeps_its_function(mnist1d):
    """The path a study takes: train two ensembles, align B by weight matching, check that B still
    computes the same function, sweep the interpolation (the endpoints reproduce A and B)."""
    from lmc.core.training import TrainConfig, evaluate, seeded_init, train

    data = mnist1d
    build_one = lambda: SoftTreeEnsemble(data.input_shape, data.num_classes, trees=16, depth=2, kind="oblivious")
    models = [seeded_init(build_one, seed) for seed in (0, 1)]
    cfg = TrainConfig(epochs=2, batch_size=512, lr=1e-2, schedule="constant")
    history = [train(m, data, cfg, data_seed=s, progress=False) for s, m in enumerate(models)]
    assert history[0][-1]["loss"] < math.log(10)  # learned something beyond chance
    sym = models[0].symmetry()
    sd_a, sd_b = models[0].state_dict(), models[1].state_dict()
    aligned = sym.apply(sym.weight_matching(sd_a, sd_b), sd_b)
    x, y = data.split("test")
    assert evaluate(models[1], x, y) == pytest.approx(evaluate(models[1], x, y, params=aligned), abs=1e-6)
    rows = sweep(models[0], sd_a, aligned, [0.0, 0.5, 1.0], {"test": (x, y)}, "trees")
    assert rows[0]["acc"] == pytest.approx(evaluate(models[0], x, y)[1])
    assert rows[-1]["acc"] == pytest.approx(evaluate(models[1], x, y)[1], abs=1e-6)
    assert torch.equal(lerp_state(sd_a, aligned, 0.0)["leaf_value"], sd_a["leaf_value"])


def test_benchmark_smoke_run():
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/trees.py"), "--trees", "8",
                           "--depths", "1", "2", "--reference-trees", "4", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perfect" in proc.stdout and "oblivious" in proc.stdout and "x" in proc.stdout

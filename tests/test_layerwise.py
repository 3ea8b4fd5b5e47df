"""Layer-wise linear mode connectivity (lmc.core.layerwise) on hand-made models with known answers."""

import csv
import io
import math
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from lmc.core.layerwise import (
    LAYERWISE_COLUMNS,
    LayerSet,
    barrier_table,
    batched_pays,
    cumulative_sets,
    evaluate_points,
    interpolated_state,
    layer_groups,
    layer_order,
    layerwise_points,
    layerwise_rows,
    over_training_rows,
    random_direction_sets,
    single_sets,
    window_sets,
)
from lmc.core.models import build_model
from lmc.core.training import evaluate, seeded_init
from lmc.errors import ConfigError

# ------------------------------------------------------------------------------------------ hand-made models


class Shift(nn.Module):
    """Adds a learned scalar ``c`` to its input."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, s):
        return s + self.c


class LogBinary(nn.Module):
    """Logits ``(s, log(1 − e^s))`` of a score ``s < 0``: the softmax is ``(e^s, 1 − e^s)``, so the
    cross-entropy of class 0 is exactly ``−s``: linear in s."""

    def forward(self, s):
        s = s.squeeze(-1)
        return torch.stack([s, torch.log1p(-torch.exp(s))], dim=-1)


def linear_loss_model() -> nn.Module:
    """``loss = −mean(w·x + b + c)`` on class-0 examples: linear in every parameter."""
    return nn.Sequential(OrderedDict(fc=nn.Linear(2, 1), shift=Shift(), out=LogBinary()))


def linear_loss_state(w, b, c) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.tensor([w], dtype=torch.float64), "fc.bias": torch.tensor([b], dtype=torch.float64),
            "shift.c": torch.tensor(c, dtype=torch.float64)}


def linear_loss_data(n: int = 64):
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, torch.zeros(n, dtype=torch.long)


SD_A = linear_loss_state([0.1, -0.2], -1.0, -0.5)
SD_B = linear_loss_state([-0.3, 0.2], -0.8, -0.2)


def fc_score(sd, x) -> float:
    """``mean(w·x + b)``: minus the loss the fc layer contributes."""
    return float((x @ sd["fc.weight"][0] + sd["fc.bias"][0]).mean())


def by_curve(table):
    return {(r["set"], r["base"], r["epoch"], r["split"]): r for r in table}


class Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def planted_pair():
    """A small network A trained to 4 classes of a random linear teacher, and B = A with a little noise
    everywhere and its first layer negated (weight and bias): ``|fc1(x)|`` hides the sign, so B computes
    nearly A's function, but halfway between them fc1's output collapses towards 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    model = seeded_init(lambda: nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 32), abs=Abs(), fc2=nn.Linear(32, 32), relu=nn.ReLU(), head=nn.Linear(32, 4))), 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sd_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd_b = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd_a.items()}
    sd_b["fc1.weight"], sd_b["fc1.bias"] = -sd_b["fc1.weight"], -sd_b["fc1.bias"]
    return model, sd_a, sd_b, {"train": (x, y)}


# --------------------------------------------------------------------------------------------------- layers


def test_layer_groups_by_module_with_buffers_and_blocks():
    model = build_model("resnet20", (3, 8, 8), 10, base_channels=4)
    groups = layer_groups(model)
    assert list(groups)[:4] == ["conv", "norm", "layer1.0.conv1", "layer1.0.norm1"]
    assert groups["conv"] == ["conv.weight"]  # no bias before a BatchNorm
    assert groups["norm"] == ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                              "norm.num_batches_tracked"]
    assert groups["layer2.0.shortcut.0"] == ["layer2.0.shortcut.0.weight"]
    assert list(groups)[-1] == "fc" and groups["fc"] == ["fc.weight", "fc.bias"]
    assert sum(map(len, groups.values())) == len(model.state_dict())
    blocks = layer_groups(model, {"stage1": "layer1.*", "stage3": r"layer3\..*"})
    assert list(blocks) == ["conv", "norm", "stage1", *[n for n in groups if n.startswith("layer2")], "stage3", "fc"]
    assert blocks["stage1"] == [k for k in model.state_dict() if k.startswith("layer1.")]
    assert list(layer_groups(model, ["layer1.*"]))[2] == "layer1.*"  # a list: each pattern names its block
    with pytest.raises(ConfigError, match="'layer4.\\*' match no module"):
        layer_groups(model, ["layer4.*"])
    with pytest.raises(ConfigError, match="not a regular expression"):
        layer_groups(model, ["layer1.("])
    # a state dict works as well; an entry of the root module is its own layer; nothing to move, no layer
    root = {"scale": torch.ones(3), "fc.weight": torch.ones(2, 2), "counter.n": torch.tensor(3)}
    assert layer_groups(root) == {"scale": ["scale"], "fc": ["fc.weight"]}


def test_cumulative_orders_and_windows_give_the_right_sets():
    groups = {f"l{i}": [f"l{i}.weight", f"l{i}.bias"] for i in range(8)}
    names = list(groups)
    shallow = cumulative_sets(groups, "shallow")
    assert [s.name for s in shallow] == [f"cum_shallow_{k}" for k in range(1, 9)]
    assert [s.layer for s in shallow] == names  # each indexed by the layer it adds
    assert shallow[2].keys == ("l0.weight", "l0.bias", "l1.weight", "l1.bias", "l2.weight", "l2.bias")
    assert all(s.kind == "cumulative" for s in shallow)
    deep = cumulative_sets(groups, "deep")
    assert [s.layer for s in deep] == names[::-1] and deep[1].keys == ("l7.weight", "l7.bias", "l6.weight", "l6.bias")
    # minimal: first n // 4 = 2 layers, last 2, then the middle (the paper's keys[:5] + keys[-5:] + keys[5:-5])
    assert layer_order(names, "minimal") == ["l0", "l1", "l6", "l7", "l2", "l3", "l4", "l5"]
    assert layer_order(names, "minimal", edge=5) == names[:4] + names[4:]  # capped at n // 2: no repeats
    assert layer_order(names[:4], "minimal") == ["l0", "l3", "l1", "l2"]
    assert [s.layer for s in cumulative_sets(groups, "minimal")] == layer_order(names, "minimal")
    shuffled = layer_order(names, "random", seed=3)
    assert sorted(shuffled) == names and shuffled != names and shuffled == layer_order(names, "random", seed=3)
    assert shuffled != layer_order(names, "random", seed=4)
    assert cumulative_sets(groups, "random", seed=3)[-1].name == "cum_random3_8"
    assert [s.layer for s in cumulative_sets(groups, "random", seed=3)] == shuffled
    with pytest.raises(ConfigError, match="unknown layer order 'middle'"):
        cumulative_sets(groups, "middle")
    windows = window_sets(groups, 3)
    assert [s.name for s in windows] == [f"window3_l{i}-l{i + 2}" for i in range(6)]
    assert windows[1].layer == "l1" and windows[1].keys == tuple(k for i in (1, 2, 3) for k in groups[f"l{i}"])
    with pytest.raises(ConfigError, match="window width must be an integer in 1..8"):
        window_sets(groups, 9)
    singles = single_sets(groups)
    assert [(s.name, s.layer, s.kind) for s in singles] == [(n, n, "single") for n in names]
    controls = random_direction_sets(singles[:2], samples=3, seed=7)
    assert [s.name for s in controls] == [f"random_dir{j}_l{i}" for i in range(2) for j in range(3)]
    assert len({s.direction_seed for s in controls}) == 6
    assert controls == random_direction_sets(singles[:2], samples=3, seed=7)  # the same seeds in every process


# ------------------------------------------------------------------------------------------------- barriers


def test_a_layer_whose_interpolation_is_exactly_linear_in_loss_has_barrier_zero():
    """B differs from A only in ``fc``, and the loss is linear in fc's parameters: fc's curves (into A or B)
    are the whole model's, the straight line between the full endpoints (which differ), so their barriers
    are 0. The shift does not move, so its curves stay at M_A (into A) or M_B (into B): against the sloped
    baseline, their barrier is ``max(0, M_A − M_B)`` into A and ``max(0, M_B − M_A)`` into B."""
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    sd_b = {**SD_B, "shift.c": SD_A["shift.c"]}
    rows = layerwise_rows(model, SD_A, sd_b, {"train": (x, y)}, single_sets(layer_groups(model)), "naive",
                          alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
    loss_a, loss_b = -fc_score(SD_A, x) - SD_A["shift.c"].item(), -fc_score(sd_b, x) - SD_A["shift.c"].item()
    assert loss_a - loss_b > 0.05  # the endpoints differ: the baseline is a sloped line
    whole = {r["alpha"]: r["loss"] for r in rows if r["set"] == ""}
    assert whole[0.0] == pytest.approx(loss_a, abs=1e-6) and whole[1.0] == pytest.approx(loss_b, abs=1e-6)
    table = by_curve(barrier_table(rows))
    assert set(table) == {(name, base, "", "train") for name, base in
                          (("", ""), ("fc", "a"), ("fc", "b"), ("shift", "a"), ("shift", "b"))}
    for key in (("", "", "", "train"), ("fc", "a", "", "train"), ("fc", "b", "", "train")):
        assert table[key]["loss"] == pytest.approx(0.0, abs=1e-6)
        assert table[key]["loss_midpoint"] == pytest.approx(0.0, abs=1e-6)
    assert table[("shift", "a", "", "train")]["loss"] == pytest.approx(loss_a - loss_b, abs=1e-6)
    assert table[("shift", "a", "", "train")]["loss_midpoint"] == pytest.approx((loss_a - loss_b) / 2, abs=1e-6)
    assert table[("shift", "b", "", "train")]["loss"] == pytest.approx(0.0, abs=1e-6)
    assert table[("shift", "b", "", "train")]["loss_midpoint"] == pytest.approx((loss_b - loss_a) / 2, abs=1e-6)


def test_barriers_use_the_full_endpoints_as_baseline():
    """B differs in both layers. Interpolating fc alone into A, the loss is ``(1 − α)·M_A + α·M_B`` plus
    ``α·(c_B − c_A)`` (the shift stays at A): barrier ``max(0, c_B − c_A)`` at α = 1, midpoint half of it; into
    B the difference is ``(1 − α)·(c_A − c_B)``. For the shift layer the roles of the two layers swap."""
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    sets = single_sets(layer_groups(model))
    table = by_curve(barrier_table(layerwise_rows(model, SD_A, SD_B, {"train": (x, y)}, sets, "naive")))
    dc = SD_B["shift.c"].item() - SD_A["shift.c"].item()  # 0.3
    dfc = fc_score(SD_B, x) - fc_score(SD_A, x)
    expected = {("fc", "a"): (max(0, dc), dc / 2), ("fc", "b"): (max(0, -dc), -dc / 2),
                ("shift", "a"): (max(0, dfc), dfc / 2), ("shift", "b"): (max(0, -dfc), -dfc / 2)}
    for (name, base), (full, midpoint) in expected.items():
        record = table[(name, base, "", "train")]
        assert record["loss"] == pytest.approx(full, abs=1e-6)
        assert record["loss_midpoint"] == pytest.approx(midpoint, abs=1e-6)
    assert table[("fc", "a", "", "train")]["loss"] == pytest.approx(0.3, abs=1e-6)


def test_a_planted_bad_layer_has_the_largest_barrier():
    model, sd_a, sd_b, splits = planted_pair()
    groups = layer_groups(model)
    assert list(groups) == ["fc1", "fc2", "head"]
    assert evaluate(model, *splits["train"], params=sd_b)[1] > 0.9  # B computes nearly A's function
    table = barrier_table(layerwise_rows(model, sd_a, sd_b, splits, single_sets(groups), "naive"))
    for base in "ab":
        barriers = {r["set"]: r for r in table if r["base"] == base}
        assert max(barriers, key=lambda n: barriers[n]["loss_midpoint"]) == "fc1"
        assert barriers["fc1"]["loss_midpoint"] > 1.0 and barriers["fc1"]["error_midpoint"] > 0.5
        assert max(barriers["fc2"]["loss"], barriers["head"]["loss"]) < 0.01


# --------------------------------------------------------------------------------------- random directions


def _distance(state, reference, keys) -> float:
    return math.sqrt(sum(float(((state[k].double() - reference[k].double()) ** 2).sum()) for k in keys))


def test_the_random_direction_moves_exactly_the_averaging_distance():
    model = build_model("cnn1d", (40,), 10, width=8, norm="batchnorm")
    sd_a = seeded_init(lambda: build_model("cnn1d", (40,), 10, width=8, norm="batchnorm"), 0).state_dict()
    sd_b = seeded_init(lambda: build_model("cnn1d", (40,), 10, width=8, norm="batchnorm"), 1).state_dict()
    sd_b["norm1.running_var"] += 1.0  # buffers that differ: they stay at the base in the control
    sd_b["norm1.weight"] += 0.5  # BatchNorm's weight and bias start at 1 and 0 in every init
    sd_b["norm1.bias"] -= 0.5
    params = [n for n, _ in model.named_parameters()]
    for name in ("conv1", "norm1", "head"):
        layer = single_sets(layer_groups(model))[[s.name for s in single_sets(layer_groups(model))].index(name)]
        moved = [k for k in layer.keys if k in params]
        distance = _distance(sd_b, sd_a, moved)
        assert distance > 0.1
        controls = random_direction_sets([layer], samples=3, seed=0)
        ends = []
        for control in controls:
            for base, alpha, start, fraction in (("a", 1.0, sd_a, 1.0), ("a", 0.5, sd_a, 0.5), ("b", 0.0, sd_b, 1.0),
                                                 ("b", 0.25, sd_b, 0.75), ("a", 0.0, sd_a, 0.0)):
                state = interpolated_state(sd_a, sd_b, control, base, alpha, params)
                assert _distance(state, start, moved) == pytest.approx(fraction * distance, rel=1e-6)
                assert all(torch.equal(state[k], start[k]) for k in start if k not in moved)  # buffers included
            ends.append(interpolated_state(sd_a, sd_b, control, "a", 1.0, params))
        flat = [torch.cat([(e[k] - sd_a[k]).flatten() for k in moved]) for e in ends]
        average = torch.cat([(sd_b[k] - sd_a[k]).flatten() for k in moved])
        assert abs(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)) < 0.9  # samples differ
        assert abs(torch.nn.functional.cosine_similarity(flat[0], average, dim=0)) < 0.9  # not the averaging one
        again = interpolated_state(sd_a, sd_b, controls[0], "a", 1.0, params)
        assert all(torch.equal(again[k], ends[0][k]) for k in moved)  # seeded


def test_random_direction_rows_sit_beside_the_averaging_ones():
    """On the linear-loss model the loss moves by ``−mean(d_w·x + d_b)`` for a displacement d of fc: the
    control's barriers follow from its displacement, against the same full-endpoint baseline."""
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    singles = single_sets(layer_groups(model))
    controls = random_direction_sets(singles, 3, seed=0)
    rows = layerwise_rows(model, SD_A, SD_B, {"train": (x, y)}, singles + controls, "naive")
    table = by_curve(barrier_table(rows))
    assert {name for name, *_ in table} == {"", "fc", "shift"} | {f"random_dir{j}_{n}" for j in range(3)
                                                                   for n in ("fc", "shift")}
    assert {r["layer"] for r in rows if r["set"].startswith("random_dir")} == {"fc", "shift"}
    loss_a = -fc_score(SD_A, x) - SD_A["shift.c"].item()
    loss_b = -fc_score(SD_B, x) - SD_B["shift.c"].item()
    params = [n for n, _ in model.named_parameters()]
    for control in controls[:3]:  # fc's
        moved = interpolated_state(SD_A, SD_B, control, "a", 1.0, params)
        drop = fc_score(moved, x) - fc_score(SD_A, x)  # the loss falls by this much at α = 1 into A
        curve = {r["alpha"]: r["loss"] for r in rows if r["set"] == control.name and r["base"] == "a"}
        assert curve[0.0] == pytest.approx(loss_a, abs=1e-6) and curve[1.0] == pytest.approx(loss_a - drop, abs=1e-6)
        expected = max(0.0, (loss_a - drop) - loss_b)  # linear in α: the larger end
        assert table[(control.name, "a", "", "train")]["loss"] == pytest.approx(expected, abs=1e-6)
        into_b = {r["alpha"]: r["loss"] for r in rows if r["set"] == control.name and r["base"] == "b"}
        assert into_b[1.0] == pytest.approx(loss_b, abs=1e-6)
        assert into_b[0.5] == pytest.approx(loss_b - drop / 2, abs=1e-6)  # the same direction, from B
    with pytest.raises(ConfigError, match="no parameters to move"):
        interpolated_state({"n.v": torch.ones(2)}, {"n.v": torch.zeros(2)},
                           LayerSet("n", "n", ("n.v",), "random_dir", 1), "a", 0.5, param_keys=[])


# -------------------------------------------------------------------------------------- rows and evaluation


def test_rows_columns_and_endpoint_reuse():
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    groups = layer_groups(model)
    sets = single_sets(groups) + cumulative_sets(groups, "deep")
    alphas = [0.0, 0.5, 1.0]
    points = layerwise_points(model, SD_A, SD_B, sets, "naive", alphas)
    assert len(points) == 2 + 1 + len(sets) * 2 * 2  # θ_A, θ_B, the whole midpoint, each set × base × 2 α
    assert len(points[0].labels) == 1 + len(sets)  # θ_A also fills every set's "into A at α = 0" row
    rows = evaluate_points(model, points, {"train": (x, y), "test": (x[:10], y[:10])})
    assert all(tuple(r) == LAYERWISE_COLUMNS for r in rows)
    assert len(rows) == 2 * (3 + len(sets) * 2 * 3)
    first = rows[0]
    assert (first["method"], first["layer"], first["set"], first["base"], first["epoch"], first["alpha"]) == \
        ("naive", "", "", "", "", 0.0)
    end_a = {r["loss"] for r in rows if r["split"] == "train" and (r["base"], r["alpha"]) in (("a", 0.0), ("", 0.0))}
    assert len(end_a) == 1 and end_a.pop() == pytest.approx(-fc_score(SD_A, x) - SD_A["shift.c"].item(), abs=1e-6)
    cum = [r for r in rows if r["set"] == "cum_deep_2" and r["split"] == "train"]
    assert [(r["layer"], r["base"], r["alpha"]) for r in cum] == [
        ("fc", "a", 0.0), ("fc", "a", 0.5), ("fc", "a", 1.0), ("fc", "b", 0.0), ("fc", "b", 0.5), ("fc", "b", 1.0)]
    no_whole = layerwise_points(model, SD_A, SD_B, sets, "naive", alphas, bases=["b"], whole=False)
    assert len(no_whole) == 1 + len(sets) * 2 and all(label["set"] for p in no_whole for label in p.labels)
    with pytest.raises(ConfigError, match="increasing from 0 to 1"):
        layerwise_points(model, SD_A, SD_B, sets, "naive", [0.0, 0.5])
    with pytest.raises(ConfigError, match="unknown base 'c'"):
        layerwise_points(model, SD_A, SD_B, sets, "naive", bases=["c"])


def test_barrier_table_reads_rows_back_from_csv():
    """Rows as ``curves.csv`` gives them back (every column a string but α, loss, acc) give the same table."""
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    sets = single_sets(layer_groups(model))
    rows = over_training_rows(model, [SD_A, SD_A], [SD_B, SD_B], [3, 7], {"train": (x, y)}, sets, "naive")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LAYERWISE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    read = [{**r, "alpha": float(r["alpha"]), "loss": float(r["loss"]), "acc": float(r["acc"])}
            for r in csv.DictReader(io.StringIO(buf.getvalue()))]
    assert barrier_table(read) == barrier_table(rows)
    assert {r["epoch"] for r in barrier_table(read)} == {3, 7}
    with pytest.raises(ConfigError, match="no whole-model rows"):
        barrier_table([r for r in rows if r["set"]])


def test_corrections_are_applied_to_every_evaluated_network():
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    seen = []

    def correct(alpha, state):
        seen.append(alpha)
        return {**state, "shift.c": state["shift.c"] - 1.0}

    rows = layerwise_rows(model, SD_A, SD_B, {"train": (x, y)}, single_sets(layer_groups(model)), "naive",
                          correct=correct, batched=False)
    assert sorted(seen) == sorted([0.0, 1.0, 0.5] + [0.5, 1.0, 0.0, 0.5] * 2)
    assert rows[0]["loss"] == pytest.approx(-fc_score(SD_A, x) - SD_A["shift.c"].item() + 1.0, abs=1e-6)


def test_batchnorm_statistics_interpolate_or_reset():
    """A BatchNorm layer's running statistics move with its module (interpolated, as in a whole-model sweep);
    with lmc's BatchNorm reset as the correction, every network is evaluated with recomputed statistics,
    the same on the stacked path."""
    from lmc.core.normalization import corrections, reset_bn_stats, stat_batches

    build = lambda: build_model("cnn1d", (40,), 10, width=8, norm="batchnorm")
    model, sd_a, sd_b = build(), seeded_init(build, 0).state_dict(), seeded_init(build, 1).state_dict()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 40, generator=g), torch.randint(0, 10, (96,), generator=g)
    sd_b["norm1.running_mean"] = sd_b["norm1.running_mean"] + 1.0
    norm1 = next(s for s in single_sets(layer_groups(model)) if s.name == "norm1")
    half = interpolated_state(sd_a, sd_b, norm1, "a", 0.5)
    assert torch.allclose(half["norm1.running_mean"], sd_a["norm1.running_mean"] + 0.5)
    assert half["conv1.weight"] is sd_a["conv1.weight"] and half["norm2.running_mean"] is sd_a["norm2.running_mean"]
    batches = stat_batches(x, 2, 32, seed=0)
    correct, suffix = corrections(model, sd_a, sd_b, batches, reset_bn=True, repair=False)
    rows = layerwise_rows(model, sd_a, sd_b, {"train": (x, y)}, [norm1], "naive" + suffix, correct=correct,
                          batched=False)
    assert rows[0]["method"] == "naive+reset_bn"
    row = next(r for r in rows if r["set"] == "norm1" and r["base"] == "b" and r["alpha"] == 0.5)
    expected = evaluate(model, x, y, params=reset_bn_stats(model, interpolated_state(sd_a, sd_b, norm1, "b", 0.5),
                                                             batches))
    assert (row["loss"], row["acc"]) == pytest.approx(expected, abs=1e-6)
    stacked = layerwise_rows(model, sd_a, sd_b, {"train": (x, y)}, [norm1], "naive" + suffix, correct=correct,
                             batched=True)
    assert [r["loss"] for r in stacked] == pytest.approx([r["loss"] for r in rows], abs=1e-6)


def _stacked_equals_sequential(model, sd_a, sd_b, splits, sets):
    sequential = layerwise_rows(model, sd_a, sd_b, splits, sets, "naive", batched=False, batch_size=64)
    stacked = layerwise_rows(model, sd_a, sd_b, splits, sets, "naive", batched=True, batch_size=64)
    assert len(stacked) == len(sequential)
    for s, b in zip(sequential, stacked):
        assert {k: v for k, v in s.items() if k not in ("loss", "acc")} == \
            {k: v for k, v in b.items() if k not in ("loss", "acc")}
        assert b["loss"] == pytest.approx(s["loss"], abs=1e-6, rel=1e-6)
        assert b["acc"] == s["acc"]


def test_the_batched_path_equals_the_sequential_one():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(150, 40, generator=g), torch.randint(0, 10, (150,), generator=g)
    splits = {"train": (x, y), "test": (x[:37], y[:37])}
    for model_options in ({"name": "mlp", "width": 32, "depth": 2}, {"name": "cnn1d", "width": 8, "norm": "batchnorm"}):
        build = lambda o=model_options: build_model(o["name"], (40,), 10, **{k: v for k, v in o.items() if k != "name"})
        model, sd_a, sd_b = build(), seeded_init(build, 0).state_dict(), seeded_init(build, 1).state_dict()
        for k in sd_b:
            if "running_var" in k:
                sd_b[k] = sd_b[k] + torch.rand(sd_b[k].shape, generator=g)  # BatchNorm statistics stacked too
        groups = layer_groups(model)
        sets = (single_sets(groups) + cumulative_sets(groups, "minimal") + window_sets(groups, 2)
                + random_direction_sets(single_sets(groups)[:2], 2))
        _stacked_equals_sequential(model, sd_a, sd_b, splits, sets)


def test_the_batched_path_equals_the_sequential_one_on_resnet20():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    build = lambda: build_model("resnet20", (3, 8, 8), 10, base_channels=4)
    model, sd_a, sd_b = build(), seeded_init(build, 0).state_dict(), seeded_init(build, 1).state_dict()
    sets = single_sets(layer_groups(model, ["layer1.*", "layer2.*", "layer3.*"]))
    _stacked_equals_sequential(model, sd_a, sd_b, {"train": (x, y)}, sets)


class InPlace(nn.Module):
    """Scales a copy of its input in place: fine alone, refused by vmap (a stacked scale into one input)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.clone().mul_(self.scale))


def test_calibration_picks_a_path_and_refuses_what_vmap_cannot_run():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    model = InPlace()
    states = [{k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    assert batched_pays(model, states, x, y) is False
    rows = layerwise_rows(model, states[0], states[1], {"train": (x, y)}, single_sets(layer_groups(model)), "m")
    reference = layerwise_rows(model, states[0], states[1], {"train": (x, y)}, single_sets(layer_groups(model)), "m",
                               batched=False)
    assert rows == reference
    mlp = build_model("mlp", (4,), 2, width=8, depth=1)
    answer = batched_pays(mlp, [mlp.state_dict()] * 3, x, y)
    assert isinstance(answer, bool) and batched_pays(mlp, [mlp.state_dict()] * 3, x, y) is answer  # remembered
    with pytest.raises(ConfigError, match="batched must be"):
        evaluate_points(mlp, [], {"train": (x, y)}, batched="sometimes")


# ---------------------------------------------------------------------------------------------- over training


def test_over_training_rows_read_the_given_checkpoints():
    """Epoch e's checkpoints differ in the shift by 0.1·e: fc's barrier into A is 0.1·e at that epoch."""
    model, (x, y) = linear_loss_model().double(), linear_loss_data()
    epochs = [1, 2, 5]
    states_b = [{**SD_B, "shift.c": SD_A["shift.c"] + 0.1 * e} for e in epochs]
    rows = over_training_rows(model, [SD_A] * 3, states_b, epochs, {"train": (x, y)},
                              single_sets(layer_groups(model)), "naive", alphas=[0.0, 0.5, 1.0])
    assert {r["epoch"] for r in rows} == set(epochs)
    table = by_curve(barrier_table(rows))
    for e, sd_b in zip(epochs, states_b):
        assert table[("fc", "a", e, "train")]["loss"] == pytest.approx(0.1 * e, abs=1e-6)
        assert table[("fc", "b", e, "train")]["loss_midpoint"] == pytest.approx(-0.05 * e, abs=1e-6)
        end_b = next(r for r in rows if r["epoch"] == e and r["set"] == "" and r["alpha"] == 1.0)
        assert end_b["loss"] == pytest.approx(-fc_score(sd_b, x) - sd_b["shift.c"].item(), abs=1e-6)
    with pytest.raises(ConfigError, match="one checkpoint of A and one of B per epoch"):
        over_training_rows(model, [SD_A] * 2, states_b, epochs, {"train": (x, y)}, [], "naive")


# -------------------------------------------------------------------------------------------------- benchmark


def test_interpolation_benchmark_runs_and_reports_ratios():
    script = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "interpolation.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"(\S+)\s+(raw forward|whole sweep|layer-wise seq|layer-wise batched)\s+(\d+)\s+"
                         r"([\d.e+]+)\s+([\d.]+)x", line)
        if match:
            table[(match[1], match[2])] = (int(match[3]), float(match[4]), float(match[5]))
    for model in ("mlp", "resnet20"):
        assert table[(model, "raw forward")][2] == 1.0
        for path in ("whole sweep", "layer-wise seq", "layer-wise batched"):
            evaluations, throughput, ratio = table[(model, path)]
            assert evaluations > 1 and throughput > 0 and ratio > 0
    assert "batched / sequential" in proc.stdout

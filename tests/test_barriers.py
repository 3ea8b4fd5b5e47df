import numpy as np
import pytest

from lmc.core.barriers import barrier, barriers_from_curves, frankle_barrier, layerwise_barriers, midpoint_barrier

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
LOSS = [0.0, 2.0, 1.0, 0.5, 1.0]  # line from 0 to 1 is [0, .25, .5, .75, 1]


def test_default_barrier_is_max_gap_above_the_line():
    # gaps: 0, 1.75, 0.5, -0.25, 0 → the peak of the gap is at α = 0.25, not at the midpoint
    assert barrier(ALPHAS, LOSS) == pytest.approx(1.75)


def test_midpoint_barrier():
    assert midpoint_barrier(ALPHAS, LOSS) == pytest.approx(1.0 - 0.5)


def test_frankle_barrier_is_max_minus_mean_of_endpoints():
    assert frankle_barrier(ALPHAS, LOSS) == pytest.approx(2.0 - 0.5)


def test_midpoint_off_grid_is_interpolated():
    assert midpoint_barrier([0, 0.4, 0.6, 1], [0, 1, 3, 0]) == pytest.approx(2.0)


def test_unsorted_input_and_convex_curve():
    # a curve below the line has barrier 0 (attained at the endpoints)
    assert barrier([1.0, 0.0, 0.5], [1.0, 1.0, 0.2]) == pytest.approx(0.0)
    assert midpoint_barrier([1.0, 0.0, 0.5], [1.0, 1.0, 0.2]) == pytest.approx(-0.8)


def test_explicit_endpoints_override_curve_ends():
    # layer-wise curve: its α = 1 end is not model B; the baseline uses the given endpoint values
    assert barrier([0, 0.5, 1], [1.0, 2.0, 3.0], value_a=1.0, value_b=1.0) == pytest.approx(2.0)


def test_bad_curves_are_rejected():
    with pytest.raises(ValueError):
        barrier([0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="α = 0"):
        barrier([0.2, 1.0], [1.0, 2.0])


def rows(method, split, alphas, losses, accs, layer=""):
    return [
        {"method": method, "layer": layer, "split": split, "alpha": a, "loss": lo, "acc": ac}
        for a, lo, ac in zip(alphas, losses, accs)
    ]


def test_barriers_from_curves_all_variants_and_error():
    accs = [0.9, 0.5, 0.6, 0.8, 0.7]  # errors .1 .5 .4 .2 .3; line .1 .15 .2 .25 .3 → gaps 0 .35 .2 -.05 0
    curves = rows("naive", "test", ALPHAS, LOSS, accs) + rows("naive", "train", ALPHAS, [0] * 5, [1] * 5)
    out = barriers_from_curves(curves)
    b = out["naive"]["test"]
    assert b["loss"] == pytest.approx(1.75)
    assert b["error"] == pytest.approx(0.35)
    assert b["loss_midpoint"] == pytest.approx(0.5)
    assert b["error_midpoint"] == pytest.approx(0.4 - 0.2)
    assert b["loss_frankle"] == pytest.approx(1.5)
    assert b["error_frankle"] == pytest.approx(0.5 - 0.2)
    assert out["naive"]["train"] == {k: 0.0 for k in b}


def test_layerwise_barriers_use_full_model_endpoints():
    # whole-model endpoints: A loss 1.0 / acc .8, B loss 2.0 / acc .6 → baseline loss 1 + α, error .2 + .2α
    endpoints = {"a": {"test": {"loss": 1.0, "acc": 0.8}}, "b": {"test": {"loss": 2.0, "acc": 0.6}}}
    alphas = np.linspace(0, 1, 5)
    layer_rows = rows("wm", "test", alphas, [1.0, 1.5, 3.0, 1.5, 1.0], [0.8, 0.8, 0.4, 0.8, 0.8], layer="fc1")
    layer_rows += rows("wm", "test", alphas, [1.0] * 5, [0.8] * 5, layer="fc2")
    out = layerwise_barriers(layer_rows, endpoints)
    assert out["wm"]["fc1"]["test"]["loss"] == pytest.approx(3.0 - 1.5)
    assert out["wm"]["fc1"]["test"]["error"] == pytest.approx(0.6 - 0.3)
    # staying at A's loss is below the line to B's higher loss: barrier 0 at α = 0
    assert out["wm"]["fc2"]["test"]["loss"] == pytest.approx(0.0)
    assert out["wm"]["fc2"]["test"]["error"] == pytest.approx(0.0)
    # whole-model rows are ignored
    assert layerwise_barriers(rows("wm", "test", alphas, [0] * 5, [1] * 5), endpoints) == {}

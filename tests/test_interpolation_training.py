import pytest
import torch
from fake_datasets import tiny_data
from torch import nn

from lmc.core.interpolation import alpha_grid, layerwise_sweep, lerp_state, sweep
from lmc.core.models import build_model
from lmc.core.training import TrainConfig, evaluate, seeded_init, train
from lmc.errors import ConfigError


def test_lerp_state_endpoints_and_integer_buffers():
    a = {"w": torch.zeros(3), "n": torch.tensor(5)}
    b = {"w": torch.ones(3) * 4, "n": torch.tensor(9)}
    assert torch.equal(lerp_state(a, b, 0.0)["w"], a["w"])
    assert torch.equal(lerp_state(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(lerp_state(a, b, 0.25)["w"], torch.ones(3))
    assert lerp_state(a, b, 0.5)["n"].item() == 5  # integer buffers stay at A
    assert torch.equal(lerp_state(a, b, 0.5, keys=[])["w"], a["w"])


def test_alpha_grid():
    assert alpha_grid(25)[12] == 0.5 and len(alpha_grid(25)) == 25
    with pytest.raises(ConfigError, match="num_alphas"):
        alpha_grid(1)


def test_evaluate_on_known_model():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    loss, acc = evaluate(model, x, y, batch_size=2)
    expected = torch.nn.functional.cross_entropy(x, y).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    assert acc == pytest.approx(2 / 3)


def test_training_is_seeded_and_learns():
    data = tiny_data(256)
    cfg = TrainConfig(epochs=15, batch_size=32, lr=1e-2)
    models = []
    for _ in range(2):
        m = seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=1), 0)
        history = train(m, data, cfg, data_seed=0, progress=False)
        models.append(m)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert evaluate(models[0], data.x_test, data.y_test)[1] >= 0.9
    # another data-order seed, same init: different weights
    m = seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=1), 0)
    train(m, data, cfg, data_seed=1, progress=False)
    assert not torch.equal(m.fc1.weight, models[0].fc1.weight)


def test_training_divergence_is_reported():
    from lmc.core.training import TrainingDiverged

    data = tiny_data(256)
    m = seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=1), 0)
    with pytest.raises(TrainingDiverged, match=r"at step \d+ \(epoch \d\)"):
        train(m, data, TrainConfig(epochs=2, lr=1e12, optimizer="sgd"), data_seed=0, progress=False)


def test_bad_train_config():
    with pytest.raises(ConfigError, match="train.epochs must be a positive integer, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="valid: adam, adamw, sgd"):
        TrainConfig(optimizer="lbfgs")


def test_sweep_rows_and_layerwise_keep_other_layers_at_a():
    data = tiny_data(256)
    a = seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=2), 0)
    b = seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=2), 1)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    rows = sweep(a, sd_a, sd_b, alpha_grid(5), splits, "naive")
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train", "test"}
    end = [r for r in rows if r["alpha"] == 1.0 and r["split"] == "test"][0]
    assert end["loss"] == pytest.approx(evaluate(b, data.x_test, data.y_test)[0], rel=1e-6)
    layers = {"fc1": ["fc1.weight", "fc1.bias"], "head": ["head.weight", "head.bias"]}
    lrows = layerwise_sweep(a, sd_a, sd_b, alpha_grid(3), {"test": splits["test"]}, "naive", layers)
    assert [r["layer"] for r in lrows] == ["fc1"] * 3 + ["head"] * 3
    # only the head moved to B: equals A with B's head swapped in
    hybrid = {**sd_a, "head.weight": sd_b["head.weight"], "head.bias": sd_b["head.bias"]}
    expected = evaluate(a, data.x_test, data.y_test, params=hybrid)[0]
    assert lrows[-1]["loss"] == pytest.approx(expected, rel=1e-6)

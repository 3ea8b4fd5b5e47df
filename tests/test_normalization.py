"""BatchNorm reset and REPAIR on interpolated networks."""

import pytest
import torch
from torch import nn

from lmc.core.interpolation import lerp_state, sweep
from lmc.core.normalization import Repair, corrections, has_batchnorm, reset_bn_stats, resolve_reset_bn, stat_batches
from lmc.core.training import seeded_init
from lmc.errors import ConfigError


def conv_bn(width=6):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4),
    )


def mlp(width=12):
    return nn.Sequential(nn.Flatten(), nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3))


def endpoints(build, seed_b=1):
    a, b = seeded_init(build, 0), seeded_init(build, seed_b)
    with torch.no_grad():  # make B's statistics differ from A's: shift and scale its layers
        for m in b.modules():
            if isinstance(m, (nn.Linear, nn.BatchNorm2d)):
                m.weight.mul_(1.7)
                m.bias.add_(0.3)
    return a, a.state_dict(), b.state_dict()


def images(n, seed):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def test_resolve_reset_bn():
    assert resolve_reset_bn("auto", conv_bn()) is True and has_batchnorm(conv_bn())
    assert resolve_reset_bn("auto", mlp()) is False
    assert resolve_reset_bn(False, conv_bn()) is False and resolve_reset_bn(True, mlp()) is True
    with pytest.raises(ConfigError, match="interp.reset_bn must be auto, true or false, got 'yes'"):
        resolve_reset_bn("yes", mlp())


def test_stat_batches_are_seeded():
    x = torch.arange(100.0)[:, None]
    b1, b2, b3 = (stat_batches(x, 3, 20, s) for s in (0, 0, 1))
    assert len(b1) == 3 and all(len(b) == 20 for b in b1)
    assert all(torch.equal(p, q) for p, q in zip(b1, b2)) and not torch.equal(b1[0], b3[0])
    assert len(torch.cat(b1).unique()) == 60  # no repeats
    assert len(stat_batches(x, 10, 30, 0)) == 4  # as many as fit
    with pytest.raises(ConfigError, match="must be positive integers, got 0 and 20"):
        stat_batches(x, 0, 20, 0)


def test_reset_bn_recomputes_running_stats_deterministically():
    model, sd_a, sd_b = endpoints(conv_bn)
    x = images(256, 0)
    mid = lerp_state(sd_a, sd_b, 0.5)
    batches = stat_batches(x, 4, 64, seed=0)
    reset = reset_bn_stats(model, mid, batches)
    # the first BatchNorm's running mean/var are now the statistics of its input on those batches
    with torch.no_grad():
        h = torch.nn.functional.conv2d(torch.cat(batches), mid["0.weight"], padding=1)
    assert torch.allclose(reset["1.running_mean"], h.mean((0, 2, 3)), atol=1e-5)
    batch_vars = torch.stack([h[i : i + 64].var((0, 2, 3), unbiased=True) for i in range(0, 256, 64)])
    assert torch.allclose(reset["1.running_var"], batch_vars.mean(0), rtol=1e-4)
    assert not torch.allclose(reset["1.running_mean"], mid["1.running_mean"], atol=1e-2)
    assert not torch.allclose(reset["4.running_var"], mid["4.running_var"], rtol=1e-2)
    # weights untouched, model untouched, deterministic for a seed, different for another
    assert torch.equal(reset["0.weight"], mid["0.weight"])
    assert torch.equal(model.state_dict()["1.running_mean"], sd_a["1.running_mean"])
    again = reset_bn_stats(model, mid, stat_batches(x, 4, 64, seed=0))
    assert torch.equal(again["4.running_mean"], reset["4.running_mean"])
    other = reset_bn_stats(model, mid, stat_batches(x, 4, 64, seed=1))
    assert not torch.equal(other["4.running_mean"], reset["4.running_mean"])


def channel_stats(model, params, x, names):
    out = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    model.eval()
    with torch.no_grad():
        torch.func.functional_call(model, params, (x,))
    for h in hooks:
        h.remove()
    dims = {n: [d for d in range(out[n].dim()) if d != 1] for n in names}
    return {n: (out[n].mean(dims[n]), out[n].std(dims[n], unbiased=False)) for n in names}


def vectors(n, seed):
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build,data", [(conv_bn, images), (mlp, vectors)])
def test_repair_matches_interpolated_channel_statistics(build, data):
    model, sd_a, sd_b = endpoints(build)
    batch = data(512, 0)
    repair = Repair(model, sd_a, sd_b, [batch])
    # targets: the BatchNorm layers (convs feed them), or the hidden linears; never the classifier
    assert repair.targets == (["1", "4"] if build is conv_bn else ["1", "3"])
    alpha = 0.4
    mid = lerp_state(sd_a, sd_b, alpha)
    goals = repair.goals(alpha)
    sa, sb = channel_stats(model, sd_a, batch, repair.targets), channel_stats(model, sd_b, batch, repair.targets)
    for n in repair.targets:  # goals are the α-interpolation of the endpoints' statistics
        assert torch.allclose(goals[n][0].float(), (1 - alpha) * sa[n][0] + alpha * sb[n][0], atol=1e-4)
        assert torch.allclose(goals[n][1].float(), (1 - alpha) * sa[n][1] + alpha * sb[n][1], rtol=1e-4)
    before = channel_stats(model, mid, batch, repair.targets)
    after = channel_stats(model, repair(alpha, mid), batch, repair.targets)
    assert any(not torch.allclose(before[n][1], goals[n][1].float(), rtol=0.05) for n in repair.targets)
    for n in repair.targets:
        assert torch.allclose(after[n][0], goals[n][0].float(), atol=1e-3), n
        assert torch.allclose(after[n][1], goals[n][1].float(), rtol=1e-3), n
    # statistics from several batches carry over to a held-out test batch: there the repaired network's
    # statistics match the interpolation of the endpoints' statistics on that batch
    repair4 = Repair(model, sd_a, sd_b, stat_batches(data(2048, 1), 4, 512, 0))
    test = data(2048, 2)
    held = channel_stats(model, repair4(alpha, mid), test, repair4.targets)
    ha, hb = channel_stats(model, sd_a, test, repair4.targets), channel_stats(model, sd_b, test, repair4.targets)
    for n in repair4.targets:
        g_mean, g_std = ((1 - alpha) * ha[n][i] + alpha * hb[n][i] for i in (0, 1))
        assert ((held[n][1] - g_std).abs() / g_std).max() < 0.1, n
        assert ((held[n][0] - g_mean).abs() / g_std).max() < 0.1, n


def test_repair_at_alpha_zero_keeps_model_a():
    model, sd_a, sd_b = endpoints(mlp)
    x = torch.randn(256, 10, generator=torch.Generator().manual_seed(0))
    repaired = Repair(model, sd_a, sd_b, [x])(0.0, lerp_state(sd_a, sd_b, 0.0))
    for k, v in sd_a.items():
        assert torch.allclose(repaired[k], v, atol=1e-4), k


def test_corrections_label_and_sweep_hook():
    model, sd_a, sd_b = endpoints(conv_bn)
    x, y = images(128, 0), torch.arange(128) % 4
    batches = stat_batches(x, 2, 64, 0)
    assert corrections(model, sd_a, sd_b, batches, False, False) == (None, "")
    correct, suffix = corrections(model, sd_a, sd_b, batches, True, True)
    assert suffix == "+reset_bn+repair"
    assert corrections(model, sd_a, sd_b, batches, True, False)[1] == "+reset_bn"
    rows = sweep(model, sd_a, sd_b, [0.0, 0.5, 1.0], {"test": (x, y)}, "naive" + suffix, correct=correct)
    plain = sweep(model, sd_a, sd_b, [0.0, 0.5, 1.0], {"test": (x, y)}, "naive")
    assert {r["method"] for r in rows} == {"naive+reset_bn+repair"}
    assert rows[1]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-3)


@pytest.mark.parametrize("norm", ["layernorm", "none", "batchnorm"])
def test_repair_on_resnet20(norm):
    from lmc.core.models import build_model

    build = lambda: build_model("resnet20", (3, 8, 8), 4, width=1, norm=norm, base_channels=2)
    model, sd_a, sd_b = seeded_init(build, 0), seeded_init(build, 0).state_dict(), seeded_init(build, 1).state_dict()
    batch = images(128, 0)
    repair = Repair(model, sd_a, sd_b, [batch])
    # 1 stem + 9 blocks × 2 + 2 shortcuts, the classifier excluded
    assert len(repair.targets) == 21 and "fc" not in repair.targets
    if norm == "none":
        assert "layer2.0.shortcut.0" in repair.targets
    else:
        assert "layer2.0.shortcut.1" in repair.targets and "layer1.0.norm2" in repair.targets
    mid = lerp_state(sd_a, sd_b, 0.5)
    after = channel_stats(model, repair(0.5, mid), batch, repair.targets)
    goals = repair.goals(0.5)
    for n in repair.targets:
        assert torch.allclose(after[n][0], goals[n][0].float(), atol=1e-3), n
        assert torch.allclose(after[n][1], goals[n][1].float(), rtol=1e-3, atol=1e-5), n

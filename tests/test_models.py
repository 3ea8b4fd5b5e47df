"""The model zoo: shapes, bad options, and permutation symmetry of every model at two widths."""

import copy

import pytest
import torch

from lmc.core.models import MODELS, build_model
from lmc.core.permutation import apply_permutation, invert_permutation, permutation_spec, random_permutation
from lmc.core.training import seeded_init
from lmc.errors import ConfigError

# (name, input shape, kwargs at two widths): tiny settings to keep the tests fast
ZOO = [
    ("mlp", (40,), [dict(width=8, depth=2), dict(width=24, depth=3)]),
    ("vgg", (3, 16, 16), [dict(depth=11, width=1, base_channels=4), dict(depth=16, width=2, base_channels=2)]),
    ("vgg", (3, 8, 8), [dict(depth=13, width=1, base_channels=2, norm="layernorm"),
                        dict(depth=11, width=2, base_channels=2, norm="none")]),
    ("resnet20", (3, 16, 16), [dict(width=1, base_channels=4), dict(width=2, base_channels=4)]),
    ("resnet20", (3, 8, 8), [dict(width=1, base_channels=4, norm="layernorm"),
                             dict(width=3, base_channels=2, norm="none")]),
    ("resnet18", (3, 16, 16), [dict(width=1, base_channels=4), dict(width=2, base_channels=2, norm="layernorm")]),
    ("cnn1d", (40,), [dict(width=8), dict(width=16, depth=2, norm="batchnorm")]),
    ("cnn1d", (1, 40), [dict(width=6, norm="layernorm"), dict(width=12, depth=4)]),
]
CASES = [pytest.param(name, shape, kw, id=f"{name}-{'x'.join(map(str, shape))}-{i}")
         for name, shape, kws in ZOO for i, kw in enumerate(kws)]


def trained_ish(name, shape, kw, seed=0):
    """The model with populated BatchNorm running statistics, in eval mode."""
    model = seeded_init(lambda: build_model(name, shape, 10, **kw), seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape) * 2 + 0.5)
    return model.eval()


def test_zoo_is_registered():
    assert {"mlp", "vgg", "resnet20", "cnn1d", "soft_trees"} <= set(MODELS)
    # the tree ensemble's symmetry is declared, not traced (tests/test_trees.py checks it)
    assert MODELS["soft_trees"]((8,), 3, trees=4).symmetry().invariances == ("perm", "flip")


@pytest.mark.parametrize("name,shape,kw", CASES)
def test_random_permutation_preserves_outputs(name, shape, kw):
    model = trained_ish(name, shape, kw)
    x = torch.randn(8, *shape)
    spec = permutation_spec(model, x[:2])
    assert spec.groups, "the spec found no permutation groups"
    perm = random_permutation(spec, 5)
    sd = model.state_dict()
    permuted_sd = apply_permutation(spec, perm, sd)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted_sd)
    moved = [k for k in sd if not torch.equal(sd[k], permuted_sd[k])]
    assert moved, "the permutation moved nothing"
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max().item() <= 1e-5
    back = apply_permutation(spec, invert_permutation(perm), permuted_sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_output_shapes():
    assert build_model("vgg", (3, 32, 32), 10, depth=11, base_channels=4)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet20", (3, 32, 32), 7, base_channels=2)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert build_model("cnn1d", (40,), 10)(torch.randn(2, 40)).shape == (2, 10)


def test_resnet20_structure():
    model = build_model("resnet20", (3, 32, 32), 10, width=2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks × 2, two shortcut convs
    assert model.fc.in_features == 64 * 2
    spec = permutation_spec(model, torch.randn(2, 3, 32, 32))
    # one residual-stream group per stage, plus one group inside each of the 9 blocks
    assert len(spec.groups) == 3 + 9
    assert spec.axes_to_perm["conv.weight"][0] == spec.axes_to_perm["layer1.2.conv2.weight"][0]


def test_resnet18_structure():
    """The CIFAR ResNet-18 of kuangliu/pytorch-cifar (the star-domain paper's): 11,173,962 parameters."""
    model = build_model("resnet18", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks × 2, three shortcut convs
    small = build_model("resnet18", (3, 32, 32), 10, base_channels=4)
    spec = permutation_spec(small, torch.randn(2, 3, 32, 32))
    # one residual-stream group per stage, plus one group inside each of the 8 blocks
    assert len(spec.groups) == 4 + 8
    assert spec.axes_to_perm["conv.weight"][0] == spec.axes_to_perm["layer1.1.conv2.weight"][0]


@pytest.mark.parametrize("name,kw,match", [
    ("vgg", dict(depth=12), r"'12'.*11, 13, 16"),
    ("vgg", dict(norm="groupnorm"), r"'groupnorm'.*batchnorm, layernorm, none"),
    ("resnet20", dict(width=33), r"1\.\.32.*33"),
    ("resnet20", dict(width=1.5), r"1\.5"),
    ("cnn1d", dict(norm="bn"), r"'bn'"),
    ("cnn1d", dict(kernel=3), r"kernel.*valid: width, depth, norm"),
])
def test_bad_options_raise_config_error(name, kw, match):
    shape = (40,) if name == "cnn1d" else (3, 16, 16)
    with pytest.raises(ConfigError, match=match):
        build_model(name, shape, 10, **kw)


def test_bad_input_shape_is_named():
    with pytest.raises(ConfigError, match=r"\(40,\)"):
        build_model("vgg", (40,), 10)

"""torchvision's classification models, at random initialisation on small inputs: every model of
``torchvision.models.list_models`` is either aligned (a random permutation preserves its outputs in evaluation
and in training mode, and weight matching of the permuted copy onto the original gives back the original
state dict exactly) or refused for the reason named here. The check itself is
``experiments/benchmarks/torchvision_specs.py``'s (which prints the same as a table, with timings)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

from lmc.core.permutation import apply_permutation, permutation_spec, random_permutation, weight_matching


def _load_benchmark():
    path = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "torchvision_specs.py"
    module_spec = importlib.util.spec_from_file_location("torchvision_specs", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


BENCH = _load_benchmark()

# why a model is refused: the operation the derivation names
REFUSED = {
    # channel shuffle: view (N, C, H, W) -> (N, 2, C/2, H, W), transpose, view back interleaves two groups' channels
    r"shufflenet_v2_.*": r"node 'view' \(call_method view\) reshapes permuted features \(2, \d+, 8, 8\) -> "
                         r"\(2, 2, \d+, 8, 8\) \(axis 1\) so that they no longer lie on one axis",
    # attention: a wrapped function taking the weights as arguments; v2 computes its position bias by another
    r"swin_[tsb]": r"node 'shifted_window_attention' \(call_function shifted_window_attention\) is an operation the "
                   r"derivation does not know",
    r"swin_v2_.*": r"node '_get_relative_position_bias' \(call_function _get_relative_position_bias\) is an "
                   r"operation the derivation does not know",
    # attention: the features are split into heads by a reshape
    r"maxvit_t": r"node 'reshape_\d+' \(call_method reshape\) reshapes permuted features \(2, 64, 49, 64\) -> "
                 r"\(2, 64, 49, 2, 32\)",
}
# the default run's representative set (about a minute); every other model runs under -m slow
DEFAULT = {"resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "squeezenet1_0",
           "regnet_x_400mf", "googlenet", "shufflenet_v2_x0_5", "swin_t"}
CHECKED_UP_TO = 250e6  # parameters; larger models (RegNetY-128GF, ViT-L/H) are derived on the meta device only


def expected_refusal(name: str) -> str | None:
    return next((why for pattern, why in REFUSED.items() if re.fullmatch(pattern, name)), None)


def test_the_list_is_torchvisions_and_every_refusal_is_accounted_for():
    assert len(BENCH.MODELS) >= 80 and {"resnet18", "convnext_tiny", "vit_b_16"} <= set(BENCH.MODELS)
    for pattern in REFUSED:
        assert any(re.fullmatch(pattern, name) for name in BENCH.MODELS), pattern


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow)
                                  for n in BENCH.MODELS])
def test_torchvision_model_is_aligned_or_refused_with_the_reason(name):
    row = BENCH.check(name, max_params=CHECKED_UP_TO, init="sequential")
    why = expected_refusal(name)
    if why is not None:
        assert row["status"] == "refused" and re.search(why, row["reason"]), row["reason"]
        return
    assert row["status"] == "aligned", row["reason"]
    assert row["groups"] > 0
    if row["params"] <= CHECKED_UP_TO:
        assert row["error"] <= 1e-5, row
        assert row["recovered"], row


def test_a_small_convnext_is_aligned():
    """ConvNeXt's blocks (depthwise conv, permute to channels-last, LayerNorm over the last axis, Linear, GELU,
    Linear, permute back, a layer-scale parameter, stochastic depth) and its downsampling (LayerNorm2d, a
    functional layer_norm over permuted axes) at small widths, with layer scales of 1 so that every block
    counts in the output."""
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)], stochastic_depth_prob=0.2,
                     layer_scale=1.0, num_classes=5)
    BENCH.randomize_constants(model)
    x = torch.randn(4, 3, 32, 32)
    spec = permutation_spec(model, x[:2])
    stage0 = spec.axes_to_perm["features.0.0.weight"][0]  # the stem writes the first stage's stream
    assert spec.axes_to_perm["features.1.0.layer_scale"] == (stage0, None, None)
    assert spec.axes_to_perm["features.1.0.block.3.weight"][1] == stage0  # Linear on channels-last features
    assert spec.axes_to_perm["features.2.0.weight"] == (stage0,)  # LayerNorm2d's weight, read directly
    permuted = BENCH.copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(spec, random_permutation(spec, 1), model.state_dict()))
    for training in (False, True):
        assert BENCH.output_error(model, permuted, x, training) <= 1e-5
    found = weight_matching(spec, BENCH.parameters(model), BENCH.parameters(permuted), init="sequential")
    back = apply_permutation(spec, found, permuted.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_benchmark_table_lists_status_and_timings():
    rows = [BENCH.check("squeezenet1_1", init="sequential"), BENCH.check("shufflenet_v2_x0_5")]
    table = BENCH.markdown(rows).splitlines()
    assert table[0].startswith("| model | status | parameters | groups | pieces | spec (s) |")
    assert table[2].startswith("| squeezenet1_1 | aligned | 0.7M | 25 | 16 |") and table[2].endswith("| yes |")
    assert table[3].startswith("| shufflenet_v2_x0_5 | refused: node 'view'") and table[3].endswith("| — |")


def test_a_small_vision_transformer_is_aligned():
    """ViT's class token and position embedding (parameters read directly, joined to the patch features),
    pre-norm encoder layers with nn.MultiheadAttention (channels permuted within heads) and MLPs, the class
    token's features to the head; at small widths."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
                              num_classes=5)
    BENCH.randomize_constants(model)
    x = torch.randn(4, 3, 16, 16)
    spec = permutation_spec(model, x[:2])
    stream = spec.axes_to_perm["conv_proj.weight"][0]
    assert spec.axes_to_perm["class_token"] == (None, None, stream)
    assert spec.axes_to_perm["encoder.pos_embedding"] == (None, None, stream)
    assert spec.axes_to_perm["heads.head.weight"] == (None, stream)
    assert sum(g.startswith("P_encoder.layers.encoder_layer_0.self_attention.") for g in spec.groups) == 4
    permuted = BENCH.copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(spec, random_permutation(spec, 1), model.state_dict()))
    for training in (False, True):
        assert BENCH.output_error(model, permuted, x, training) <= 1e-5
    found = weight_matching(spec, BENCH.parameters(model), BENCH.parameters(permuted), init="sequential")
    back = apply_permutation(spec, found, permuted.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_benchmark_script_prints_the_markdown_table():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "torchvision_specs.py"
    proc = subprocess.run([sys.executable, str(script), "--only", "squeezenet1_"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| squeezenet1_")]
    assert len(table) == 2 and all("| aligned |" in row and row.endswith("| yes |") for row in table)
    assert "2 of 2 aligned; 0 refused." in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--only", "nothing"], capture_output=True, text=True)
    assert bad.returncode == 2 and "matches no model" in bad.stderr

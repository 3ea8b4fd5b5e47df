"""Issue 15 §4: before any barrier, the aligned B must compute B's function; the figure is recorded, and a
wrong spec stops the run naming the groups involved."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.func import functional_call

from lmc.core.alignment import WeightMatching
from lmc.core.models import build_model
from lmc.core.permutation import PermutationSpec, permutation_spec, random_permutation
from lmc.core.permutation.declared import function_change
from lmc.errors import WrongSymmetry
from lmc.run import CONF_DIR, run
from lmc.stages.alignment import checked_permutation

TINY = ["model.width=16", "model.depth=2", "train.epochs=2", "interp.num_alphas=3", "progress=false", "logger=none",
        "interp.layerwise=false"]


def without_input_axis(spec: PermutationSpec, key: str) -> PermutationSpec:
    """``spec`` with ``key``'s input axis (axis 1) left unpermuted: the group feeding ``key`` is then wrong."""
    refs = {g: [r for r in rs if not (r.key == key and r.axis == 1)] for g, rs in spec.perm_to_axes.items()}
    axes = {**spec.axes_to_perm, key: (spec.axes_to_perm[key][0], None)}
    return PermutationSpec(refs, dict(spec.sizes), axes, spec.layers)


def mlp(batchnorm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), *( [nn.BatchNorm1d(8)] if batchnorm else []), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
              nn.Linear(5, 3)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_a_correct_spec_passes_and_a_wrong_one_names_its_group(batchnorm):
    model, x = mlp(batchnorm), torch.randn(64, 6)
    spec = permutation_spec(model, x[:2])
    perm = random_permutation(spec, 1)
    assert checked_permutation(spec, perm, model, x, "test") <= 1e-6
    victim = "3.weight" if batchnorm else "2.weight"  # the Linear after the first hidden group
    bad = without_input_axis(spec, victim)
    first = next(g for g in spec.groups if any(r.key == victim and r.axis == 1 for r in spec.perm_to_axes[g]))
    with pytest.raises(WrongSymmetry, match=rf"groups whose permutation alone changes it: {first};"):
        checked_permutation(bad, perm, model, x, "test")
    assert model.training  # the model's mode is restored


def test_function_change_sees_batch_statistics_in_train_mode():
    """Doubling BatchNorm's scale while quadrupling its running variance leaves evaluation mode's function
    unchanged but not training mode's (batch statistics): function_change reports the latter and leaves the
    state dicts as they were."""
    model, x = mlp(batchnorm=True), torch.randn(64, 6)
    eps = model[1].eps
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    other = {**sd, "1.weight": 2 * sd["1.weight"], "1.running_var": 4 * (sd["1.running_var"] + eps) - eps}
    with torch.no_grad():
        model.eval()
        assert (functional_call(model, sd, (x,)) - functional_call(model, other, (x,))).abs().max() < 1e-5
        model.train()
    assert function_change(model, sd, other, x) > 0.1  # training mode sees it
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    assert torch.equal(other["1.running_mean"], sd["1.running_mean"])  # no statistics update leaked


def test_weight_matching_records_every_restart(mnist1d):
    torch.manual_seed(0)
    a = build_model("mlp", (40,), 10, width=32, depth=2)
    b = build_model("mlp", (40,), 10, width=32, depth=2)
    spec = permutation_spec(a, torch.zeros(2, 40))
    runs = WeightMatching(restarts=4).runs(spec, a, b)
    assert len(runs.objectives) == 4 and len(set(runs.seeds)) == 4
    assert runs.objective == max(runs.objectives)
    single = WeightMatching(restarts=1)(spec, a, b)
    assert WeightMatching(restarts=4).runs(spec, a, b).objectives[0] == pytest.approx(
        WeightMatching(restarts=1).runs(spec, a, b).objectives[0])  # run 0 is the plain call
    assert all(torch.equal(single[g], WeightMatching(restarts=1)(spec, a, b)[g]) for g in single)


def _cfg(tmp_path, data_root, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, f"data.root={data_root}",
                                                        f"store.root={tmp_path / 'store'}", *extra])


def test_the_pair_run_records_the_check_and_stops_on_a_wrong_spec(tmp_path, data_root, monkeypatch):
    cfg = _cfg(tmp_path, data_root, "align.restarts=2")
    results = run(cfg, tmp_path / "run")
    diag = results["diagnostics"]["weight_matching"]
    assert 0 <= diag["output_difference"] <= 1e-5
    assert len(diag["restarts"]["objectives"]) == 2 and diag["restarts"]["kept"] in (0, 1)

    import lmc.studies.pair as pair

    traced = pair.symmetry_of
    monkeypatch.setattr(pair, "symmetry_of", lambda model, x: without_input_axis(traced(model, x), "fc2.weight"))
    with pytest.raises(WrongSymmetry, match=r"weight_matching's permutation changed the function .* groups whose "
                                            r"permutation alone changes it: \S+"):
        run(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad" / "curves.csv").exists() and not (tmp_path / "bad" / "results.json").exists()

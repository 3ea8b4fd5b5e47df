"""Studies as runners, settings checked once, your own model and data from the command line (issue 14)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import lmc_run

from lmc.config import group_options, settings_from_config
from lmc.errors import ConfigError
from lmc.run import CONF_DIR, run
from lmc.settings import Min, coerce, locate, parse, source_fingerprint
from lmc.studies import STUDIES, load_study

QUICK = ["train.epochs=2", "interp.num_alphas=3", "progress=false", "logger=none"]

USER_MODEL = '''
from torch import nn


class MyNet(nn.Module):
    """A user's own model: a gated MLP (input_shape and num_classes come from the data)."""

    def __init__(self, input_shape, num_classes, width: int = 24, depth: int = 2):
        super().__init__()
        features = 1
        for d in input_shape:
            features *= d
        layers, last = [nn.Flatten()], features
        for _ in range(depth):
            layers += [nn.Linear(last, width), nn.Tanh()]
            last = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
'''


def write_package(root: Path, name: str, source: str = USER_MODEL) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "nets.py").write_text(textwrap.dedent(source))


def write_tensors(path: Path, seed: int = 0, n: int = 300, features: int = 6, classes: int = 3) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, features)) * 3
    y = rng.integers(0, classes, size=n + 100)
    x = (centres[y] + rng.normal(size=(n + 100, features))).astype(np.float32)
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# ------------------------------------------------------------------------------------ your own model

@pytest.fixture(scope="module")
def user_model_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("usermodel")
    write_package(tmp, "mypkg")
    store = tmp / "store"
    proc = lmc_run(["model._target_=mypkg.nets.MyNet", "model.depth=3", *QUICK, f"store.root={store}",
                    f"hydra.run.dir={tmp / 'out'}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, store, results_of(tmp / "out")


def test_own_model_runs_end_to_end(user_model_run):
    tmp, store, results = user_model_run
    assert results["study"] == "pair"
    model = json.loads((store / "models" / results["store"]["hashes"]["a"] / "meta.json").read_text())["settings"]
    assert model["model"]["target"] == "mypkg.nets.MyNet"
    assert model["model"]["options"] == {"depth": 3}  # the default mlp's width=512 was not passed on
    assert len(model["model"]["source"]) == 16
    # three hidden Linear layers of the user's class, aligned by weight matching
    assert set(results["layerwise"]["weight_matching"]) == {"body.1", "body.3", "body.5", "head"}
    wm, naive = results["barriers"]["weight_matching"]["train"], results["barriers"]["naive"]["train"]
    assert results["diagnostics"]["weight_matching"]["objective_after"] > \
        results["diagnostics"]["weight_matching"]["objective_before"]
    assert wm["loss"] <= naive["loss"] + 1e-6


def test_own_model_through_every_alignment_method_and_the_store(user_model_run, data_root, monkeypatch):
    tmp, store, first = user_model_run
    monkeypatch.chdir(tmp)
    monkeypatch.syspath_prepend(str(tmp))
    for method, extra in (("activation_matching", ["align.num_batches=2"]), ("ste", ["align.steps=3"]),
                          ("sinkhorn", ["align.steps=3"]), ("none", [])):
        overrides = ["model._target_=mypkg.nets.MyNet", "model.depth=3", *QUICK, f"store.root={store}",
                     f"data.root={data_root}", f"align={method}", *extra]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        results = run(cfg, tmp / method, overrides)
        assert results["reused"]["a"] and results["reused"]["b"], method  # the models come from the store
        assert results["store"]["hashes"]["a"] == first["store"]["hashes"]["a"]
        assert set(results["barriers"]) == {"naive"} | ({method} - {"none"})


def test_own_model_source_change_gives_a_new_store_key(user_model_run, data_root):
    tmp, store, first = user_model_run
    edited = tmp / "edited"
    edited.mkdir()
    write_package(edited, "mypkg", USER_MODEL.replace("nn.Tanh()", "nn.ReLU()"))
    proc = lmc_run(["model._target_=mypkg.nets.MyNet", "model.depth=3", *QUICK, f"store.root={store}",
                    f"hydra.run.dir={edited / 'out'}"], edited, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = results_of(edited / "out")
    assert again["store"]["hashes"]["a"] != first["store"]["hashes"]["a"]
    assert not again["reused"]["a"] and not again["reused"]["b"]


def test_model_class_swap_keeps_explicit_zoo_keys_an_error(tmp_path, data_root):
    write_package(tmp_path, "swappkg", USER_MODEL.replace("width: int = 24, depth: int = 2", "depth: int = 2"))
    proc = lmc_run(["model._target_=swappkg.nets.MyNet", "model.width=64", *QUICK, f"store.root={tmp_path / 's'}",
                    f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown key model.width for model swappkg.nets.MyNet; valid: depth" in proc.stderr
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------- your own data

def test_tensors_from_an_npz_file_and_a_new_key_when_it_changes(tmp_path, data_root):
    write_tensors(tmp_path / "my_data.npz")
    args = ["data=tensors", "data.path=my_data.npz", "model.width=16", "model.depth=1", *QUICK, "train.epochs=10",
            "train.lr=0.01", f"store.root={tmp_path / 'store'}"]
    proc = lmc_run([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = results_of(tmp_path / "one")
    assert one["config"]["data"]["path"] == "my_data.npz"
    assert one["endpoints"]["a"]["test"]["acc"] > 0.8  # three well-separated Gaussian classes
    stored = json.loads((tmp_path / "store" / "models" / one["store"]["hashes"]["a"] / "meta.json").read_text())
    assert len(stored["settings"]["data"]["fingerprint"]) == 16
    # the same file again: everything from the store
    proc = lmc_run([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, data_root)
    assert proc.returncode == 0 and results_of(tmp_path / "two")["reused"]["a"]
    # replaced data under the same name: new keys, never a mix of old and new
    write_tensors(tmp_path / "my_data.npz", seed=1)
    proc = lmc_run([*args, f"hydra.run.dir={tmp_path / 'three'}"], tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    three = results_of(tmp_path / "three")
    assert three["store"]["hashes"]["a"] != one["store"]["hashes"]["a"] and not three["reused"]["a"]


def test_tensors_from_a_pt_file_and_a_user_loader(tmp_path, monkeypatch):
    from lmc.core.data import load_dataset

    g = torch.Generator().manual_seed(0)
    arrays = {"x_train": torch.randn(20, 2, 5, generator=g), "y_train": torch.arange(20) % 4,
              "x_test": torch.randn(8, 2, 5, generator=g), "y_test": torch.arange(8) % 4}
    torch.save(arrays, tmp_path / "d.pt")
    data = load_dataset("tensors", path=str(tmp_path / "d.pt"))
    assert data.num_classes == 4 and data.input_shape == (2, 5) and torch.equal(data.x_train, arrays["x_train"])
    (tmp_path / "myloader.py").write_text(textwrap.dedent('''
        import numpy as np

        def blobs(n: int = 40, seed: int = 0):
            rng = np.random.default_rng(seed)
            y = rng.integers(0, 2, size=n)
            x = rng.normal(size=(n, 3)) + y[:, None]
            return {"x_train": x, "y_train": y, "x_test": x[:10], "y_test": y[:10]}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    a = load_dataset(locate("myloader.blobs", "data._target_"), n=40)
    b = load_dataset(locate("myloader.blobs", "data._target_"), n=40, seed=1)
    assert a.num_classes == 2 and len(a.y_train) == 40
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 16


def test_data_fingerprint_is_part_of_every_models_identity(tmp_path, data_root):
    from lmc.stages.settings import parse_data

    settings = parse_data({"name": "mnist1d", "root": str(data_root), "download": False, "_target_": None})
    data = settings.load()
    identity = settings.identity(data.fingerprint)
    assert identity["fingerprint"] == data.fingerprint and "root" not in identity
    with pytest.raises(ConfigError, match=r"data=tensors needs data.path"):
        parse_data({"name": "tensors", "path": None})


@pytest.mark.parametrize("content,message", [
    ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 2))}, "gave no y_test"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(2, int)}, "x_train has 4 examples but y_train has shape (3,)"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.full(4, 0.5), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(2, int)}, "y_train must hold integer labels 0..C-1"),
])
def test_bad_tensor_files_are_one_line(tmp_path, content, message):
    from lmc.core.data import load_dataset

    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(ConfigError) as info:
        load_dataset("tensors", path=str(tmp_path / "bad.npz"))
    assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- settings checked once

BAD_VALUES = [
    ("model.width=abc", "model.width must be an integer, got 'abc'"),
    ("model.width=1.5", "model.width must be an integer, got 1.5"),
    ("train.lr=fast", "train.lr must be a positive number, got 'fast'"),
    ("train.epochs=1.5", "train.epochs must be a positive integer, got 1.5"),
    ("interp.num_alphas=abc", "interp.num_alphas must be an integer, got 'abc'"),
    ("seeds=[-1,2]", "seeds must be non-negative integers (they seed numpy too), got [-1, 2]"),
    ("+model.dropout=0.5", "unknown key model.dropout for model mlp; valid: width, depth"),
    ("+model._targt_=mypkg.Net", "unknown key model._targt_ for model mlp; valid: width, depth"),
    ("model._target_=nopkg.nets.MyNte", "cannot import model._target_=nopkg.nets.MyNte: no module 'nopkg'"),
    ("+modle.width=4", "unknown key modle; valid top-level keys:"),
    ("+train.foo=1", "unknown key train.foo; valid: batch_size, bf16,"),
    ("+align.foo=1", "unknown key align.foo for align.method=weight_matching; valid: _target_, init, max_iter, merge,"),
    ("+data.foo=1", "unknown key data.foo for dataset 'mnist1d'; valid:"),
    ("+study.foo=1", "unknown key study.foo for study pair; valid: _target_, name"),
    ("+interp.foo=1", "unknown key interp.foo; valid: eval_batch_size,"),
    ("train.optimizer=adagrad", "unknown train.optimizer 'adagrad'; valid: adam, adamw, sgd"),
    ("store.on_corrupt=ignore", "unknown store.on_corrupt 'ignore'; valid: error, retrain"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_value_is_one_line_before_anything_is_stored(override, message):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override])
    with pytest.raises(ConfigError) as info:
        settings = settings_from_config(cfg, [override])
        study, options = load_study(settings.study)
        study.check(settings, options)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,message", [BAD_VALUES[i] for i in (0, 2, 3, 5, 6, 8, 9)])
def test_bad_value_from_the_command_line(override, message, tmp_path, data_root):
    store = tmp_path / "store"
    proc = lmc_run([override, "progress=false", "logger=none", f"store.root={store}",
                    f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, data_root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not store.exists()  # nothing in the store: no folder, no lock file


def test_dropout_guard_of_concurrent_pair_on_the_command_line(tmp_path, data_root):
    write_package(tmp_path, "droppkg", USER_MODEL.replace("nn.Tanh()", "nn.Tanh(), nn.Dropout(0.2)"))
    proc = lmc_run(["model._target_=droppkg.nets.MyNet", "train.concurrent_pair=true", *QUICK,
                    f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.concurrent_pair=true cannot train model droppkg.nets.MyNet: its module body.3 (Dropout, p=0.2)" \
        in proc.stderr
    assert not list((tmp_path / "store").glob("models/*"))


# ------------------------------------------------------------------------------------------ studies

@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "study").glob("*.yaml")))
def test_every_study_config_composes_and_loads(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"study={name}"])
    settings = settings_from_config(cfg)
    study, options = load_study(settings.study)
    assert study.name == name and name in STUDIES
    first = (Path(CONF_DIR) / "study" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# python -m lmc.run") and f"study={name}" in first
    assert (Path(CONF_DIR).parent / "experiments" / name / "README.md").is_file()


def test_every_registered_study_has_a_config_and_help_lists_them(tmp_path, data_root):
    assert sorted(STUDIES) == group_options("study")
    proc = lmc_run(["--help"], tmp_path, data_root)
    assert proc.returncode == 0
    for name in STUDIES:
        assert f"study={name}" in proc.stdout
    assert "model: cnn1d, mlp, resnet18, resnet20, soft_trees, vgg" in proc.stdout and "_defaults" not in proc.stdout


def test_unknown_study_is_one_line(tmp_path, data_root):
    proc = lmc_run(["study=nope"], tmp_path, data_root)
    assert proc.returncode == 2 and "error: unknown study 'nope'; valid: " in proc.stderr


# ----------------------------------------------------------------------------- the settings machinery

def test_coerce_and_parse_name_the_key_and_what_is_valid():
    from dataclasses import dataclass, field
    from typing import Annotated, Literal

    @dataclass
    class S:
        n: Annotated[int, Min(0, strict=True)] = 1
        x: float = 0.5
        kind: Literal["a", "b"] = "a"
        items: list[int] = field(default_factory=list)
        maybe: int | None = None

    assert parse(S, {"n": 3, "x": 2, "items": (1, 2)}, "s") == S(3, 2.0, "a", [1, 2], None)
    for values, message in (({"n": 0}, "s.n must be a positive integer, got 0"),
                            ({"n": True}, "s.n must be a positive integer, got True"),
                            ({"x": "1"}, "s.x must be a number, got '1'"),
                            ({"kind": "c"}, "unknown s.kind 'c'; valid: a, b"),
                            ({"items": [1, "2"]}, "s.items[1] must be an integer, got '2'"),
                            ({"maybe": 1.5}, "s.maybe must be an integer, got 1.5"),
                            ({"other": 1}, "unknown key s.other; valid: items, kind, maybe, n, x")):
        with pytest.raises(ConfigError) as info:
            parse(S, values, "s")
        assert str(info.value) == message
    assert coerce(None, int | None, "k") is None


def test_source_fingerprint_follows_the_module_file(tmp_path, monkeypatch):
    write_package(tmp_path, "fppkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = locate("fppkg.nets.MyNet", "model._target_")
    assert source_fingerprint(cls) == source_fingerprint(cls)
    before = source_fingerprint(cls)
    (tmp_path / "fppkg" / "nets.py").write_text(USER_MODEL + "\n# edited\n")
    assert source_fingerprint(cls) != before


def test_method_defaults_agree_with_the_functions_they_call():
    """A method dataclass's defaults are the CLI's; the library functions keep their own keyword defaults.
    Where both exist they must be the same number."""
    import inspect
    from dataclasses import fields

    from lmc.core import alignment
    from lmc.core.permutation import activation_matching, sinkhorn_rebasin, ste, weight_matching

    calls = {alignment.WeightMatching: weight_matching, alignment.ActivationMatching: activation_matching,
             alignment.STE: ste, alignment.Sinkhorn: sinkhorn_rebasin}
    renamed = {"max_iter": "wm_max_iter"}  # STE passes its max_iter to weight matching's projection
    # deliberately different: the CLI starts weight matching sequentially (README: weight matching's start);
    # lmc.weight_matching keeps Git Re-Basin's published algorithm (the identity start) as its default
    deliberate = {(alignment.WeightMatching, "init"): ("sequential", "identity")}
    checked = 0
    for cls, fn in calls.items():
        params = inspect.signature(fn).parameters
        for f in fields(cls):
            name = f.name if f.name in params else renamed.get(f.name)
            if (cls, f.name) in deliberate:
                assert (f.default, params[name].default) == deliberate[cls, f.name]
                continue
            if name in params and params[name].default is not inspect.Parameter.empty:
                assert params[name].default == f.default, (cls.__name__, f.name)
                checked += 1
    assert checked >= 12


def test_a_run_failing_before_its_first_entry_leaves_no_store(tmp_path, data_root):
    store = tmp_path / "deep" / "store"
    proc = lmc_run(["model=vgg", *QUICK, f"store.root={store}", f"hydra.run.dir={tmp_path / 'o'}"], tmp_path,
                   data_root)
    assert proc.returncode == 2 and "vgg needs image inputs (C, H, W) with H, W ≥ 8, got input shape (40,)" \
        in proc.stderr
    assert not (tmp_path / "deep").exists()

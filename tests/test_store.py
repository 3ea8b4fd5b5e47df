"""The run store: identity by hash, reuse instead of retraining, spawning, kept checkpoints, faults."""

import json
import time

import pytest
import torch
from fake_datasets import tiny_data
from test_cli import TINY, lmc_run

from lmc.core.models import build_model
from lmc.core.training import TrainConfig
from lmc.errors import ConfigError, CorruptCheckpoint, StoreError
from lmc.io import CheckpointDir, load_verified
from lmc.stages.endpoints import model_settings, trained_model
from lmc.stages.store import Store, settings_hash

QUICK = [*TINY, "interp.layerwise=false", "logger=none"]


def store_data():
    return tiny_data(200, n_test=50, features=1)


def build():
    return build_model("mlp", (8,), 2, width=8, depth=1)


def settings(init=0, data=0, aug=0, epochs=2, spawn=None, **train):
    return model_settings({"name": "tiny", "root": "/somewhere"}, {"name": "mlp", "width": 8, "depth": 1},
                          {"epochs": epochs, "batch_size": 50, "lr": 0.01, "checkpoint_every": 1, **train},
                          init, data, aug, spawn)


def test_hash_covers_exactly_the_weight_settings():
    base = settings_hash(settings())
    assert len(base) == 16 and base == settings_hash(settings())
    # where the data lives and checkpoint bookkeeping do not change the model
    moved = model_settings({"name": "tiny", "root": "/elsewhere", "download": True},
                           {"name": "mlp", "width": 8, "depth": 1},
                           {"epochs": 2, "batch_size": 50, "lr": 0.01, "checkpoint_every": 5,
                            "keep_checkpoints": [1]}, 0, 0, 0)
    assert settings_hash(moved) == base
    assert settings_hash(settings(warmup_epochs=0)) == settings_hash(settings(warmup_epochs=0.0))
    # every seed, the recipe and the spawn point do
    others = [settings(init=1), settings(data=1), settings(aug=1), settings(epochs=3),
              settings(spawn={"step": 4, "parent": "abc"})]
    assert len({base, *map(settings_hash, others)}) == 6


def test_store_trains_once_then_loads_bitwise(tmp_path):
    store, data, cfg = Store(tmp_path), store_data(), TrainConfig(epochs=2, batch_size=50, lr=0.01)
    first = trained_model(store, settings(), build, data, cfg, progress=False)
    assert not first.reused and (first.path / "meta.json").is_file()
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["hash"] == first.hash == settings_hash(settings()) and meta["settings"]["seeds"]["init"] == 0
    assert first.path == tmp_path / "models" / first.hash
    second = trained_model(store, settings(), build, data, cfg, progress=False)
    assert second.reused and second.history == first.history
    assert all(torch.equal(p, q) for p, q in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values()))


def test_spawned_children_share_the_parent(tmp_path):
    store, data, cfg = Store(tmp_path), store_data(), TrainConfig(epochs=2, batch_size=50, lr=0.05)
    parent = trained_model(store, settings(spawn={"stop_step": 3}), build, data, cfg, progress=False, stop_step=3)
    assert parent.final_state["step"] == 3
    kids = [trained_model(store, settings(data=s, aug=s, spawn={"step": 3, "parent": parent.hash}), build, data, cfg,
                                progress=False, start=parent.final_state) for s in (0, 1)]
    assert kids[0].hash != kids[1].hash
    assert not torch.equal(kids[0].model.fc1.weight, kids[1].model.fc1.weight)
    # spawned at the very end: nothing left to train, both children are the parent
    end = trained_model(store, settings(spawn={"stop_step": 8}), build, data, cfg, progress=False, stop_step=8)
    kids = [trained_model(store, settings(data=s, spawn={"step": 8, "parent": end.hash}), build, data, cfg,
                                progress=False, start=end.final_state) for s in (0, 1)]
    for k in kids:
        assert all(torch.equal(p, q) for p, q in zip(k.model.state_dict().values(), end.model.state_dict().values()))
    # a reloaded parent still carries the state its children start from
    again = trained_model(store, settings(spawn={"stop_step": 3}), build, data, cfg, progress=False, stop_step=3)
    assert again.reused and again.final_state["step"] == 3


def test_kept_checkpoints_stay_and_load(tmp_path):
    store, data = Store(tmp_path), store_data()
    cfg = TrainConfig(epochs=3, batch_size=50, lr=0.01, keep_checkpoints=[1, "6st"])
    stored = trained_model(store, settings(epochs=3), build, data, cfg, progress=False)
    kept = CheckpointDir(stored.path / "checkpoints").kept()
    assert sorted(kept) == [4, 6]  # 4 steps per epoch: end of epoch 1 and step 6
    for step, (path, sha) in kept.items():
        assert load_verified(path, sha)["step"] == step
    # only kept files remain once the model is stored
    assert sorted(p.name for p in (stored.path / "checkpoints").glob("*.pt")) == ["step_00000004.pt",
                                                                                 "step_00000006.pt"]
    with pytest.raises(ConfigError, match="bad train.keep_checkpoints entry 'x'"):
        TrainConfig(keep_checkpoints=["x"])


def test_corrupted_model_is_reported_then_retrained_on_request(tmp_path):
    data, cfg = store_data(), TrainConfig(epochs=1, batch_size=50, lr=0.01)
    first = trained_model(Store(tmp_path), settings(epochs=1), build, data, cfg, progress=False)
    model_pt = first.path / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:100])  # truncated
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint {model_pt} is corrupted or truncated.*on_corrupt=retrain"):
        trained_model(Store(tmp_path), settings(epochs=1), build, data, cfg, progress=False)
    with pytest.warns(UserWarning, match="retraining"):
        again = trained_model(Store(tmp_path, on_corrupt="retrain"), settings(epochs=1), build, data, cfg,
                                                                    progress=False)
    assert not again.reused
    assert torch.equal(again.model.fc1.weight, first.model.fc1.weight)  # same settings, same weights
    assert len(list((tmp_path / "models").glob(f"{first.hash}.corrupt-*"))) == 1  # the broken one set aside
    with pytest.raises(ConfigError, match="unknown store.on_corrupt 'ignore'; valid: error, retrain"):
        Store(tmp_path, on_corrupt="ignore")


def test_unwritable_store_root_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=f"store.root '{blocker / 'store'}' is not writable"):
        Store(blocker / "store").check_writable()


def test_second_run_reuses_stored_models(tmp_path, data_root):
    args = [*QUICK, f"store.root={tmp_path / 'store'}"]
    t0 = time.perf_counter()
    first = lmc_run([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, data_root)
    t1 = time.perf_counter()
    second = lmc_run([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, data_root)
    t2 = time.perf_counter()
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert not any(one["reused"].values())
    assert all(two["reused"].values()) and set(two["reused"]) == {"a", "b", "align", "curves/naive",
                                                                  "curves/weight_matching"}
    assert two["timings"]["train"] < 0.1 < one["timings"]["train"]
    assert two["store"]["hashes"] == one["store"]["hashes"]
    assert two["endpoints"] == one["endpoints"] and two["barriers"] == one["barriers"]
    print(f"first run {t1 - t0:.1f} s (train {one['timings']['train']:.2f} s), "
          f"second run {t2 - t1:.1f} s (train {two['timings']['train']:.3f} s)")
    # another analysis of the same pair: models reused, the naive curves too; only the new part runs
    three = lmc_run([*args, "align=none", "interp.num_alphas=5", f"hydra.run.dir={tmp_path / 'three'}"],
                    tmp_path, data_root)
    assert three.returncode == 0, three.stderr[-2000:]
    r3 = json.loads((tmp_path / "three" / "results.json").read_text())
    assert r3["reused"] == {"a": True, "b": True, "curves/naive": True}
    # the run directory links the stored models
    link = tmp_path / "two" / "checkpoints" / "model_a.pt"
    assert link.resolve() == (tmp_path / "store" / "models" / one["store"]["hashes"]["a"] / "model.pt").resolve()


def test_spawn_run_from_the_command_line(tmp_path, data_root):
    proc = lmc_run([*QUICK, "spawn.step=40", f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'o'}"],
                   tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    hashes = r["store"]["hashes"]
    assert len({hashes["a"], hashes["b"], hashes["parent"]}) == 3
    meta = {t: json.loads((tmp_path / "store" / "models" / hashes[t] / "meta.json").read_text())["settings"]
            for t in ("a", "b", "parent")}
    assert meta["parent"]["spawn"] == {"stop_step": 40} and meta["parent"]["seeds"] == {"init": 0, "data": 0, "aug": 0}
    assert meta["a"]["spawn"] == {"step": 40, "parent": hashes["parent"]}
    assert meta["a"]["seeds"]["init"] == meta["b"]["seeds"]["init"] == 0
    assert (meta["a"]["seeds"]["data"], meta["b"]["seeds"]["data"]) == (0, 1)
    bad = lmc_run([*QUICK, "spawn.step=100000", f"store.root={tmp_path / 'store'}"], tmp_path, data_root)
    assert bad.returncode == 2 and "spawn.step must be an integer step in [0, 64]" in bad.stderr


def test_kept_states_replay_a_stored_models_training_once(tmp_path):
    from lmc.core.training import train
    from lmc.stages.endpoints import kept_states

    store, data, cfg = Store(tmp_path), store_data(), TrainConfig(epochs=3, batch_size=50, lr=0.01)
    stored = trained_model(store, settings(epochs=3), build, data, cfg, progress=False)
    assert not CheckpointDir(stored.path / "checkpoints").kept()  # trained without kept checkpoints
    calls = []

    def counting_fit(*args, **kwargs):
        calls.append(1)
        return train(*args, **kwargs)

    states = kept_states(store, stored, settings(epochs=3), build, data, cfg, [1, "3ep"], fit=counting_fit)
    assert sorted(states) == [4, 12] and len(calls) == 1  # 4 steps per epoch
    assert all(torch.equal(states[12]["model"][k], v) for k, v in stored.model.state_dict().items())
    again = kept_states(store, stored, settings(epochs=3), build, data, cfg, [1], fit=counting_fit)
    assert len(calls) == 1 and torch.equal(again[4]["model"]["fc1.weight"], states[4]["model"]["fc1.weight"])
    assert not (stored.path / "replay").exists()
    # a stored model that replaying does not reproduce (trained elsewhere) is refused, not mixed
    other = trained_model(Store(tmp_path / "o"), settings(epochs=3), build, data, cfg, progress=False)
    with torch.no_grad():
        other.model.fc1.weight.add_(1e-3)
    with pytest.raises(StoreError, match="does not reproduce its weights"):
        kept_states(Store(tmp_path / "o"), other, settings(epochs=3), build, data, cfg, [2])
    assert not CheckpointDir(other.path / "checkpoints").kept()

"""The default experiment, in-process, meets the numbers the README states."""

from hydra import compose, initialize_config_dir

from lmc.run import CONF_DIR, run


def test_default_run_trains_well_and_weight_matching_halves_the_barrier(tmp_path, data_root):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "progress=false", f"data.root={data_root}"])
    results = run(cfg, tmp_path)
    for tag in ("a", "b"):
        assert results["endpoints"][tag]["test"]["acc"] >= 0.62
        assert results["endpoints"][tag]["train"]["acc"] >= 0.95
    naive = results["barriers"]["naive"]["test"]["loss"]
    wm = results["barriers"]["weight_matching"]["test"]["loss"]
    assert naive > 0.5
    assert wm <= 0.5 * naive
    assert results["barriers"]["weight_matching"]["test"]["error"] < results["barriers"]["naive"]["test"]["error"]
    # layer-wise: aligned barriers are below naive ones for every layer
    lw = results["layerwise"]
    for layer in lw["naive"]:
        assert lw["weight_matching"][layer]["test"]["loss"] < lw["naive"][layer]["test"]["loss"], layer

"""Faults end cleanly (issue 15 §5): each ends in one line and a non-zero exit, and nothing already
computed is lost or changed — truncated result files, an output folder that cannot be written, a disk
that fills up during a write, a crash while a model is built, a job killed at any moment."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_cli import lmc_run

from lmc.run import CONF_DIR, run

TINY = ["model.width=16", "model.depth=2", "train.epochs=2", "interp.num_alphas=5", "progress=false", "logger=none"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (the store must come out of a fault unchanged)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(proc, code: int, message: str) -> None:
    assert proc.returncode == code, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("faults")
    proc = lmc_run([*TINY, f"store.root={tmp / 'store'}", f"hydra.run.dir={tmp / 'run'}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp


@pytest.mark.parametrize("name,keep,message", [
    ("results.json", 0.5, "results.json is truncated or corrupted (JSONDecodeError"),
    ("curves.csv", 0.5, "curves.csv is truncated or corrupted (line "),
    ("curves.csv", 0.0, "curves.csv is truncated or corrupted (its header lacks"),
    ("results.json", 0.0, "results.json is truncated or corrupted"),
])
def test_figures_on_a_truncated_file_is_one_line(finished, tmp_path, name, keep, message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir)
    data = (run_dir / name).read_bytes()
    (run_dir / name).write_bytes(data[: int(len(data) * keep)])
    before = snapshot(run_dir)
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir)], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    one_line(proc, 2, message)
    assert str(run_dir / name) in proc.stderr
    assert snapshot(run_dir) == before  # the figures already there are left as they were


def test_unwritable_output_folder_is_one_line(finished, tmp_path, data_root):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    before = snapshot(finished / "store")
    proc = lmc_run([*TINY, f"store.root={finished / 'store'}", f"hydra.run.dir={blocker / 'out'}"], tmp_path,
                   data_root)
    one_line(proc, 1, f"error: cannot create the output folder {blocker / 'out'} (hydra.run.dir): {blocker} is not "
                      "a directory")
    sweep = lmc_run(["-m", *TINY, f"store.root={finished / 'store'}", f"hydra.sweep.dir={blocker / 'sweep'}"],
                    tmp_path, data_root)
    one_line(sweep, 1, "(hydra.sweep.dir)")
    assert snapshot(finished / "store") == before


FULL_DISK = """
import errno, os, sys
real, victim = os.fsync, sys.argv[1]
def fsync(fd):
    if victim in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd)
os.fsync = fsync
sys.argv = ["lmc.run", *sys.argv[2:]]
from lmc.run import cli
cli()
"""


@pytest.mark.parametrize("victim", ["results.json.tmp", "curves.csv.tmp", "perm.pt.tmp", "model.pt.tmp"])
def test_a_disk_filling_up_during_a_write_keeps_the_old_files(finished, tmp_path, data_root, victim):
    """The file being written when the disk fills (simulated: fsync fails with ENOSPC on it) is not
    replaced: the run stops with one line naming it, the run directory and the store keep their files."""
    store, run_dir = tmp_path / "store", tmp_path / "run"
    shutil.copytree(finished / "store", store)
    shutil.copytree(finished / "run", run_dir)
    if victim in ("perm.pt.tmp", "model.pt.tmp"):  # force a fresh alignment / model to be written
        extra = ["align.max_iter=7"] if victim == "perm.pt.tmp" else ["seeds=[5,6]"]
    else:
        extra = []
    store_before, run_before = snapshot(store), snapshot(run_dir)
    env = {**os.environ, "WANDB_MODE": "disabled", "DATA_DIR": str(data_root)}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, victim, *TINY, *extra, f"store.root={store}",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    one_line(proc, 1, "(No space left on device); the previous file, if any, is unchanged")
    assert victim.removesuffix(".tmp") in proc.stderr
    after = snapshot(store)
    assert {k: v for k, v in after.items() if k in store_before} == store_before  # nothing changed
    assert not [p for p in after if ".tmp" in p.name]
    if victim in ("results.json.tmp", "curves.csv.tmp"):
        assert snapshot(run_dir)[Path(victim.removesuffix(".tmp"))] == run_before[Path(victim.removesuffix(".tmp"))]


def test_a_crash_while_building_or_seeding_a_model_leaves_no_trace(tmp_path, data_root, monkeypatch):
    import lmc.stages.endpoints as endpoints

    def broken(build, seed):
        raise RuntimeError("CUDA error: out of memory")  # as a model too large for the device would

    monkeypatch.setattr(endpoints, "seeded_init", broken)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"data.root={data_root}",
                                                       f"store.root={tmp_path / 'store'}"])
    with pytest.raises(RuntimeError, match="out of memory"):
        run(cfg, tmp_path / "run")
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]  # no model folder, no lock file
    assert not list((tmp_path / "store" / "models").glob("*"))
    monkeypatch.undo()
    results = run(cfg, tmp_path / "again")  # and the next run is not confused by anything left behind
    assert not results["reused"]["a"]


def test_the_store_lock_is_removed_after_use_and_excludes_others(tmp_path):
    from lmc.stages.store import Store

    store = Store(tmp_path)
    entry = tmp_path / "models" / "abc"
    with store.lock(entry):
        assert (tmp_path / "models" / ".abc.lock").exists()
        waiter = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from lmc.stages.store import Store\n"
            "print('ready', flush=True)\n"
            f"t = time.monotonic()\nwith Store({str(tmp_path)!r}).lock(Path({str(entry)!r})):\n"
            "    print(round(time.monotonic() - t, 2))")], stdout=subprocess.PIPE, text=True)
        assert waiter.stdout.readline().strip() == "ready"
        time.sleep(2)
    waited = float(waiter.communicate(timeout=60)[0].split()[-1])
    assert waited >= 1.5  # the other process waited for this one
    assert not (tmp_path / "models" / ".abc.lock").exists()


KILL = ["model.width=48", "model.depth=2", "train.epochs=6", "train.batch_size=32", "interp.num_alphas=9",
        "progress=false", "logger=none", "align=ste", "align.steps=60", "align.batch_size=64"]


def test_a_job_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path, data_root):
    """SIGKILL the same command at seeded random moments (training, alignment, curves, report), then let it
    finish: its curves and barriers equal those of a run never interrupted."""
    env = {**os.environ, "WANDB_MODE": "disabled", "DATA_DIR": str(data_root)}
    clean = lmc_run([*KILL, f"store.root={tmp_path / 'clean'}", f"hydra.run.dir={tmp_path / 'clean_run'}"],
                    tmp_path, data_root)
    assert clean.returncode == 0, clean.stderr[-2000:]
    took = json.loads((tmp_path / "clean_run" / "results.json").read_text())["timings"]
    total = sum(took.values()) + 3.0  # plus the interpreter's start
    rng = random.Random(0)
    args = [*KILL, f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}"]
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "lmc.run", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, total))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    final = lmc_run(args, tmp_path, data_root)
    assert final.returncode == 0, final.stderr[-2000:]
    resumed, uninterrupted = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("run", "clean_run"))
    for key in ("endpoints", "barriers", "layerwise", "diagnostics"):
        assert resumed[key] == uninterrupted[key], key
    assert (tmp_path / "run" / "curves.csv").read_text() == (tmp_path / "clean_run" / "curves.csv").read_text()
    assert not list((tmp_path / "store").rglob(".*.lock"))

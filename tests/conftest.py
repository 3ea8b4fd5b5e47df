import os

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data folder shared by the session's tests (MNIST-1D is generated once and cached there)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def mnist1d(data_root):
    from lmc.core.data import load_dataset

    return load_dataset("mnist1d", data_root)


@pytest.fixture(scope="session", autouse=True)
def _session_store(tmp_path_factory):
    """The run store of tests that do not name one: a per-session folder, never ./store of the checkout
    (a stale store there would let a test load models instead of training them)."""
    old = os.environ.get("LMC_STORE")
    os.environ["LMC_STORE"] = str(tmp_path_factory.mktemp("store"))
    yield
    if old is None:
        os.environ.pop("LMC_STORE", None)
    else:
        os.environ["LMC_STORE"] = old

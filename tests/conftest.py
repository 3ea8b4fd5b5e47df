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
    from lmc.data import load_dataset

    return load_dataset("mnist1d", data_root)

"""torchvision datasets from fabricated files in the real formats, augmentation, splits, download CLI."""

import subprocess
import sys

import pytest
import torch
from fake_datasets import FAKE_NAMES, fabricate, skip_md5_checks

from lmc.core.data import Augmentation, Dataset, from_options, load_dataset, split_pair
from lmc.errors import ConfigError

SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
          "svhn": (3, 32, 32)}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_data")
    for name in FAKE_NAMES:
        fabricate(name, root, n_train=60, n_test=20)
    return root


@pytest.mark.parametrize("name", FAKE_NAMES)
def test_fabricated_files_load_through_torchvision(name, fake_root, monkeypatch):
    skip_md5_checks(monkeypatch)
    raw = load_dataset(name, fake_root)
    assert raw.x_train.shape == (60, *SHAPES[name]) and raw.x_test.shape == (20, *SHAPES[name])
    assert raw.x_train.dtype == torch.float32 and 0 <= raw.x_train.min() and raw.x_train.max() <= 1
    assert raw.num_classes == (100 if name == "cifar100" else 10)
    # labels cycle through all classes (SVHN's stored label 10 is digit 0)
    assert sorted(set(raw.y_train.tolist())) == list(range(min(60, raw.num_classes)))
    c = SHAPES[name][0]
    mean, std = [0.5] * c, [0.25] * c
    norm = load_dataset(name, fake_root, mean=mean, std=std)
    assert torch.allclose(norm.x_train, (raw.x_train - 0.5) / 0.25)


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "python -m lmc.data download cifar10" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; valid: breast_cancer, cifar10, cifar100"):
        load_dataset("imagenet", tmp_path)


def test_download_cli_errors_cleanly():
    proc = subprocess.run([sys.executable, "-m", "lmc.data", "download", "imagenet"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown dataset 'imagenet'")


def images(n=16, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_augmentation_is_seeded_and_is_crop_and_flip():
    x = images()
    aug = Augmentation(crop_padding=2, flip=True)
    a1 = aug(x, torch.Generator().manual_seed(0))
    a2 = aug(x, torch.Generator().manual_seed(0))
    a3 = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3) and a1.shape == x.shape
    # each output image is a shifted window of the reflect-padded input, possibly flipped
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a1[i], w) or torch.equal(a1[i], w.flip(-1)) for w in windows)
    # flips only: about half the images are mirrored
    flipped = Augmentation(crop_padding=0, flip=True)(images(400), torch.Generator().manual_seed(0))
    mirrored = (flipped != images(400)).flatten(1).any(1).float().mean().item()
    assert 0.4 < mirrored < 0.6
    assert torch.equal(Augmentation(0, False)(x, torch.Generator()), x)
    with pytest.raises(ConfigError, match="augment=false"):
        aug(torch.randn(4, 10), torch.Generator())


def test_training_augmentation_seed_is_separate_from_data_order():
    from lmc.core.models import build_model
    from lmc.core.training import TrainConfig, seeded_init, train

    x, y = images(64), torch.arange(64) % 2
    data = Dataset("img", x, y, x, y, 2, augment=Augmentation(2, True))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2)

    def weights(data_seed, aug_seed):
        m = seeded_init(lambda: build_model("mlp", (3, 8, 8), 2, width=8, depth=1), 0)
        train(m, data, cfg, data_seed=data_seed, aug_seed=aug_seed, progress=False)
        return m.fc1.weight

    assert torch.equal(weights(0, 5), weights(0, 5))
    assert not torch.equal(weights(0, 5), weights(0, 6))
    assert not torch.equal(weights(0, 5), weights(1, 5))


def toy(n=200, classes=10):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return Dataset("toy", x, torch.arange(n) % classes, x[:7], torch.arange(7), classes)


def test_split_halves_and_classes_are_disjoint_and_cover():
    data = toy()
    a, b = split_pair(data, "none")
    assert a is data and b is data
    for how in ("halves", "classes"):
        a, b = split_pair(data, how, fraction=0.2, seed=3)
        ids_a, ids_b = set(a.x_train[:, 0].tolist()), set(b.x_train[:, 0].tolist())
        assert not ids_a & ids_b and len(ids_a | ids_b) == 200
        assert torch.equal(a.x_test, data.x_test) and torch.equal(b.y_test, data.y_test)
        assert torch.equal(a.y_train, a.x_train[:, 0].long() % 10)  # labels stay with their examples
    a, b = split_pair(data, "halves", seed=3)
    assert len(a.y_train) == len(b.y_train) == 100
    a, b = split_pair(data, "classes", fraction=0.2, seed=3)
    # A: 80% of the lower-class examples (classes 0-4) + 20% of the upper ones; B the converse
    assert (a.y_train < 5).sum() == 80 and (a.y_train >= 5).sum() == 20
    assert (b.y_train >= 5).sum() == 80 and (b.y_train < 5).sum() == 20
    assert not torch.equal(split_pair(data, "halves", seed=4)[0].x_train, split_pair(data, "halves", seed=3)[0].x_train)
    with pytest.raises(ConfigError, match="unknown data.split 'thirds'; valid: none, halves, classes"):
        split_pair(data, "thirds")


def test_from_options_reads_the_config_keys(fake_root, monkeypatch):
    skip_md5_checks(monkeypatch)
    opts = {"name": "cifar10", "root": str(fake_root), "download": False, "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5], "augment": True, "crop_padding": 3, "flip": False}
    data = from_options(opts)
    assert data.augment == Augmentation(3, False)
    assert -1 <= data.x_train.min() and data.x_train.max() <= 1 and data.x_train.min() < -0.9
    assert from_options({**opts, "augment": False}).augment is None


def test_concurrent_pair_equals_sequential_training():
    from lmc.core.models import build_model
    from lmc.core.training import TrainConfig, seeded_init, train_pair

    x, y = images(96), torch.arange(96) % 3
    datas = [Dataset("img", x, y, x, y, 3, augment=Augmentation(2, True)),
             Dataset("img", x[:64], y[:64], x, y, 3, augment=Augmentation(2, True))]
    weights = {}
    for concurrent in (False, True):
        cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2, concurrent_pair=concurrent)
        models = [seeded_init(lambda: build_model("mlp", (3, 8, 8), 3, width=8, depth=1), s) for s in (0, 1)]
        histories = train_pair(models, datas, cfg, seeds=[0, 1], progress=False)
        assert len(histories) == 2 and len(histories[0]) == 2
        weights[concurrent] = [m.fc1.weight.detach().clone() for m in models]
    assert all(torch.equal(p, q) for p, q in zip(weights[False], weights[True]))
    assert not torch.equal(*weights[True])


def test_concurrent_pair_refuses_dropout_and_trains_nothing():
    from lmc.core.training import TrainConfig, seeded_init, train_pair

    x, y = images(32), torch.arange(32) % 2
    data = Dataset("img", x, y, x, y, 2)

    def build(p):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8), torch.nn.Dropout(p),
                                   torch.nn.Linear(8, 2))

    models = [seeded_init(lambda: build(0.1), s) for s in (0, 1)]
    before = [m[1].weight.detach().clone() for m in models]
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, concurrent_pair=True)
    with pytest.raises(ConfigError, match=r"model 0: its module 2 \(Dropout, p=0.1\) draws global random numbers.*"
                                          r"set train.concurrent_pair=false"):
        train_pair(models, [data, data], cfg, seeds=[0, 1], progress=False)
    assert all(torch.equal(m[1].weight, b) for m, b in zip(models, before))  # nothing trained
    # dropout with p=0 draws nothing; sequential training takes dropout as it is
    train_pair([seeded_init(lambda: build(0.0), s) for s in (0, 1)], [data, data], cfg, seeds=[0, 1], progress=False)
    train_pair(models, [data, data], TrainConfig(epochs=1, batch_size=8, lr=1e-2), seeds=[0, 1], progress=False)
    assert not torch.equal(models[0][1].weight, before[0])


def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets as tvd

    from lmc.data import main

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    assert main(["download", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: could not download cifar10 into {tmp_path}: <urlopen error no network>\n"


def test_gpu_options_are_ignored_on_cpu_and_compile_excludes_concurrency():
    from lmc.core.models import build_model
    from lmc.core.training import TrainConfig, seeded_init, train

    x, y = images(32), torch.arange(32) % 2
    data = Dataset("img", x, y, x, y, 2)
    weights = []
    for fast in (False, True):
        m = seeded_init(lambda: build_model("resnet20", (3, 8, 8), 2, width=1, base_channels=2), 0)
        train(m, data, TrainConfig(epochs=1, batch_size=8, lr=1e-2, bf16=fast, channels_last=fast), 0,
              progress=False)
        assert m.conv.weight.is_contiguous()
        weights.append(m.conv.weight.detach())
    assert torch.equal(*weights)
    with pytest.raises(ConfigError, match="train.compile=true cannot be combined with train.concurrent_pair"):
        TrainConfig(compile=True, concurrent_pair=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fast_path_and_concurrent_pair_on_cuda():
    from lmc.core.models import build_model
    from lmc.core.training import TrainConfig, evaluate, seeded_init, train_pair

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 32, 32, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    data = Dataset("img", x, y, x, y, 2, augment=Augmentation(4, True)).to("cuda")
    out = {}
    for concurrent in (False, True):
        cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, optimizer="sgd", bf16=True, channels_last=True,
                          concurrent_pair=concurrent)
        models = [seeded_init(lambda: build_model("resnet20", (3, 32, 32), 2, width=1), s).cuda() for s in (0, 1)]
        histories = train_pair(models, [data, data], cfg, [0, 1], progress=False)
        assert all(h[-1]["loss"] < h[0]["loss"] for h in histories)
        out[concurrent] = [evaluate(m, data.x_test, data.y_test)[1] for m in models]
    assert out[True] == pytest.approx(out[False], abs=0.05)  # same trainings (cuDNN may differ in the last bits)

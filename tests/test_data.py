"""Loaders read small files this test writes in the datasets' real formats."""

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.errors import UsageError
from pipeline.training.data import ImageSet, load_datasets, read_idx, synthetic_images

ROOT = Path(__file__).parent.parent


def write_idx(path, array: np.ndarray, compress=True):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_fashion(root, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_from_idx_files(tmp_path):
    fake_fashion(tmp_path)
    data = load_datasets(DataConfig(dataset="fashion-mnist", root=tmp_path, val_size=10, download=False))
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 12)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    images, labels = next(data.test.batches(5))
    assert images.dtype == torch.float32 and images.shape == (5, 1, 28, 28)
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_idx_reader_rejects_truncated_files(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(path)


def _bad_crc(raw: bytes) -> bytes:
    packed = bytearray(gzip.compress(raw))
    packed[-8] ^= 0xFF  # the CRC32 in the trailer
    return bytes(packed)


DAMAGED_GZ = [  # (name, bytes of the file from the bytes of a valid IDX file, fragment)
    ("bad crc", _bad_crc, "damaged"),
    ("empty gz", lambda raw: b"", "empty or truncated"),
    ("truncated gz", lambda raw: gzip.compress(raw)[:-30], "damaged"),
    ("gz header only", lambda raw: gzip.compress(raw)[:12], "damaged"),
    ("not gzip, not idx", lambda raw: b"<html>404</html>", "not a uint8 IDX file"),
    ("idx header cut", lambda raw: gzip.compress(raw[:6]), "not a uint8 IDX file"),
]


@pytest.mark.parametrize("name,damage,fragment", DAMAGED_GZ, ids=[d[0] for d in DAMAGED_GZ])
def test_damaged_dataset_file_is_named_with_the_fix(tmp_path, name, damage, fragment):
    fake_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = struct.pack(">HBBIII", 0, 0x08, 3, 40, 28, 28)
    path.write_bytes(damage(header + bytes(40 * 28 * 28)))
    with pytest.raises(UsageError) as err:
        load_datasets(DataConfig(dataset="fashion-mnist", root=tmp_path, val_size=10, download=False))
    message = str(err.value)
    assert str(path) in message and fragment in message and "download it again" in message, message


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_datasets(DataConfig(dataset="fashion-mnist", root=tmp_path, download=False))


def _pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def fake_cifar(root, hundred=False, per_file=6):
    rng = np.random.default_rng(1)
    if hundred:
        folder = root / "cifar-100-python"
        folder.mkdir()
        for name, n in (("train", 30), ("test", 10)):
            _pickle(folder / name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                    b"fine_labels": (np.arange(n) % 100).tolist(), b"coarse_labels": [0] * n})
        _pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            _pickle(folder / name, {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                                    b"labels": (np.arange(per_file) % 10).tolist()})
        _pickle(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                                            b"dog", b"frog", b"horse", b"ship", b"truck"]})
    return folder


def test_cifar10_from_python_pickles(tmp_path):
    folder = fake_cifar(tmp_path)
    data = load_datasets(DataConfig(dataset="cifar10", root=tmp_path, val_size=5, download=False))
    assert (len(data.train), len(data.val), len(data.test)) == (25, 5, 6)
    assert data.class_names[0] == "airplane" and data.input_shape == (3, 32, 32)
    raw = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"data"]
    assert torch.equal(data.test.images[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))


def test_cifar100_uses_fine_labels(tmp_path):
    fake_cifar(tmp_path, hundred=True)
    data = load_datasets(DataConfig(dataset="cifar100", root=tmp_path, val_size=5, download=False))
    assert data.num_classes == 100 and data.class_names[3] == "c3"
    assert sorted(data.test.labels.tolist()) == list(range(10))


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = fake_cifar(tmp_path)
    _pickle(folder / "test_batch", {b"data": _Planted(), b"labels": []})
    with pytest.raises(UsageError, match="refusing to load"):
        load_datasets(DataConfig(dataset="cifar10", root=tmp_path, val_size=5, download=False))


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(UsageError, match="cifar10 not found"):
        load_datasets(DataConfig(dataset="cifar10", root=tmp_path, download=False))


def write_image_folder(root, image_format="png"):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{image_format}")


def test_imagefolder(tmp_path):
    write_image_folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, val_size=4, image_size=32, num_workers=0)
    data = load_datasets(cfg)
    assert data.class_names == ["cat", "dog"] and (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)
    images, labels = next(data.train.batches(4, seed=0, augment=True))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in data.test.batches(3)) == 4
    with pytest.raises(UsageError, match="no train"):
        load_datasets(DataConfig(dataset="imagefolder", root=tmp_path / "train"))


BAD_IMAGES = [  # (file under train/, bytes from a valid JPEG's bytes)
    ("cat/0.jpg", lambda jpeg: jpeg[: len(jpeg) // 2]),  # truncated JPEG
    ("dog/notes.png", lambda jpeg: b"not an image at all"),
    ("dog/empty.jpeg", lambda jpeg: b""),
    ("cat/1.jpg", lambda jpeg: jpeg[:-40]),  # only the end cut off
]


@pytest.mark.parametrize("name,damage", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_undecodable_images_are_named_before_training(tmp_path, name, damage):
    from pipeline.training.imagefolder import check_images

    write_image_folder(tmp_path, "jpg")
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, val_size=4, image_size=32, num_workers=0)
    check_images(cfg)  # all good: silent
    path = tmp_path / "train" / name
    path.write_bytes(damage((tmp_path / "train/cat/0.jpg").read_bytes()))
    with pytest.raises(UsageError, match=f"1 file.*{name}.*remove or replace them"):
        check_images(cfg)


def test_val_size_must_leave_training_images():
    with pytest.raises(UsageError, match="lower data.val_size"):
        load_datasets(DataConfig(dataset="synthetic", synthetic_size=32, val_size=32))


def test_train_size_keeps_the_same_images_whatever_the_seed_and_never_validation_ones():
    full = load_datasets(DataConfig(dataset="synthetic", synthetic_size=64, val_size=8))
    small = load_datasets(DataConfig(dataset="synthetic", synthetic_size=64, val_size=8, train_size=20))
    assert len(small.train) == 20 and torch.equal(small.val.images, full.val.images)
    again = load_datasets(DataConfig(dataset="synthetic", synthetic_size=64, val_size=8, train_size=20))
    assert torch.equal(again.train.images, small.train.images)
    rows = {bytes(image.flatten().tolist()) for image in full.train.images}
    assert all(bytes(image.flatten().tolist()) in rows for image in small.train.images)
    assert not torch.equal(small.train.images, full.train.images[:20])  # shuffled: image folders go class by class
    with pytest.raises(UsageError, match="data.train_size 57 is more than the 56 training images"):
        load_datasets(DataConfig(dataset="synthetic", synthetic_size=64, val_size=8, train_size=57))


def test_label_noise_changes_the_configured_share_of_training_labels_only():
    clean = load_datasets(DataConfig(dataset="synthetic", synthetic_size=400, val_size=40, train_size=250))
    config = DataConfig(dataset="synthetic", synthetic_size=400, val_size=40, train_size=250, label_noise=0.4)
    noisy = load_datasets(config)
    changed = noisy.train.labels != clean.train.labels
    assert int(changed.sum()) == 100  # 40% of 250, each moved to another class
    assert set(noisy.train.labels[changed].tolist()) == set(range(noisy.num_classes))  # spread over the classes
    assert torch.equal(noisy.train.images, clean.train.images)
    for split in ("val", "test"):
        assert torch.equal(getattr(noisy, split).labels, getattr(clean, split).labels)
        assert torch.equal(getattr(noisy, split).images, getattr(clean, split).images)
    # the data depend on the data section alone, never on the training seed: the same noise every time
    assert torch.equal(load_datasets(config).train.labels, noisy.train.labels)


def _set(n=20):
    (x, y), _ = synthetic_images(n)
    return ImageSet(x, y, (0.5,) * 3, (0.25,) * 3)


def test_batches_are_deterministic_and_independent_of_process_count():
    data = _set()
    one = [(x, y) for x, y in data.batches(4, seed=3, epoch=1, augment=True)]
    again = [(x, y) for x, y in data.batches(4, seed=3, epoch=1, augment=True)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    # two ranks with half the batch see exactly the samples of the one-process batch, augmented alike
    ranks = [list(data.batches(2, seed=3, epoch=1, augment=True, rank=r, world=2)) for r in range(2)]
    for step, (x, y) in enumerate(one):
        got_x = torch.cat([ranks[0][step][0], ranks[1][step][0]])
        got_y = torch.cat([ranks[0][step][1], ranks[1][step][1]])
        assert sorted(got_y.tolist()) == sorted(y.tolist())
        assert {tuple(v.flatten()[:8].tolist()) for v in got_x} == {tuple(v.flatten()[:8].tolist()) for v in x}
    # skipping replays exactly the remaining batches
    assert torch.equal(list(data.batches(4, seed=3, epoch=1, augment=True, skip=2))[0][0], one[2][0])
    # another epoch reshuffles
    assert not torch.equal(next(data.batches(4, seed=3, epoch=2))[1], one[0][1])


def test_evaluation_batches_cover_every_sample_once_across_ranks():
    data = _set(21)
    labels = [y for r in range(2) for _, y in data.batches(4, rank=r, world=2)]
    assert sum(len(y) for y in labels) == 21


def test_imagefolder_does_not_import_data():
    """data imports imagefolder; the reverse would be a cycle (both share pipeline/training/splits.py)."""
    code = "import sys, pipeline.training.imagefolder; print('pipeline.training.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# --- the user's own images: every mode, class folders, the guarded opener ---------------------------------
def own_folder(tmp_path):
    from tests.own_images import write_own_images

    return write_own_images(tmp_path / "images")


def folder_config(root, **fields):
    return DataConfig(**{"dataset": "imagefolder", "root": root, "val_size": 4, "image_size": 16, "num_workers": 0,
                         **fields})


def test_every_image_mode_loads_as_rgb_the_same_way(tmp_path):
    from PIL import Image

    from pipeline.training.images import open_image, open_rgb, to_channels
    from tests.own_images import save

    colour = np.zeros((6, 10, 3), dtype=np.uint8)
    colour[:] = (200, 40, 40)
    colour[:, :3] = (0, 0, 255)  # a blue left edge, to see rotations
    files = {mode: save(colour, mode, tmp_path, mode.replace(";", "")) for mode in
             ("L", "RGB", "RGBA", "P", "I;16", "CMYK", "EXIF", "RGB-JPEG")}
    assert [Image.open(files[m]).mode for m in ("L", "RGBA", "P", "I;16", "CMYK")] == ["L", "RGBA", "P", "I;16",
                                                                                        "CMYK"]
    loaded = {mode: np.asarray(open_rgb(str(path))).astype(int) for mode, path in files.items()}
    assert all(image.shape == (6, 10, 3) for image in loaded.values())  # the EXIF one turned upright
    grey = round(0.299 * 200 + 0.587 * 40 + 0.114 * 40)
    assert abs(loaded["I;16"][3, 7] - grey).max() <= 1  # 16-bit scaled to 8 bits, not clipped to white
    assert (loaded["RGBA"][:2] == 255).all() and (loaded["RGBA"][2:, 7] == (200, 40, 40)).all()  # onto white
    for mode in ("P", "CMYK", "EXIF", "RGB-JPEG"):
        assert abs(loaded[mode][3, 7] - (200, 40, 40)).max() <= 12, mode  # JPEG and palette losses only
        assert loaded[mode][3, 0, 2] > 200 > loaded[mode][3, 9, 2], mode  # the blue edge still on the left
    # the model's grayscale: one conversion from any of them
    assert to_channels(open_image(files["RGB"]), 1)[0].mode == "L"


def test_labels_come_from_the_file_list_without_decoding(tmp_path, monkeypatch):
    from pipeline.training import imagefolder
    from pipeline.training.splits import Split

    root = own_folder(tmp_path)
    data = load_datasets(folder_config(root))
    assert isinstance(data.train, Split) and isinstance(_set(), Split)  # both kinds have every member
    monkeypatch.setattr(imagefolder._Samples, "__getitem__", lambda *a: pytest.fail("an image was decoded"))
    assert data.class_names == ["apple", "banana", "cherry"]
    assert torch.bincount(torch.cat([data.train.labels, data.val.labels])).tolist() == [16, 11, 7]  # uneven
    assert torch.bincount(data.test.labels).tolist() == [4, 3, 2]
    subset = data.train.subset([3, 0])
    assert subset.labels.tolist() == [data.train.labels[3].item(), data.train.labels[0].item()]


def test_folder_indexed_batches_number_samples_as_the_in_memory_sets_do(tmp_path):
    root = own_folder(tmp_path)
    train = load_datasets(folder_config(root)).train
    every = train.inputs(range(len(train)))
    seen = []
    for images, labels, idx in train.indexed_batches(8, seed=3, epoch=1):
        assert torch.equal(labels, train.labels[idx]) and torch.equal(images, every[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(train))) and seen != sorted(seen)  # shuffled, each once
    again = [idx for _, _, idx in train.indexed_batches(8, seed=3, epoch=1, skip=1)]
    assert torch.equal(torch.cat(again), torch.tensor(seen[8:]))  # skip replays the remaining batches


WORKERS = """
import sys, torch
from pathlib import Path
from pipeline.config import DataConfig
from pipeline.errors import UsageError
from pipeline.training.data import load_datasets
config = dict(dataset="imagefolder", root=sys.argv[1], val_size=4, image_size=16)
alone, workers = (load_datasets(DataConfig(**config, num_workers=n)).train for n in (0, 1))
same = all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
           for a, b in zip(alone.indexed_batches(8, seed=1), workers.indexed_batches(8, seed=1)))
Path(workers.base.samples[0][0]).write_bytes(b"")
try:
    list(workers.batches(8))
except UsageError as exc:
    print(same, exc, sep="\\n")
"""


@pytest.mark.slow
def test_decoding_workers_give_the_same_batches_and_a_bad_file_in_one_line(tmp_path):
    """In a process of its own: a worker forked from one that has run OpenVINO (earlier tests) may crash."""
    root = own_folder(tmp_path)
    first = sorted((root / "train").rglob("*.*"))[0]
    out = subprocess.run([sys.executable, "-c", WORKERS, str(root)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.stdout.splitlines() == ["True", f"{first} is empty (0 bytes); remove it or pass a PNG or JPEG "
                                                "image"], out.stderr


@pytest.mark.parametrize("damage,fragment", [
    ("empty_class", "{root}/train/cherry holds no images"),
    ("empty_test_class", "{root}/test/banana holds no images"),
    ("class_train_lacks", "{root}/test/durian is a class the training split lacks (no {root}/train/durian)"),
    ("one_class", "{root}/train has 1 class folder(s)"),
])
def test_class_folders_that_cannot_work_are_named(tmp_path, damage, fragment):
    import shutil

    root = own_folder(tmp_path)
    if damage == "empty_class":
        shutil.rmtree(root / "train/cherry")
        (root / "train/cherry").mkdir()
    elif damage == "empty_test_class":
        for f in (root / "test/banana").iterdir():
            f.unlink()
    elif damage == "class_train_lacks":
        shutil.copytree(root / "test/apple", root / "test/durian")
    else:
        shutil.rmtree(root / "train/banana")
        shutil.rmtree(root / "train/cherry")
    with pytest.raises(UsageError) as caught:
        load_datasets(folder_config(root))
    assert fragment.format(root=root) in str(caught.value) and "\n" not in str(caught.value)


def test_a_test_split_may_lack_a_class_and_keeps_the_training_numbering(tmp_path):
    import shutil

    root = own_folder(tmp_path)
    shutil.rmtree(root / "test/banana")
    (root / "test/.ipynb_checkpoints").mkdir()  # hidden folders are no classes
    data = load_datasets(folder_config(root))
    assert data.class_names == ["apple", "banana", "cherry"] and sorted(set(data.test.labels.tolist())) == [0, 2]


def test_unusable_files_are_named_by_the_folder_check_and_the_opener(tmp_path):
    from pipeline.training.imagefolder import check_images
    from pipeline.training.images import open_image
    from tests.own_images import write_bomb

    root = own_folder(tmp_path)
    cfg = folder_config(root)
    good = sorted((root / "train").rglob("*.png"))[0]
    cases = {"bomb.png": None, "cut.png": good.read_bytes()[:-30], "empty.png": b"",
             "notes.jpg": b"not an image"}
    fragments = {"bomb.png": "is 30000x30000 = 900,000,000 pixels, more than the bound of 89,478,485 (a guard "
                             "against decompression bombs); if you trust the file, raise data.max_image_pixels",
                 "cut.png": "is damaged or truncated", "empty.png": "is empty (0 bytes)",
                 "notes.jpg": "is not an image PIL can read"}
    for name, content in cases.items():
        path = root / "train/banana" / name
        write_bomb(path) if content is None else path.write_bytes(content)
        for call in (lambda: check_images(cfg), lambda: open_image(path)):
            with pytest.raises(UsageError) as caught:
                call()
            message = str(caught.value)
            assert f"{path} {fragments[name]}" in message and "\n" not in message, message
        path.unlink()
    with pytest.raises(UsageError, match=f"{root / 'train'} is a folder, not an image file"):
        open_image(root / "train")
    check_images(cfg)  # all good again: silent


def test_data_max_image_pixels_bounds_and_raises_the_bound(tmp_path):
    from PIL import Image

    from pipeline.training.imagefolder import check_images

    root = own_folder(tmp_path)
    Image.new("RGB", (100, 60)).save(root / "train/apple/big.png")
    with pytest.raises(UsageError, match="big.png is 100x60 = 6,000 pixels, more than the bound of 5,999"):
        check_images(folder_config(root, max_image_pixels=5999))
    with pytest.raises(UsageError, match="more than the bound of 5,999"):
        next(load_datasets(folder_config(root, max_image_pixels=5999)).train.batches(100))
    check_images(folder_config(root, max_image_pixels=6000))
    assert len(next(load_datasets(folder_config(root, max_image_pixels=6000)).train.batches(100))[0]) == 31

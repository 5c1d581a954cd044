"""Dataset files: IDX and CIFAR-10 parsers on files the tests write (good, truncated, corrupt), downloads from a
local server with checksums, the lookup order, the embedded subset and the batch loader."""

import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest

from minivit import data


def write_idx_pair(folder, n=20, classes=10, seed=0, prefix=("train", "t10k")):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split in prefix:
        data.write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % classes)
    return folder


def test_idx_round_trip_and_raw_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    data.write_idx(tmp_path / "x.gz", images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), images)
    values = images.astype(np.int16) // 2 - 64  # -64..63: fits every IDX type
    for dtype in (np.int8, np.int16, np.int32, np.float32, np.float64):
        data.write_idx(tmp_path / "t.gz", values, dtype)
        back = data.read_idx(tmp_path / "t.gz")
        assert back.dtype == dtype and np.array_equal(back, values)
    (tmp_path / "x.raw").write_bytes(gzip.decompress((tmp_path / "x.gz").read_bytes()))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.raw"), images)


def test_truncated_idx_names_the_file_and_the_sizes(tmp_path):
    data.write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28)))
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(data.DataError, match=r"cut.gz: header promises shape \(5, 28, 28\) \(3920 bytes of data\) "
                                             r"but the file holds 3820 bytes"):
        data.read_idx(tmp_path / "cut.gz")


def test_corrupt_gzip_and_bad_magic(tmp_path):
    data.write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28)))
    whole = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "half.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(data.DataError, match="half.gz: not a complete gzip file"):
        data.read_idx(tmp_path / "half.gz")
    (tmp_path / "text.raw").write_bytes(b"hello world")
    with pytest.raises(data.DataError, match="text.raw: not an IDX file"):
        data.read_idx(tmp_path / "text.raw")
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(data.DataError, match="an empty file"):
        data.read_idx(tmp_path / "empty.raw")


def test_label_count_must_match_images(tmp_path):
    folder = write_idx_pair(tmp_path / "fashion-mnist")
    data.write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(7))
    with pytest.raises(data.DataError, match="7 labels for 20 images"):
        data.load_dataset("fashion-mnist", tmp_path, allow_download=False, verify=False)


def test_load_from_an_explicit_folder_and_from_the_environment(tmp_path, monkeypatch):
    write_idx_pair(tmp_path / "a" / "mnist", n=12)
    ds = data.load_dataset("mnist", tmp_path / "a", allow_download=False, verify=False)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.train_labels.dtype == np.int64
    assert ds.folder == tmp_path / "a" / "mnist"
    write_idx_pair(tmp_path / "env", n=8)  # files directly in the folder also count
    monkeypatch.setenv("MINIVIT_DATA", str(tmp_path / "env"))
    assert data.load_dataset("mnist", allow_download=False, verify=False).train_images.shape[0] == 8
    assert data.load_dataset("mnist", tmp_path / "a", allow_download=False, verify=False).train_images.shape[0] == 12


def test_missing_files_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"mnist not found; put train-images-idx3-ubyte.gz, .* in one of: "
                                             f".*{tmp_path / 'empty'}"):
        data.load_dataset("mnist", tmp_path / "empty", allow_download=False)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.load_dataset("svhn")


def test_embedded_subset_is_real_balanced_and_checked():
    ds = data.load_dataset("fashion-mnist-mini")
    assert ds.train_images.shape == (5000, 1, 28, 28) and ds.test_images.shape == (1000, 1, 28, 28)
    assert np.bincount(ds.train_labels).tolist() == [500] * 10
    assert np.bincount(ds.test_labels).tolist() == [100] * 10
    assert 0.25 < ds.train_images.mean() / 255 < 0.32  # Fashion-MNIST's mean pixel is 0.286
    assert len({hashlib.sha256(im.tobytes()).hexdigest() for im in ds.train_images}) == 5000


def test_subset_writer_keeps_the_first_images_of_each_class(tmp_path):
    src = write_idx_pair(tmp_path / "src", n=40, classes=4)
    data.write_class_balanced_subset(src, tmp_path / "out", 3, 2, num_classes=4)
    images = data.read_idx(tmp_path / "out" / "train-images-idx3-ubyte.gz")
    labels = data.read_idx(tmp_path / "out" / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(labels, [0, 1, 2, 3] * 3)
    np.testing.assert_array_equal(images, data.read_idx(src / "train-images-idx3-ubyte.gz")[:12])


# ------------------------------------------------------------------------------------------------ CIFAR-10
def cifar_archive(path, per_batch=4, corrupt_member=None):
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            batch = {b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                     b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8), b"filenames": [b"a"] * per_batch}
            raw = pickle.dumps(batch, protocol=2) if name != corrupt_member else b"not a pickle"
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_cifar10_reads_from_the_archive(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    cifar_archive(folder / "cifar-10-python.tar.gz")
    ds = data.load_dataset("cifar10", tmp_path, allow_download=False, verify=False)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.max() <= 9


def test_cifar10_corrupt_or_truncated_archive(tmp_path):
    path = cifar_archive(tmp_path / "bad.tar.gz", corrupt_member="test_batch")
    with pytest.raises(data.DataError, match="bad.tar.gz:cifar-10-batches-py/test_batch: not a readable"):
        data.read_cifar10(path)
    good = cifar_archive(tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(data.DataError, match="cut.tar.gz: not a complete tar.gz archive"):
        data.read_cifar10(tmp_path / "cut.tar.gz")


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_cifar_batches_never_run_code():
    raw = pickle.dumps({b"data": Evil(), b"labels": [1]}, protocol=2)
    with pytest.raises(data.DataError, match="refers to (posix|os).system"):
        data.read_cifar_batch(raw)


# ------------------------------------------------------------------------------------------------ downloads
@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_download_checks_sha256_and_renames_only_when_complete(tmp_path, server):
    root, url = server
    (root / "f.bin").write_bytes(b"x" * 100000)
    good = hashlib.sha256(b"x" * 100000).hexdigest()
    out = data.download(url + "f.bin", tmp_path / "dl" / "f.bin", good, progress=False)
    assert out.read_bytes() == b"x" * 100000
    with pytest.raises(data.DataError, match="SHA-256 mismatch"):
        data.download(url + "f.bin", tmp_path / "dl" / "g.bin", "0" * 64, progress=False)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["f.bin"]  # no g.bin, no g.bin.part


def test_missing_dataset_is_downloaded_into_the_data_dir(tmp_path, server, monkeypatch):
    root, url = server
    write_idx_pair(root, n=10)
    info = data.DATASETS["mnist"]
    hashes = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in info.files}
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetInfo(
        "mnist", info.classes, info.shape, info.mean, info.std, info.files, hashes, ("http://127.0.0.1:9/", url)))
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    ds = data.load_dataset("mnist", tmp_path / "data", progress=False)
    assert ds.folder == tmp_path / "data" / "mnist" and ds.train_images.shape == (10, 1, 28, 28)
    hashes["t10k-images-idx3-ubyte.gz"] = "0" * 64
    (tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="could not be downloaded.*SHA-256 mismatch"):
        data.load_dataset("mnist", tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


# ------------------------------------------------------------------------------------------------ loader
def test_loader_normalises_batches_and_shuffles_by_seed_and_epoch():
    images = np.arange(10 * 4, dtype=np.uint8).reshape(10, 1, 2, 2)
    labels = np.arange(10)
    loader = data.DataLoader(images, labels, 4, mean=(0.5,), std=(0.25,), shuffle=True, seed=3)
    assert len(loader) == 3
    batches = list(loader.epoch(0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    order = np.concatenate([y for _, y in batches])
    assert sorted(order) == list(range(10)) and list(order) != list(range(10))
    x, y = batches[0]
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, (images[y] / 255.0 - 0.5) / 0.25, rtol=1e-6)
    again = np.concatenate([y for _, y in loader.epoch(0)])
    other = np.concatenate([y for _, y in loader.epoch(1)])
    np.testing.assert_array_equal(order, again)
    assert list(order) != list(other)
    assert len(data.DataLoader(images, labels, 4, (0,), (1,), drop_last=True)) == 2


def test_augmentation_crops_with_padding_and_flips():
    images = np.random.default_rng(0).integers(1, 256, (64, 3, 8, 8)).astype(np.uint8)
    loader = data.DataLoader(images, np.zeros(64, int), 64, (0, 0, 0), (1, 1, 1), augment=True, pad=2, seed=1)
    out = loader._augment(images, np.random.default_rng(0))
    assert out.shape == images.shape
    for a, b in zip(out, images):  # every output is a shifted (maybe mirrored) window of the padded input
        padded = np.pad(b, ((0, 0), (2, 2), (2, 2)))
        windows = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(np.array_equal(a, w) or np.array_equal(a, w[:, :, ::-1]) for w in windows)
    assert (out == 0).any()  # some padding came in


def test_random_erasing_overwrites_one_rectangle_of_the_drawn_size():
    H, W = 28, 20
    images = np.zeros((400, 2, H, W), np.uint8)     # random pixels are 1..255 with probability 255/256 each
    out = images.copy()
    erased = data.erase_rectangles(out, 1.0, np.random.default_rng(0))
    assert erased.all()
    areas, ratios = [], []
    for a in out:
        rows, cols = np.flatnonzero(a.any(axis=(0, 2))), np.flatnonzero(a.any(axis=(0, 1)))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        inside = a[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert (inside > 0).mean() > 0.9             # one filled rectangle, the same in both channels' span
        assert not a[:, :rows[0]].any() and not a[:, rows[-1] + 1:].any() and h < H and w < W
        areas.append(h * w / (H * W))
        ratios.append(h / w)
    lo, hi = data.ERASE_AREA
    assert lo / 2 < min(areas) and max(areas) < hi * 1.3 and np.mean(areas) == pytest.approx((lo + hi) / 2, abs=0.03)
    assert np.median(np.log(ratios)) == pytest.approx(0.0, abs=0.15)       # tall and wide alike
    assert min(ratios) < 0.6 and max(ratios) > 1.6


def test_random_erasing_happens_with_its_probability_and_only_when_asked():
    images = np.random.default_rng(1).integers(0, 256, (2000, 1, 28, 28)).astype(np.uint8)
    out = images.copy()
    erased = data.erase_rectangles(out, 0.3, np.random.default_rng(2))
    assert erased.mean() == pytest.approx(0.3, abs=0.03)
    changed = (out != images).any(axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, erased)
    labels = np.zeros(2000, int)
    plain = data.DataLoader(images, labels, 100, (0,), (1,), shuffle=True, augment=True, pad=0, seed=3)
    erasing = data.DataLoader(images, labels, 100, (0,), (1,), shuffle=True, augment=True, pad=0, seed=3, erase=0.3)
    (a, _), (b, _) = next(iter(plain)), next(iter(erasing))
    differs = (a != b).any(axis=(1, 2, 3))
    assert 0.15 < differs.mean() < 0.45          # the same crops and flips, then some images erased
    b_again, _ = next(erasing.epoch(0))
    np.testing.assert_array_equal(b, b_again)     # an epoch's batches depend on the seed and the epoch only
    with pytest.raises(ValueError, match=r"erase is a probability, expected a number in \[0, 1\], got 1.5"):
        data.DataLoader(images, labels, 100, (0,), (1,), augment=True, erase=1.5)


def test_loader_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"expected images \(N, C, H, W\) and labels \(N,\)"):
        data.DataLoader(np.zeros((3, 28, 28)), np.zeros(3), 2, (0,), (1,))


# ------------------------------------------------------------------------------------------------ what is checked
@pytest.mark.parametrize("labels, dtype, message", [
    ([0, 1, -3, 2] * 5, np.int8, r"labels must be 0..9 for 10 classes, got -3..2"),
    ([0.5, 1.7] * 10, np.float32, r"labels must be integers, got float32"),
    ([0, 10] * 10, np.uint8, r"labels must be 0..9 for 10 classes, got 0..10"),
])
def test_labels_are_checked_when_read(tmp_path, labels, dtype, message):
    folder = write_idx_pair(tmp_path / "mnist")
    data.write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels, dtype)
    with pytest.raises(data.DataError, match=f"t10k-labels-idx1-ubyte.gz: {message}"):
        data.load_dataset("mnist", tmp_path, allow_download=False, verify=False)


def test_cifar_labels_are_checked_too():
    raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1.5, 2.0]}, protocol=2)
    with pytest.raises(data.DataError, match="labels must be integers, got float64"):
        data.read_cifar_batch(raw)


def test_local_files_must_be_the_published_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    write_idx_pair(tmp_path / "mnist")  # MNIST's file names, other contents (as Fashion-MNIST's would be)
    with pytest.raises(data.DataError, match=r"mnist/train-images-idx3-ubyte.gz: not the published mnist file "
                                             r"\(its SHA-256 differs\); .* pass --no-verify"):
        data.load_dataset("mnist", tmp_path, allow_download=False)
    assert data.load_dataset("mnist", tmp_path, allow_download=False, verify=False).train_images.shape[0] == 20


def test_a_named_data_dir_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIVIT_DATA", str(write_idx_pair(tmp_path / "env")))  # would be found next
    with pytest.raises(data.DataError, match=f"the data folder {tmp_path / 'typo'} does not exist"):
        data.load_dataset("mnist", tmp_path / "typo", allow_download=False, verify=False)


def test_a_partial_data_set_lists_only_the_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = write_idx_pair(tmp_path / "mnist")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist", tmp_path, allow_download=False)
    assert str(info.value).endswith(f"{folder} holds 2 of its 4 files; missing: train-labels-idx1-ubyte.gz, "
                                    "t10k-images-idx3-ubyte.gz")


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = data.DATASETS["mnist"]
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetInfo(
        "mnist", info.classes, info.shape, info.mean, info.std, info.files, info.sha256, ("http://127.0.0.1:9/",)))
    (tmp_path / "data").mkdir()
    for data_dir in (tmp_path / "data", None):
        with pytest.raises(data.DataError, match="could not be downloaded"):
            data.load_dataset("mnist", data_dir, progress=False)
    assert list((tmp_path / "data").iterdir()) == [] and not (tmp_path / "cache").exists()


def test_known_good_copies_are_accepted_and_nothing_else():
    info = data.DATASETS["fashion-mnist"]
    name = "train-labels-idx1-ubyte.gz"
    assert info.is_known(name, info.sha256[name]) and info.is_known(name, info.repacked_sha256[name])
    assert not info.is_known(name, data.DATASETS["mnist"].sha256[name]) and not info.is_known(name, None)


@pytest.mark.skipif(not (data.DEBIAN_DIR / "fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debians_fashion_mnist_is_accepted_and_is_not_mnist(monkeypatch):
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    ds = data.load_dataset("fashion-mnist", allow_download=False)
    assert ds.folder == data.DEBIAN_DIR / "fashion-mnist" and np.bincount(ds.train_labels).tolist() == [6000] * 10
    monkeypatch.setenv("MINIVIT_DATA", str(data.DEBIAN_DIR / "fashion-mnist"))  # issue 18, item 6
    with pytest.raises(data.DataError, match="not the published mnist file"):
        data.load_dataset("mnist", allow_download=False)

"""Image datasets: Fashion-MNIST (default), MNIST, CIFAR-10 and an embedded Fashion-MNIST subset.

Files are looked up in this order: an explicit ``data_dir``, then ``$MINIVIT_DATA``, then the Debian package's
folder (``apt-get install dataset-fashion-mnist`` gives /usr/share/datasets/fashion-mnist), then the user cache
(``~/.cache/minivit``). Each of these may hold the files directly or in a sub-folder named after the dataset. If
none has them, they are downloaded into ``data_dir`` (or the cache): checked against SHA-256, written under a
temporary name and renamed only when complete. Files found locally are checked against the same SHA-256 (unless
``verify=False``), and labels must be integers in range, so a wrong or damaged file is an error before training.

IDX files (MNIST, Fashion-MNIST) are read with nothing but gzip and NumPy; CIFAR-10's python batches are read
straight from the archive with an unpickler that accepts only the plain types those batches contain.
"""

import gzip
import hashlib
import io
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minivit.devices import get_array_module
from minivit.rundir import make_folders, remove_empty_folders

EMBEDDED_DIR = Path(__file__).parent / "datasets"
DEBIAN_DIR = Path("/usr/share/datasets")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset before reading it."""
    name: str
    classes: tuple
    shape: tuple                   # (C, H, W) of one image
    mean: tuple                    # per-channel mean and std of the training pixels in [0, 1]
    std: tuple
    files: tuple                   # file names to find (all of them, in one folder)
    sha256: dict                   # file name -> SHA-256 of the canonical download
    urls: tuple = ()               # base URLs to download the files from, tried in order
    embedded: bool = False         # ships inside the package
    repacked_sha256: dict = field(default_factory=dict)  # SHA-256 of known-good copies packaged otherwise
    train_size: int = 0            # images in the published training split

    def is_known(self, filename, digest):
        """Whether ``digest`` is the SHA-256 of the published ``filename`` or of a known-good copy of it."""
        return digest in (self.sha256.get(filename), self.repacked_sha256.get(filename))


DATASETS = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", FASHION_CLASSES, (1, 28, 28), (0.2860,), (0.3530,),
        IDX_FILES["train"] + IDX_FILES["test"],
        {"train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
         "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
         "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
         "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"},
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        # Debian's dataset-fashion-mnist recompresses the same images and labels (the embedded subset is cut from it)
        repacked_sha256={
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"},
        train_size=60000),
    "mnist": DatasetInfo(
        "mnist", tuple(str(i) for i in range(10)), (1, 28, 28), (0.1307,), (0.3081,),
        IDX_FILES["train"] + IDX_FILES["test"],
        {"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        train_size=60000),
    "cifar10": DatasetInfo(
        "cifar10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("cifar-10-python.tar.gz",),
        {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
        ("https://www.cs.toronto.edu/~kriz/",), train_size=50000),
    "fashion-mnist-mini": DatasetInfo(
        "fashion-mnist-mini", FASHION_CLASSES, (1, 28, 28), (0.2860,), (0.3530,),
        IDX_FILES["train"] + IDX_FILES["test"],
        {"train-images-idx3-ubyte.gz": "b240910d2f9a3dad10993db98ccd0cce3dd9149f4e70b24a0b03b57d41908dae",
         "train-labels-idx1-ubyte.gz": "ae0d767c2f6dbbdea3abe9cbf56dacf5c2069a5513b4a9e0ff10b1923bc33661",
         "t10k-images-idx3-ubyte.gz": "04516f9d284037ea6cce7310aafaed77e8f8c1547f1127ef4aa754c46f47f8f5",
         "t10k-labels-idx1-ubyte.gz": "540f63e62544edb8406d1292429a47e6cdb42e4fa2eaa233f072b34e1f6bc46c"},
        embedded=True, train_size=5000),
}


class DataError(Exception):
    """A dataset file is missing, truncated or not what it claims to be."""


# ------------------------------------------------------------------------------------------------ IDX
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path):
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: not a complete gzip file ({e}); delete it and fetch it again") from e
    return raw


def read_idx(path):
    """Read an IDX file (optionally .gz) into a NumPy array, checking its header against its size.

    IDX: two zero bytes, a type code, the number of dimensions n, n big-endian uint32 sizes, then the data.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>, "
                        f"got {data[:4].hex(' ') or 'an empty file'})")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes, expected at least {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header promises shape {shape} ({expected} bytes of data) but the file holds "
                        f"{len(data) - header} bytes: it is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array, dtype=np.uint8):
    """Write an array as a gzipped IDX file (the format of MNIST and Fashion-MNIST) of one of IDX's types:
    uint8 (MNIST's), int8, int16, int32, float32 or float64, stored big-endian."""
    codes = {np.dtype(t): code for code, t in _IDX_TYPES.items()}
    stored = np.dtype(dtype).newbyteorder(">")
    if stored not in codes:
        raise ValueError(f"write_idx: IDX has no type for {np.dtype(dtype)}")
    array = np.ascontiguousarray(array, dtype=stored)
    header = bytes([0, 0, codes[stored], array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with open(path, "wb") as f:  # mtime=0: the same array always gives the same bytes
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
            gz.write(header + array.tobytes())


def _load_idx_pair(folder, split, info):
    images_file, labels_file = IDX_FILES[split]
    images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
    if images.ndim != 3 or images.shape[1:] != info.shape[1:]:
        raise DataError(f"{folder / images_file}: expected images of shape (N, {info.shape[1]}, {info.shape[2]}), "
                        f"got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{folder / images_file}: expected uint8 pixels (IDX type 0x08), got {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise DataError(f"{folder / labels_file}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images[:, None], checked_labels(labels, len(info.classes), folder / labels_file)


def checked_labels(labels, num_classes, source):
    """``labels`` as int64, after checking that they are integers from 0 to num_classes - 1 (DataError if not)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must be 0..{num_classes - 1} for {num_classes} classes, got "
                        f"{labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------------------------ CIFAR-10
class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches and refuses everything else, so no file can run code."""

    def find_class(self, module, name):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            from numpy._core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles from Python 3 spell bytes
            import codecs
            return codecs.encode
        raise DataError(f"refers to {module}.{name}, which a CIFAR-10 batch never needs")


def read_cifar_batch(raw, source="CIFAR-10 batch"):
    """Parse one CIFAR-10 python batch (bytes) into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{source}: {e}") from e
    except Exception as e:
        raise DataError(f"{source}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{source}: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
        raise DataError(f"{source}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), checked_labels(labels, 10, source)


def read_cifar10(archive):
    """Read the train and test splits from ``cifar-10-python.tar.gz`` without extracting it."""
    archive = Path(archive)
    members = {"train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
               "test": ["cifar-10-batches-py/test_batch"]}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            splits = {}
            for split, names in members.items():
                parts = []
                for name in names:
                    try:
                        raw = tar.extractfile(name).read()
                    except KeyError as e:
                        raise DataError(f"{archive}: member {name} is missing") from e
                    parts.append(read_cifar_batch(raw, f"{archive}:{name}"))
                splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise DataError(f"{archive}: not a complete tar.gz archive ({e}); delete it and fetch it again") from e
    return splits


# ------------------------------------------------------------------------------------------------ finding files
def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minivit"


def candidate_dirs(info, data_dir=None):
    """Folders that may hold ``info``'s files, in lookup order."""
    if info.embedded:
        return [EMBEDDED_DIR / info.name]
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("MINIVIT_DATA"):
        roots.append(Path(os.environ["MINIVIT_DATA"]))
    roots.append(DEBIAN_DIR)
    roots.append(cache_dir())
    found = []
    for root in roots:
        found.extend([root / info.name, root] if root != DEBIAN_DIR else [root / info.name])
    return found


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, dest, sha256=None, progress=True, timeout=30):
    """Fetch ``url`` to ``dest``: into ``dest.part`` first, checked against ``sha256``, then renamed.

    A failed or mismatched download leaves nothing at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            while block := response.read(1 << 16):
                out.write(block)
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DataError(f"{url}: SHA-256 mismatch (expected {sha256}, got {digest.hexdigest()}); "
                            "the file was not kept")
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    return dest


def locate(name, data_dir=None, allow_download=True, progress=True):
    """The folder holding all files of dataset ``name``, downloading them if they are nowhere to be found.

    A ``data_dir`` that is given must exist. A failed download leaves no empty folder behind.
    """
    info = dataset_info(name)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"the data folder {data_dir} does not exist (--data-dir); create it, or leave --data-dir "
                        "out to look in the usual places")
    candidates = candidate_dirs(info, data_dir)
    for folder in candidates:
        if all((folder / f).is_file() for f in info.files):
            return folder
    if info.embedded:
        raise DataError(f"the embedded dataset {name} is missing from {candidates[0]}: reinstall minivit")
    if not allow_download:
        raise DataError(f"{name} not found; {_what_is_missing(info, candidates)}")
    target = (Path(data_dir) if data_dir is not None else cache_dir()) / info.name
    created = make_folders(target)
    errors = []
    for filename in info.files:
        if (target / filename).is_file():
            continue
        for base in info.urls:
            try:
                download(base + filename, target / filename, info.sha256.get(filename), progress=progress)
                break
            except (urllib.error.URLError, OSError, DataError) as e:
                errors.append(f"{base + filename}: {e}")
        else:
            remove_empty_folders(created)
            raise DataError(f"{name} not found and could not be downloaded ({'; '.join(errors)}); "
                            f"{_what_is_missing(info, candidates)}")
    return target


def _what_is_missing(info, candidates):
    """Where to put which files: the missing ones of the folder that holds some, or all of them."""
    counts = [sum((folder / f).is_file() for f in info.files) for folder in candidates]
    fullest = candidates[counts.index(max(counts))]
    if max(counts):
        missing = [f for f in info.files if not (fullest / f).is_file()]
        return f"{fullest} holds {max(counts)} of its {len(info.files)} files; missing: {', '.join(missing)}"
    return (f"put {', '.join(info.files)} in one of: " + ", ".join(str(c) for c in candidates)
            + (" (or: apt-get install dataset-fashion-mnist)" if info.name == "fashion-mnist" else ""))


def dataset_info(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class Dataset:
    """Both splits of a dataset as uint8 images (N, C, H, W) and int64 labels (N,), and a validation split when
    one was held out of the training images."""
    info: DatasetInfo
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    folder: Path
    val_images: np.ndarray = None
    val_labels: np.ndarray = None


def load_dataset(name="fashion-mnist", data_dir=None, allow_download=True, progress=True, verify=True):
    """Find (or fetch) and read a dataset; see the module docstring for where files are looked for.

    With ``verify`` (and always for the embedded subset) each file must have the SHA-256 of the published one, so
    that another data set's files of the same names (MNIST and Fashion-MNIST share them) are never read in its
    place. ``verify=False`` reads your own files.
    """
    info = dataset_info(name)
    folder = locate(name, data_dir, allow_download, progress)
    if verify or info.embedded:
        for filename in info.files:
            if not info.is_known(filename, sha256_of(folder / filename)):
                raise DataError(f"{folder / filename}: not the published {name} file (its SHA-256 differs); "
                                + ("reinstall minivit" if info.embedded else
                                   "is it another data set's? To train on your own files, pass --no-verify"))
    if name == "cifar10":
        splits = read_cifar10(folder / info.files[0])
        return Dataset(info, *splits["train"], *splits["test"], folder)
    return Dataset(info, *_load_idx_pair(folder, "train", info), *_load_idx_pair(folder, "test", info), folder)


def write_class_balanced_subset(source_dir, out_dir, train_per_class, test_per_class, num_classes=10):
    """Write the first ``k`` images of every class of each split of an IDX dataset, in their original order.

    This is how the embedded ``fashion-mnist-mini`` was made from the Fashion-MNIST files.
    """
    info = DatasetInfo("subset", tuple(range(num_classes)), (1, 28, 28), (0,), (1,), (), {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = _load_idx_pair(Path(source_dir), split, info)
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]))
        images_file, labels_file = IDX_FILES[split]
        write_idx(out_dir / images_file, images[keep, 0])
        write_idx(out_dir / labels_file, labels[keep])


# ------------------------------------------------------------------------------------------------ batches
ERASE_AREA = (0.02, 1.0 / 3.0)     # share of the image a random erasing rectangle covers
ERASE_RATIO = (0.3, 1.0 / 0.3)     # its height / width, drawn log-uniformly
ERASE_TRIES = 10                   # rectangles drawn before an image is left as it is


def erase_rectangles(images, p, rng):
    """Random erasing (Zhong et al., AAAI 2020), in place: each image, with probability ``p``, has one rectangle
    overwritten with uniform random pixel values (all channels), so that no single part of an object can be
    relied on.

    The rectangle covers a share of the image drawn uniformly from ``ERASE_AREA``, with a height-to-width ratio
    drawn log-uniformly from ``ERASE_RATIO`` (tall and wide equally likely); a rectangle that does not fit in
    the image is drawn again, up to ``ERASE_TRIES`` times. Its position is uniform among those where it fits.

    Args:
        images: uint8 (B, C, H, W), changed in place.
        p: probability in [0, 1].
        rng: a ``numpy.random.Generator``.
    Returns:
        bool (B,): which images were erased.
    """
    B, C, H, W = images.shape
    erased = np.zeros(B, dtype=bool)
    for b in np.flatnonzero(rng.random(B) < p):
        for _ in range(ERASE_TRIES):
            area = H * W * rng.uniform(*ERASE_AREA)
            ratio = math.exp(rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < h < H and 0 < w < W:
                top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
                images[b, :, top:top + h, left:left + w] = rng.integers(0, 256, (C, h, w), dtype=np.uint8)
                erased[b] = True
                break
    return erased


def shift_images(x, dy, dx, fill):
    """x moved by ``dy`` pixels down and ``dx`` right (negative: up, left), the pixels moved in set to ``fill``.

    Args:
        x: (B, C, H, W), NumPy or CuPy.
        dy, dx: whole numbers, each smaller in size than the image's side.
        fill: a scalar or (C,) per-channel values (for normalised images, the normalised background).
    Returns:
        a new array of x's shape and dtype.
    """
    B, C, H, W = x.shape
    if abs(dy) >= H or abs(dx) >= W:
        raise ValueError(f"shift_images: a shift of ({dy}, {dx}) pixels leaves nothing of {H}x{W} images")
    xp = get_array_module(x)
    out = xp.empty_like(x)
    out[...] = xp.asarray(fill, dtype=x.dtype).reshape(-1, 1, 1)
    out[:, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        x[:, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


class DataLoader:
    """Batches of normalised float32 images and int64 labels, shuffled with a seed that depends on the epoch.

    Args:
        images: uint8 (N, C, H, W).
        labels: int (N,).
        batch_size: images per batch.
        mean, std: per-channel statistics of pixels in [0, 1], used to normalise.
        shuffle: visit the images in a new order each epoch (the order of epoch e depends only on seed and e,
            so a resumed run sees the same batches).
        augment: random crop after zero padding of ``pad`` pixels and, with ``flip``, random horizontal flips;
            then, with ``erase`` > 0, random erasing (see ``erase_rectangles``).
        erase: with ``augment``, the probability that an image has a rectangle overwritten with random pixels.
        drop_last: leave out a last, smaller batch.
    """

    def __init__(self, images, labels, batch_size, mean, std, shuffle=False, seed=0, augment=False, pad=4,
                 flip=True, erase=0.0, drop_last=False):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"DataLoader: expected images (N, C, H, W) and labels (N,), got {images.shape} "
                             f"and {labels.shape}")
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be positive, got {batch_size}")
        if not 0.0 <= erase <= 1.0:
            raise ValueError(f"DataLoader: erase is a probability, expected a number in [0, 1], got {erase}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, -1, 1, 1)
        self.shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, -1, 1, 1)
        self.shuffle, self.seed, self.augment, self.pad, self.flip = shuffle, seed, augment, pad, flip
        self.erase = erase
        self.drop_last = drop_last

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalize(self, images):
        """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std."""
        return images.astype(np.float32) * self.scale - self.shift

    def _augment(self, images, rng):
        B, C, H, W = images.shape
        p = self.pad
        padded = np.zeros((B, C, H + 2 * p, W + 2 * p), dtype=images.dtype)
        padded[:, :, p:p + H, p:p + W] = images
        dy, dx = rng.integers(0, 2 * p + 1, B), rng.integers(0, 2 * p + 1, B)
        rows = dy[:, None] + np.arange(H)                           # (B, H)
        cols = dx[:, None] + np.arange(W)                           # (B, W)
        out = padded[np.arange(B)[:, None, None, None], np.arange(C)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            flipped = rng.random(B) < 0.5
            out[flipped] = out[flipped, :, :, ::-1]
        if self.erase:                      # (no draws without it: the batches of earlier runs stay the same)
            erase_rectangles(out, self.erase, rng)
        return out

    def epoch(self, epoch=0):
        """Yield (images float32 (B, C, H, W), labels int64 (B,)) for one pass over the data."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.images)) if self.shuffle else np.arange(len(self.images))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            images = self.images[idx]
            if self.augment:
                images = self._augment(images, rng)
            yield self.normalize(images), self.labels[idx]

    __iter__ = epoch

"""Build the Fashion-MNIST subset that ships with tokenmixers (``data=fashion``) from the original files.

The original idx files come with the Debian package ``dataset-fashion-mnist``::

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fm
    python scripts/build_fashion_subset.py fm/usr/share/datasets/fashion-mnist

The subset takes the first ``--train-per-class`` images of each class from the training file (the
file's order is already random) and the first ``--val-per-class`` images of each class from the test
file, keeping the file order. The output is an ``.npz`` (read with ``numpy.load``) holding
``train_images``/``val_images`` (N, 28, 28) uint8 and ``train_labels``/``val_labels`` (N,) uint8,
each member LZMA-compressed with a fixed timestamp, so the same input always gives the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "tokenmixers" / "datasets" / "fashion_mnist.npz"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: a big-endian header, then the data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in file order."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` with LZMA-compressed members and fixed timestamps (byte-reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            archive.writestr(info, member.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    def load(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        def find(kind: str) -> Path:
            matches = sorted(args.source.glob(f"{prefix}-{kind}-ubyte*"))
            if not matches:
                raise SystemExit(f"{args.source} has no {prefix}-{kind}-ubyte[.gz]")
            return matches[0]

        return read_idx(find("images-idx3")), read_idx(find("labels-idx1"))

    arrays = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("val", "t10k", args.val_per_class)):
        images, labels = load(prefix)
        keep = first_per_class(labels, per_class)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
        print(f"{split}: {len(keep)} images from {prefix} ({np.bincount(labels[keep]).tolist()} per class)")
    write_npz(args.output, arrays)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()

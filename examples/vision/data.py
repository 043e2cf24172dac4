"""The data: scikit-learn's digits (shipped with the package, nothing downloaded) as uint8 images, one split.

1797 greyscale 8x8 images of handwritten digits, 10 classes, pixel values 0..16 scaled to 0..255 (uint8, what a
PNG holds and a client sends). Split once, stratified, 80/20 (``random_state=0``): 1437 training, 360 test
images; every model of the run (ours, the baselines) sees exactly this split. ``limit`` keeps the first n images
of each part (the miniature test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA_FILE = "data.npz"


def load_digits_uint8(test_size: float = 0.2, random_state: int = 0) -> dict[str, np.ndarray]:
    """{"x_train", "y_train", "x_test", "y_test"}: images uint8 [N, 8, 8], labels int64 [N]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=test_size,
                                                        random_state=random_state, stratify=labels)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def prepare(run_dir: Path, limit: int = 0) -> Path:
    """Write the split to ``run_dir/data.npz``; returns its path."""
    split = load_digits_uint8()
    if limit:
        split = {k: v[:limit] for k, v in split.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / DATA_FILE
    np.savez_compressed(path, **split)
    return path


def load(run_dir: Path) -> dict[str, np.ndarray]:
    path = run_dir / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python examples/vision/run.py prepare` first")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}

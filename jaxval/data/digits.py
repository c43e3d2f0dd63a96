"""scikit-learn's bundled 8×8 digits (1,797 images, no download)."""

from __future__ import annotations

import numpy as np


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Digits split at random into train / test.

    Returns a dict with ``x_train`` float32 [N, 64] in [0, 1] (pixels / 16), ``y_train`` int32 [N],
    ``x_test``, ``y_test``, ``images_train`` / ``images_test`` float32 [N, 8, 8] (same values), and
    ``idx_train`` / ``idx_test`` (int64 row numbers in sklearn's order, usable as store ids).
    The split is a plain permutation by ``np.random.default_rng(seed)``; the test set has
    ``round(test_fraction · 1797)`` images.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    d = _sk_load_digits()
    images = (np.asarray(d.images, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(d.target, dtype=np.int32)
    n = images.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(float(test_fraction) * n))
    idx_test, idx_train = perm[:n_test], perm[n_test:]
    return {
        "x_train": images[idx_train].reshape(-1, 64),
        "y_train": labels[idx_train],
        "x_test": images[idx_test].reshape(-1, 64),
        "y_test": labels[idx_test],
        "images_train": images[idx_train],
        "images_test": images[idx_test],
        "idx_train": idx_train.astype(np.int64),
        "idx_test": idx_test.astype(np.int64),
    }

"""Dataset loaders (numpy only): scikit-learn digits, MNIST-style IDX files, text corpora.

Offline data live in a *data directory*, resolved by :func:`data_dir`: an explicit argument, else the
environment variable ``JAXVAL_DATA``, else ``../shared/data`` relative to the current working directory
(if it exists). Expected layout::

    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    fashion-mnist/(same names)
    tinyshakespeare/input.txt
    wikitext-2/{valid,test}.txt
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

ENV_VAR = "JAXVAL_DATA"
DEFAULT_RELATIVE = os.path.join("..", "shared", "data")


def data_dir(path: str | os.PathLike | None = None, expect: Sequence[str] = ()) -> Path:
    """Resolve the data directory: ``path`` > ``$JAXVAL_DATA`` > ``./../shared/data`` (if it exists).

    ``expect``: relative paths of files that must exist inside it. Raises ``FileNotFoundError`` naming
    the directory tried, the missing files and the environment variable when something is missing.
    """
    if path is not None:
        base, source = Path(path).expanduser(), "the data_dir argument"
    elif os.environ.get(ENV_VAR):
        base, source = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        base, source = Path.cwd() / DEFAULT_RELATIVE, f"the default {DEFAULT_RELATIVE} (relative to the cwd)"
        if not base.is_dir():
            raise FileNotFoundError(
                f"no data directory: ${ENV_VAR} is not set and the default {base} does not exist. "
                f"Set {ENV_VAR}=/path/to/data or pass data_dir=..."
                + (f"; it must contain {', '.join(expect)}" if expect else ""))
    if not base.is_dir():
        raise FileNotFoundError(f"data directory {base} (from {source}) does not exist; set {ENV_VAR} or "
                                "pass data_dir=... pointing to the folder with the datasets"
                                + (f" (expected files: {', '.join(expect)})" if expect else ""))
    missing = [e for e in expect if not (base / e).exists()]
    if missing:
        raise FileNotFoundError(f"data directory {base} (from {source}) lacks {', '.join(missing)}; "
                                f"put the files there, or set {ENV_VAR} / pass data_dir=... to a folder "
                                "that has them")
    return base.resolve()


from jaxval.data.digits import load_digits  # noqa: E402
from jaxval.data.idx import load_idx_dataset, read_idx  # noqa: E402
from jaxval.data.text import CharTokenizer, WordTokenizer, load_text, make_blocks  # noqa: E402

__all__ = ["data_dir", "ENV_VAR", "load_digits", "load_idx_dataset", "read_idx", "load_text",
           "CharTokenizer", "WordTokenizer", "make_blocks"]

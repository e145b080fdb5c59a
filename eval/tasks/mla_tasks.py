"""Datasets of the local lm-eval tasks in this folder (``lm_eval --include_path eval/tasks``).

Each function is a task's ``custom_dataset``: it prepares the data on first use (download + cache, see
``eval.bigbench`` and ``convert.data``) and returns a ``datasets.DatasetDict`` with a ``test`` split.
"""

import sys
from pathlib import Path

try:
    import eval.bigbench  # noqa: F401  (the project is installed)
except ImportError:  # used from a clone: the repository root holds the packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import datasets

from convert.data import load_texts
from eval.bigbench import load_docs


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def bbc_tech(**kwargs) -> datasets.DatasetDict:
    """The 401 BBC tech articles (2004-05), never used for calibration or training (Brown is)."""
    return _split([{"id": i, "text": t.strip()} for i, t in enumerate(load_texts("bbc:tech"))])


def winogrande(**kwargs) -> datasets.DatasetDict:
    return _split(load_docs("winogrande"))


def social_iqa(**kwargs) -> datasets.DatasetDict:
    return _split(load_docs("social_iqa"))


def goal_step(**kwargs) -> datasets.DatasetDict:
    return _split(load_docs("goal_step"))


def timedial(**kwargs) -> datasets.DatasetDict:
    return _split(load_docs("timedial"))

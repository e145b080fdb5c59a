"""The user cache folder for downloaded models and data (never inside the repo)."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$MLA_RETROFIT_CACHE`` or ``$XDG_CACHE_HOME/mla-retrofit`` or ``~/.cache/mla-retrofit``, joined with parts."""
    root = os.environ.get("MLA_RETROFIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mla-retrofit")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

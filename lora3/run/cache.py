"""Where the app caches what it builds once: trained tokenizers, the trained base, converted GGUF presets."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$LORA3_CACHE`, else `$XDG_CACHE_HOME/lora3`, else `~/.cache/lora3` (the config's `cache_dir: null`)."""
    if os.environ.get("LORA3_CACHE"):
        return Path(os.environ["LORA3_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora3"

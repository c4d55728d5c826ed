"""Where paretoray keeps what it builds once: models de-quantized or distilled, profiles, samples."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$PARETORAY_CACHE`, default `~/.cache/paretoray`."""
    return Path(os.environ.get("PARETORAY_CACHE", Path.home() / ".cache" / "paretoray"))

"""Where xpack keeps its cache (the materialized demo model, downloaded files)."""

import os
from pathlib import Path


def cache_home() -> Path:
    """``$XPACK_HOME``, else ``$XDG_CACHE_HOME/xpack``, else ``~/.cache/xpack``."""
    if os.environ.get("XPACK_HOME"):
        return Path(os.environ["XPACK_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "xpack"

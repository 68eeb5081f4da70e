"""Adapter paths given by users: a local path that holds no adapter is named as such, before any loader turns it into
a hub-id validation error."""

from __future__ import annotations

import os
from typing import Optional, Union


def _looks_local(path: str) -> bool:
    """True unless ``path`` can only be a hub id ("owner/name" whose first part is not a local directory)."""
    if os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") != 1:
        return True
    return os.path.isdir(path.split("/", 1)[0])


def require_adapter_dirs(paths: Union[str, list, None], key: str = "adapter_name_or_path",
                         subfolder: Optional[str] = None) -> None:
    """Every local path of ``paths`` (comma-separated, or the list LLaMA-Factory makes of it) must be a directory with
    an adapter_config.json (in ``subfolder`` of it when given: LLaMA-Factory's `adapter_folder`)."""
    items = paths.split(",") if isinstance(paths, str) else (paths or [])
    for path in [p.strip() for p in items if p.strip()]:
        expanded = os.path.join(os.path.expanduser(path), subfolder or "")
        if _looks_local(path) and not os.path.isfile(os.path.join(expanded, "adapter_config.json")):
            what = "no adapter_config.json in" if os.path.isdir(expanded) else "no such directory:"
            raise FileNotFoundError(f"no adapter at {path} (`{key}`: {what} {os.path.abspath(expanded)})")

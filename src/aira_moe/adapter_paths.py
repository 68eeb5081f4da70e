"""Adapter paths given by users: a local path that holds no adapter is named as such, before any loader turns it into
a hub-id validation error, and an adapter whose files are truncated or corrupt (a run killed while saving, a broken
copy) is named, file by file, before any model is loaded. No torch import: the CLIs call this first."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Optional, Union

from .errors import MissingFileError, UserError

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterFileError(UserError):
    """A file of a saved adapter (or checkpoint) is truncated or corrupt; the message names it."""


def _looks_local(path: str) -> bool:
    """True unless ``path`` can only be a hub id ("owner/name" whose first part is not a local directory)."""
    if os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") != 1:
        return True
    return os.path.isdir(path.split("/", 1)[0])


def _bad(path: str, why: str) -> AdapterFileError:
    return AdapterFileError(f"corrupt adapter file {os.path.abspath(path)}: {why}; re-save or re-copy the adapter")


def read_json_file(path: str) -> dict:
    """The JSON object in ``path``; AdapterFileError naming the file when it is empty, truncated or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _bad(path, f"not valid JSON ({' '.join(str(error).split())})") from None
    if not isinstance(value, dict):
        raise _bad(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def check_safetensors_file(path: str) -> None:
    """The safetensors layout: an 8-byte header length, a JSON header, then exactly the bytes the header's offsets
    cover -- so a truncated file or a damaged header is caught without reading the tensors (a flipped bit inside the
    tensor data is not: the format has no checksum)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _bad(path, f"{size} bytes, shorter than the 8-byte safetensors header length")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            raise _bad(path, f"header length {header_size} exceeds the file ({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad(path, "the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "the safetensors header is not a JSON object")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if len(ends) != len([name for name in header if name != "__metadata__"]):
        raise _bad(path, "a tensor entry of the safetensors header has no data_offsets")
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        raise _bad(path, f"{size} bytes, but its header describes {expected}: truncated")


def check_adapter_files(directory: str) -> None:
    """Every file a loader will read from a saved adapter directory parses: adapter_config.json (a JSON object with a
    peft_type), the weights (safetensors layout and length, or the .bin's zip checksums), and aira_moe_allocation.json
    when present. Raises AdapterFileError naming the first bad file."""
    config = read_json_file(os.path.join(directory, "adapter_config.json"))
    if "peft_type" not in config:
        raise _bad(os.path.join(directory, "adapter_config.json"), "no `peft_type` key")
    weights = [os.path.join(directory, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
    if not weights:
        raise MissingFileError(f"no adapter weights in {os.path.abspath(directory)} ({' or '.join(WEIGHT_FILES)})")
    if weights[0].endswith(".safetensors"):
        check_safetensors_file(weights[0])
    else:
        try:
            with zipfile.ZipFile(weights[0]) as archive:  # torch.save's format; testzip checks every member's CRC
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            raise _bad(weights[0], f"not a readable torch archive ({error})") from None
        if broken is not None:
            raise _bad(weights[0], f"member {broken} fails its checksum")
    from .calibration.report import REPORT_JSON

    report = os.path.join(directory, REPORT_JSON)
    if os.path.isfile(report):
        read_json_file(report)


def require_adapter_dirs(paths: Union[str, list, None], key: str = "adapter_name_or_path",
                         subfolder: Optional[str] = None) -> None:
    """Every local path of ``paths`` (comma-separated, or the list LLaMA-Factory makes of it) must be a directory with
    an adapter_config.json (in ``subfolder`` of it when given: LLaMA-Factory's `adapter_folder`) and intact files."""
    items = paths.split(",") if isinstance(paths, str) else (paths or [])
    for path in [p.strip() for p in items if p.strip()]:
        if not _looks_local(path):
            continue
        expanded = os.path.join(os.path.expanduser(path), subfolder or "")
        if not os.path.isfile(os.path.join(expanded, "adapter_config.json")):
            what = "no adapter_config.json in" if os.path.isdir(expanded) else "no such directory:"
            raise MissingFileError(f"no adapter at {path} (`{key}`: {what} {os.path.abspath(expanded)})")
        check_adapter_files(expanded)


def adapter_strategy(path: str, subfolder: Optional[str] = None):
    """The collaboration strategy of the local aira_moe adapter at ``path`` (in its ``subfolder``, LLaMA-Factory's
    ``adapter_folder``, when set); None for another adapter type or a path that holds no local adapter."""
    from .tuner._registry import PEFT_TYPE_NAME
    from .tuner.config import AiraMoeConfig
    from .tuner.strategies import get_strategy

    config_path = os.path.join(os.path.expanduser(path), subfolder or "", "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    config = read_json_file(config_path)
    if config.get("peft_type") != PEFT_TYPE_NAME:
        return None
    return get_strategy(config.get("cola_strategy", AiraMoeConfig.cola_strategy))


def token_dependent_adapters(paths, subfolder: Optional[str] = None) -> list[str]:
    """The local aira_moe adapters among ``paths`` (see ``adapter_strategy``) whose update depends on the token
    ('routed'): never merged."""
    return [path for path in paths or [] if getattr(adapter_strategy(path, subfolder), "token_dependent", False)]

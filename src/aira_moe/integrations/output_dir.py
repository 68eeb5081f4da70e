"""The training run's output directory: one live run at a time (a lock file naming host and PID, stale once that
process is gone) and resuming only from a complete checkpoint. Files only; no LLaMA-Factory import."""

from __future__ import annotations

import atexit
import os
import re
import socket
from typing import Optional

from .._logging import get_logger
from ..adapter_paths import AdapterFileError, check_adapter_files, read_json_file
from ..errors import UserError

logger = get_logger()


class OutputDirInUseError(UserError):
    """Another live run holds ``output_dir``'s lock file."""


LOCK_FILE = "aira_moe.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _lock_holder(path: str) -> Optional[str]:
    """Who holds the lock file at ``path`` ("PID n on host"), or None when it is absent or stale (its process, on this
    host, is gone -- e.g. killed with SIGKILL, which runs no clean-up)."""
    try:
        with open(path, encoding="utf-8") as handle:
            host, _, pid = handle.read().strip().partition(" ")
    except FileNotFoundError:
        return None
    if not pid.isdigit():
        return None  # written by a process killed before it finished the line
    if host == socket.gethostname() and not _pid_alive(int(pid)):
        return None
    return f"PID {pid} on {host}"


def lock_output_dir(directory: str, take: bool = True) -> None:
    """One training run per output_dir: take ``output_dir/aira_moe.lock`` (host and PID) for this process, released at
    exit; a second run into the same directory is refused while the first one lives. ``take=False`` only checks
    (``aira-moe check``)."""
    path = os.path.join(directory, LOCK_FILE)
    holder = _lock_holder(path)
    if holder is not None:
        raise OutputDirInUseError(
            f"`output_dir` {os.path.abspath(directory)} is being written by another run ({holder}, lock file {path}); "
            "wait for it or choose another `output_dir` (delete the lock file only if no such run exists)."
        )
    if not take:
        return
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(path):
        logger.warning("aira_moe: removing the stale lock %s (its process is gone)", path)
        os.remove(path)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another run took it between the check and here
        raise OutputDirInUseError(f"`output_dir` {os.path.abspath(directory)} was just locked by another run "
                                  f"({path}); choose another `output_dir`.") from None
    mine = f"{socket.gethostname()} {os.getpid()}"
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(mine + "\n")

    def release():
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.read().strip() == mine:
                    os.remove(path)
        except FileNotFoundError:
            pass

    atexit.register(release)


def _checkpoint_complete(path: str) -> bool:
    """The Trainer writes trainer_state.json last into a checkpoint: without a readable one the save was cut short."""
    try:
        read_json_file(os.path.join(path, "trainer_state.json"))
    except (FileNotFoundError, AdapterFileError):
        return False
    return True


def choose_complete_checkpoint(training_args) -> None:
    """Resume only from a complete checkpoint. LLaMA-Factory resumes from the highest-numbered ``checkpoint-N`` in
    output_dir, even one whose save was killed half-way; here the last complete one is chosen instead (or a clean
    start when there is none), and a named ``resume_from_checkpoint`` with a corrupt file is refused, naming it."""
    named = training_args.resume_from_checkpoint
    if isinstance(named, str):
        if not _checkpoint_complete(named):
            raise AdapterFileError(f"`resume_from_checkpoint` {os.path.abspath(named)} is incomplete (no readable "
                                   "trainer_state.json: its save was interrupted); choose an earlier checkpoint")
        check_adapter_files(named)
        return
    directory = training_args.output_dir
    if named is not None or getattr(training_args, "overwrite_output_dir", False) or not os.path.isdir(directory):
        return
    steps = sorted((int(match.group(1)), name) for name in os.listdir(directory)
                   if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(directory, name)))
    incomplete = [name for _, name in steps if not _checkpoint_complete(os.path.join(directory, name))]
    if not incomplete:
        return  # LLaMA-Factory's own choice (the last one) is complete
    complete = [name for _, name in steps if name not in incomplete]
    logger.warning("aira_moe: ignoring incomplete checkpoint(s) in %s (their save was interrupted): %s",
                   directory, ", ".join(incomplete))
    if complete:
        last = os.path.join(directory, complete[-1])
        check_adapter_files(last)
        training_args.resume_from_checkpoint = last
        logger.warning("aira_moe: resuming from the last complete checkpoint %s", last)
    else:
        training_args.resume_from_checkpoint = False  # a clean start; None would let LLaMA-Factory pick the broken one
        logger.warning("aira_moe: no complete checkpoint; training starts from the beginning")

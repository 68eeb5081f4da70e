"""The package logger: INFO to stderr unless the application configured an 'aira_moe' handler itself, so the
allocation summary shows in llamafactory-cli runs like LLaMA-Factory's own messages."""

import logging
import sys


def get_logger() -> logging.Logger:
    logger = logging.getLogger("aira_moe")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(asctime)s] aira_moe: %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger

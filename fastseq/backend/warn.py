"""Warnings attributed to the user's code.

A fastseq warning is raised deep inside the package (an op's dispatcher, a
module's forward called through ``torch.nn.Module.__call__``), so a fixed
``stacklevel`` lands on an internal frame and a user's filter such as
``warnings.filterwarnings("ignore", module="mytrainer")`` never matches.
:func:`warn` walks up the stack past every frame inside fastseq or torch and
attributes the warning to the first frame outside them: the line of the
user's code that made the call.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Set, Type

import torch

_PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (os.path.dirname(os.path.abspath(__file__)), torch.__file__)
)  # .../fastseq/ and .../torch/
_warned: Set[str] = set()


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIRS) or filename.startswith("<frozen")


def warn(message: str, category: Type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside
    fastseq and torch (and past ``<frozen ...>`` import machinery)."""
    frame = sys._getframe(1)
    level = 2  # 1 would be this function's own line; 2 its caller
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    if frame is None:  # called from fastseq/torch only (e.g. a test of the helper itself)
        level = 2
    warnings.warn(message, category, stacklevel=level)


def warn_once(key: str, message: str, category: Type[Warning] = RuntimeWarning) -> None:
    """:func:`warn`, once per process for each ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    warn(message, category)


def forget_warnings() -> None:
    """Testing aid: let every :func:`warn_once` key warn again."""
    _warned.clear()

"""Docstrings shown on a terminal (command-line help)."""

from __future__ import annotations

import re

__all__ = ["plain"]


def plain(text: str) -> str:
    """Docstring text for a terminal: reST roles and literals become plain words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")

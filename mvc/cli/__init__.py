"""The `mvc` command line: parse, call one library function, render."""

from .main import main

__all__ = ["main"]

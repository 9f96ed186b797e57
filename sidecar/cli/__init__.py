"""`sidecar ...`: the command line, an adapter (parse, one call, print)."""

from .main import main

__all__ = ["main"]

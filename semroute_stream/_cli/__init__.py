"""The command line: parses arguments, calls the library, prints. Entry point: :func:`main`."""

from .app import main

__all__ = ["main"]

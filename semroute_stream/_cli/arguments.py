"""argparse value types shared by the subcommands' parsers (``app.py``, ``tune.py``)."""

from __future__ import annotations

import argparse

__all__ = ["fraction", "oos_rate", "positive_float", "positive_int"]


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


def oos_rate(value: str) -> float:
    """``--expected-oos-rate``: a share in ``[0, 1)``."""
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (0.0 <= rate < 1.0):
        raise argparse.ArgumentTypeError(
            f"must be a share of the traffic in [0, 1) (0.2 = 20 % out-of-scope), got {value}"
        )
    return rate

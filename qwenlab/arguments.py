"""argparse types that refuse values valid to argparse but meaningless to qwenlab (NaN temperatures, negative
counts, seeds out of range), so a bad flag is a one-line usage error before anything loads."""
import argparse
import math


def bounded_int(low: int | None = None, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {_range(low, high)}")
        return value
    return parse


def bounded_float(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """A finite float in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_range(low, high, low_open)}")
        return value
    return parse


def _range(low, high, low_open: bool = False) -> str:
    left = "(" if low_open else "["
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"


SEED = bounded_int(0, 2 ** 63 - 1)
COUNT = bounded_int(1)
NON_NEGATIVE = bounded_int(0)
TEMPERATURE = bounded_float(0.0)
TOP_P = bounded_float(0.0, 1.0, low_open=True)
SECONDS = bounded_float(0.0, low_open=True)

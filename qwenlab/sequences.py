"""Token id sequences compared position by position."""


def common_prefix(a, b) -> int:
    """How many leading positions two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def first_difference(a, b) -> int | None:
    """The first position where two sequences differ (one ending early counts), None when they are equal."""
    n = common_prefix(a, b)
    return None if n == len(a) == len(b) else n

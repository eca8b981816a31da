"""Is a prompt long enough to test what depends on position? At one token RoPE rotates by angle 0 (the identity)
and the causal mask has nothing to hide, so a forward without RoPE or without the mask passes every tensor."""

MIN_TOKENS = 8
ADVICE = f"use a prompt of {MIN_TOKENS} or more tokens (a sentence, or --chat)"


def position_warning(n_tokens: int | None) -> str | None:
    """A one-line warning when `n_tokens` is too few to exercise positions; None when it is enough (or unknown)."""
    if n_tokens is None or n_tokens >= MIN_TOKENS:
        return None
    if n_tokens <= 1:
        return (f"the prompt is {n_tokens} token{'s' * (n_tokens != 1)}: RoPE at position 0 is the identity and the "
                f"causal mask hides nothing, so a forward that skips either passes; {ADVICE}")
    return (f"the prompt is only {n_tokens} tokens: RoPE and the causal mask are exercised at positions "
            f"0-{n_tokens - 1} only; {ADVICE}")

"""Coverage of a diff: how many of the reference's tensors the candidate was compared on, which are missing (not in
the candidate and not declared in its `not_produced` metadata) and the canonical names its unmatched names suggest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase

from qwenlab.activations.names import forward_order_key, sort_forward
from qwenlab.activations.suggest import suggest
from qwenlab.errors import QwenlabError

NOT_PRODUCED_KEY = "not_produced"


@dataclass
class Coverage:
    compared: int
    reference_names: int
    missing: list[str] = field(default_factory=list)
    not_produced: list[str] = field(default_factory=list)
    suggestions: dict[str, str] = field(default_factory=dict)
    allow_missing: bool = False

    @property
    def fraction(self) -> float:
        return self.compared / self.reference_names if self.reference_names else 0.0

    @property
    def complete(self) -> bool:
        """Every reference tensor compared or declared not produced (or --allow-missing)."""
        return not self.missing or self.allow_missing

    def to_json_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction, "complete": self.complete}


def declared_absent(metadata: dict, where: str = "candidate") -> list[str]:
    """The candidate's `not_produced` metadata: a JSON list of canonical names or globs (a bare string is one)."""
    value = (metadata or {}).get(NOT_PRODUCED_KEY)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise QwenlabError(f"{where}: metadata {NOT_PRODUCED_KEY!r} must be a JSON list of names or globs, "
                           f"got {value!r}"[:300])
    return value


def measure(cand_names, ref_names, not_produced: list[str], allow_missing: bool = False) -> Coverage:
    cand_names, ref_names = set(cand_names), set(ref_names)
    absent = sort_forward(ref_names - cand_names)
    declared = [n for n in absent if any(fnmatchcase(n, pattern) for pattern in not_produced)]
    missing = [n for n in absent if n not in declared]
    found = suggest(sorted(cand_names - ref_names), missing)
    suggestions = dict(sorted(found.items(), key=lambda pair: forward_order_key(pair[1])))
    return Coverage(compared=len(ref_names & cand_names), reference_names=len(ref_names), missing=missing,
                    not_produced=declared, suggestions=suggestions, allow_missing=allow_missing)

"""`qwenlab report --candidate DUMP`, checked before anything runs: notebook 03 runs the reference on the dump's own
`prompt_ids`, so a dump without them (or not a dump at all) is a usage error (exit 2), not a notebook error later."""
from qwenlab.activations.dump import read_metadata
from qwenlab.errors import QwenlabError


def check_candidate(path: str | None) -> None:
    if path is None:
        return
    try:
        ids = read_metadata(path).get("prompt_ids")
    except QwenlabError as e:
        raise QwenlabError(f"--candidate {e}") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise QwenlabError(f"--candidate {path}: its metadata has no prompt_ids (a JSON list of token ids), which "
                           "the report runs the reference on (doc/dump-format.md)")

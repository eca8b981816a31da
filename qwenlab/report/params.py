"""The notebooks `qwenlab report` runs and their parameters: discovering the numbered notebooks, selecting them
(--only), parsing -p NAME=VALUE, reading each notebook's declared parameters and planning what each one gets."""
import ast
import json
from pathlib import Path

from qwenlab.errors import QwenlabError

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
STANDARD_PARAMS = ("model_dir", "device", "dtype", "out_dir", "thresholds_dir", "quant", "device_map")


def discover(notebooks_dir) -> list[Path]:
    folder = Path(notebooks_dir)
    found = sorted(folder.glob(NOTEBOOK_GLOB))
    if not found:
        raise QwenlabError(f"{folder}: no numbered notebooks ({NOTEBOOK_GLOB})")
    return found


def _matches(token: str, stem: str) -> bool:
    return token == stem or token == stem[:2]


def find_notebook(token: str, notebooks: list[Path]) -> Path:
    hits = [nb for nb in notebooks if _matches(token, nb.stem)]
    if len(hits) != 1:
        names = ", ".join(nb.stem for nb in notebooks)
        what = "matches several notebooks" if hits else "is not a notebook"
        raise QwenlabError(f"{token!r} {what} (have: {names})")
    return hits[0]


def select(notebooks: list[Path], only: str | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = {find_notebook(t.strip(), notebooks) for t in only.split(",") if t.strip()}
    return [nb for nb in notebooks if nb in chosen]


def parse_value(text: str):
    """-p values: JSON when they parse (1, 0.5, true, [1,2], "x"), else the string as typed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_param_args(pairs: list[str]) -> tuple[dict, dict]:
    """['limit=3', '03_layer_diffs.prompt=hi'] -> ({'limit': 3}, {'03_layer_diffs': {'prompt': 'hi'}})."""
    global_params, scoped = {}, {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise QwenlabError(f"-p {pair!r}: expected NAME=VALUE or NN_name.NAME=VALUE")
        target, dot, pname = name.rpartition(".")
        if not pname.isidentifier():
            raise QwenlabError(f"-p {pair!r}: {pname!r} is not a parameter name")
        if pname in STANDARD_PARAMS:
            raise QwenlabError(f"-p {pname}: set by the report itself (use --model, --device, --dtype, --out, "
                               "--thresholds-dir, --quant, --device-map)")
        (scoped.setdefault(target, {}) if dot else global_params)[pname] = parse_value(value)
    return global_params, scoped


def declared_parameters(path: Path) -> dict:
    """name -> default (source text) of the notebook's first cell tagged `parameters`.

    Read with Python's ast: papermill's own inspect_notebook (the fallback, for cells that are not plain Python)
    skips any line holding a second '=', such as `x = ""  # empty = default`, and would call x unknown."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    try:
        tree = ast.parse(cell.source)
    except SyntaxError:
        return _papermill_parameters(path)
    out = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                out[target.id] = ast.get_source_segment(cell.source, node.value) if node.value else "None"
    return out


def _papermill_parameters(path: Path) -> dict:
    import papermill

    try:
        params = papermill.inspect_notebook(str(path))
    except ValueError as e:
        raise QwenlabError(f"{path}: cannot read its parameters ({e})") from None
    return {name: p["default"] for name, p in params.items()}


def plan_parameters(notebooks: list[Path], declared: dict, standard: dict, candidate, global_params: dict,
                    scoped: dict, all_notebooks: list[Path]) -> dict:
    """The parameters each notebook gets; QwenlabError for any name a targeted notebook does not declare."""
    plan = {nb.stem: dict(standard) for nb in notebooks}
    for nb in notebooks:
        missing = [p for p in STANDARD_PARAMS if p not in declared[nb.stem]]
        if missing:
            raise QwenlabError(f"{nb.name}: its parameters cell does not declare {', '.join(missing)} "
                               f"(every numbered notebook must; declared: {sorted(declared[nb.stem]) or 'none'})")
    shared = dict(global_params)
    if candidate is not None:
        shared["candidate"] = candidate
    for name, value in shared.items():
        takers = [nb.stem for nb in notebooks if name in declared[nb.stem]]
        if not takers:
            flag = "--candidate" if name == "candidate" and name not in global_params else f"-p {name}"
            raise QwenlabError(f"{flag}: unknown parameter {name!r}: no notebook to run declares it "
                               f"({', '.join(nb.stem for nb in notebooks)})")
        for stem in takers:
            plan[stem][name] = value
    for token, params in scoped.items():
        nb = find_notebook(token, all_notebooks)
        if nb.stem not in plan:
            raise QwenlabError(f"-p {token}.*: notebook {nb.stem} is not among the notebooks to run")
        for name, value in params.items():
            if name not in declared[nb.stem]:
                raise QwenlabError(f"-p {token}.{name}: unknown parameter {name!r} for notebook {nb.stem} "
                                   f"(declared: {', '.join(sorted(declared[nb.stem]))})")
            plan[nb.stem][name] = value
    return plan


def _default_value(source: str):
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source


def seeds(declared: dict, plan: dict) -> dict:
    """Every seed-like parameter each notebook runs with (its default unless the report overrides it)."""
    out = {}
    for stem, params in plan.items():
        found = {name: params.get(name, _default_value(default)) for name, default in declared[stem].items()
                 if name == "seed" or name.endswith("_seed") or name.startswith("seed_")}
        if found:
            out[stem] = found
    return out

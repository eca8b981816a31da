"""Diff two activation dumps: per-tensor metrics, dtype-aware floors, the first divergence.

JSON convention: metrics are plain floats in Python and pandas (nmse_db is -inf for identical
tensors, NaN for rows with nothing to compare); to_json_dict turns every NaN/inf into null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import pandas as pd
import torch

from qwenlab.activations.coverage import Coverage, declared_absent, measure
from qwenlab.activations.dump import Dump, read_dump
from qwenlab.activations.layout import diagnose_layout, is_last_position
from qwenlab.activations.names import ALL_LAYER_POINTS, sort_forward, split_name
from qwenlab.activations.prompt_check import position_warning
from qwenlab.activations.routing import DEFAULT_MARGIN, compare_routing, is_routing, logits_name
from qwenlab.atomic import json_safe
from qwenlab.errors import QwenlabError
from qwenlab.sequences import first_difference

NAN = float("nan")
METRIC_KEYS = ("max_abs", "mean_abs", "rel_l2", "cosine", "nmse_db")
# reference_nonfinite is not a divergence: nothing to judge
DIVERGENT = ("diverged", "layout_mismatch", "shape_mismatch", "nonfinite", "routing_flip")
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float64": "float64", "fp64": "float64", "double": "float64", "f64": "float64",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
}
PRECISION_RANK = {"bfloat16": 0, "float16": 1, "float32": 2, "float64": 3}


def normalize_dtype(dtype) -> str | None:
    key = str(dtype).strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(key)


def _require_dtype(dtype, where: str = "") -> str:
    known = normalize_dtype(dtype)
    if known is None:
        raise QwenlabError(f"{where}unknown dtype {dtype!r}: use one of float64, float32, float16, bfloat16")
    return known


def tensor_metrics(cand: torch.Tensor, ref: torch.Tensor) -> dict:
    c = cand.detach().to("cpu", torch.float64).reshape(-1)
    r = ref.detach().to("cpu", torch.float64).reshape(-1)
    if c.numel() == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "nmse_db": -math.inf}
    delta = (c - r).abs()
    diff_norm, ref_norm, cand_norm = delta.norm().item(), r.norm().item(), c.norm().item()
    if ref_norm == 0:
        rel_l2 = 0.0 if diff_norm == 0 else math.inf
    else:
        rel_l2 = diff_norm / ref_norm
    if ref_norm == 0 and cand_norm == 0:
        cosine = 1.0
    elif ref_norm == 0 or cand_norm == 0:
        cosine = 0.0
    else:
        cosine = (c @ r).item() / (cand_norm * ref_norm)
    nmse_db = -math.inf if diff_norm == 0 else (20 * math.log10(rel_l2) if ref_norm else math.inf)
    return {"max_abs": delta.max().item(), "mean_abs": delta.mean().item(),
            "rel_l2": rel_l2, "cosine": cosine, "nmse_db": nmse_db}


def default_floor(name: str, dtype: str, num_layers: int) -> float:
    """rel_l2 floor by dtype and depth; for a MoE layer's router_ids, the routing margin limit (logit units)."""
    if is_routing(name):
        return DEFAULT_MARGIN[dtype]
    if dtype in ("float32", "float64"):
        return 1e-5
    layer, point = split_name(name)
    if layer is not None:
        bf16 = 0.03 + 0.07 * min(1.0, (layer + 1) / max(num_layers, 1))
    elif point == "embed":
        bf16 = 0.03
    else:
        bf16 = 0.1
    return bf16 / 8 if dtype == "float16" else bf16


def check_floors(floors: dict | None, where: str = "floors") -> dict:
    """Floor overrides (name, glob or dtype -> rel_l2): a JSON object of finite numbers >= 0."""
    if floors is None:
        return {}
    if not isinstance(floors, dict):
        raise QwenlabError(f"{where}: must be a JSON object (name, glob or dtype -> rel_l2 floor), "
                           f"got a {type(floors).__name__}")
    for key, value in floors.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise QwenlabError(f"{where}: floor {key!r} = {value!r} must be a finite number >= 0")
    return floors


def read_floors(path) -> dict:
    """`diff --floors FILE`: the overrides, or one line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        floors = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QwenlabError(f"--floors {path}: not found") from None
    except (ValueError, RecursionError) as exc:
        raise QwenlabError(f"--floors {path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise QwenlabError(f"--floors {path}: cannot be read ({exc.strerror or exc})") from None
    return check_floors(floors, f"--floors {path}")


def floor_for(name: str, dtype: str, num_layers: int, overrides: dict | None = None) -> float:
    """rel_l2 floor; overrides: exact name, then first matching glob, then a dtype key. A router_ids floor is a
    margin in logit units, not a rel_l2: only names and globs that end in router_ids override it."""
    dtype = _require_dtype(dtype)
    overrides = overrides or {}
    if name in overrides:
        return float(overrides[name])
    if is_routing(name):
        overrides = {k: v for k, v in overrides.items() if k.endswith("router_ids")}
    patterns = [key for key in overrides if normalize_dtype(key) is None]
    for pattern in patterns:
        if fnmatchcase(name, pattern):
            return float(overrides[pattern])
    for key, value in overrides.items():
        if normalize_dtype(key) == dtype:
            return float(value)
    return default_floor(name, dtype, num_layers)


LOGITS_KEYS = ("kl_mean", "kl_max", "kl_p50", "kl_p90", "kl_p99", "top1_agreement", "delta_p_mean", "delta_p_max")


def logits_metrics(cand_logits: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    """KL(ref || cand) per position, top-1 agreement, delta-p. Logits with NaN or +inf (or a row with no finite
    value; -inf alone is a probability of 0) have no distribution: every metric is then NaN and `nonfinite` says
    which side."""
    vocab = ref_logits.shape[-1]
    ref_lp = torch.log_softmax(ref_logits.detach().to("cpu", torch.float64).reshape(-1, vocab), -1)
    cand_lp = torch.log_softmax(cand_logits.detach().to("cpu", torch.float64).reshape(-1, vocab), -1)
    broken = [side for side, lp in (("candidate", cand_lp), ("reference", ref_lp)) if torch.isnan(lp).any()]
    if broken:
        n = ref_lp.shape[0]
        return {"positions": n, **dict.fromkeys(LOGITS_KEYS, NAN), "nonfinite": " and ".join(broken),
                "kl_per_position": [NAN] * n, "top1_match_per_position": [False] * n}
    ref_p = ref_lp.exp()
    kl = torch.where(ref_p > 0, ref_p * (ref_lp - cand_lp), torch.zeros_like(ref_p)).sum(-1)
    kl = kl.clamp_min(0.0)
    ref_top = ref_lp.argmax(-1)
    top1 = ref_top == cand_lp.argmax(-1)
    rows = torch.arange(ref_top.numel())
    delta_p = ref_p[rows, ref_top] - cand_lp[rows, ref_top].exp()
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"positions": int(kl.numel()), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "kl_p50": q[0], "kl_p90": q[1], "kl_p99": q[2],
            "top1_agreement": top1.double().mean().item(),
            "delta_p_mean": delta_p.mean().item(), "delta_p_max": delta_p.max().item(),
            "kl_per_position": kl.tolist(), "top1_match_per_position": top1.tolist()}


def _as_dump(side) -> Dump:
    if isinstance(side, Dump):
        return side
    if isinstance(side, (str, Path)):
        return read_dump(side)
    if isinstance(side, dict):
        return Dump(tensors=side)
    raise QwenlabError(f"cannot diff a {type(side).__name__}: pass a Dump, a dict of tensors or a path")


def _label(dump: Dump, side: str) -> str:
    return str(dump.path) if dump.path is not None else side


def floor_dtype(cand: Dump, ref: Dump) -> str:
    """The lowest precision among both dumps' `dtype` metadata and the dtypes of the tensors they store: a bf16
    computation saved as float32 is still bf16, and a comparison is only as precise as its less precise side. A dump
    of an NVFP4 model (metadata `quantized`, written by capture) counts as bfloat16: transformers' side dequantizes
    its NVFP4 weights through bfloat16 (doc/nvfp4.md), so no flag needs remembering."""
    found = set()
    for dump, side in ((cand, "candidate"), (ref, "reference")):
        declared = dump.metadata.get("dtype")
        if declared is not None:
            found.add(_require_dtype(declared, f"{_label(dump, side)}: metadata dtype: "))
        if dump.metadata.get("quantized"):
            found.add("bfloat16")
        found |= {normalize_dtype(t.dtype) for t in dump.tensors.values()}
    ranked = sorted((f for f in found if f in PRECISION_RANK), key=PRECISION_RANK.get)
    return ranked[0] if ranked else "float32"


def _infer_num_layers(names) -> int:
    layers = [split_name(n)[0] for n in names]
    return max([layer for layer in layers if layer is not None], default=0) + 1


def _same_file(cand: Dump, ref: Dump) -> str | None:
    if cand.path is not None and ref.path is not None and Path(cand.path).resolve() == Path(ref.path).resolve():
        return str(cand.path)
    return None


def _check_prompts(cand: Dump, ref: Dump) -> None:
    a, b = cand.metadata.get("prompt_ids"), ref.metadata.get("prompt_ids")
    if a is None or b is None or list(a) == list(b):
        return
    at = first_difference(list(a), list(b))
    raise QwenlabError(f"dumps are for different prompts: candidate has {len(a)} ids, "
                       f"reference has {len(b)}, first difference at position {at}")


def compare_tensor(name: str, cand, ref, floor: float, cand_tensors: dict | None = None,
                   ref_tensors: dict | None = None) -> dict:
    """One row of the diff. router_ids rows (MoE) are compared as routing (qwenlab.activations.routing): status
    `routing` or `routing_flip`, `agreement` instead of rel_l2, `floor` the margin limit; the router logits they
    need come from the two dumps' tensors."""
    layer, point = split_name(name)
    present = ref if ref is not None else cand
    row = {"name": name, "layer": layer, "point": point, "shape": list(present.shape),
           "cand_shape": list(cand.shape) if cand is not None else None, "status": "ok",
           **{key: NAN for key in METRIC_KEYS}, "floor": floor, "exceeds": False, "note": None}
    if cand is None or ref is None:
        return {**row, "status": "only_in_reference" if cand is None else "only_in_candidate"}
    if is_routing(name):
        return _routing_row(row, name, cand, ref, floor, cand_tensors or {}, ref_tensors or {})
    if is_last_position(name, cand, ref):
        ref, row["note"] = ref[-1:], "last position only"
    if cand.numel() != ref.numel():
        return {**row, "status": "shape_mismatch", "exceeds": True}
    row.update(tensor_metrics(cand.reshape(ref.shape), ref))
    if not torch.isfinite(ref.detach().to(torch.float64)).all():
        return {**row, "status": "reference_nonfinite", "note": "the reference holds NaN or inf: nothing to judge"}
    if not torch.isfinite(cand.detach().to(torch.float64)).all():
        return {**row, "status": "nonfinite", "exceeds": True}
    if row["rel_l2"] <= floor:
        return row
    layout = diagnose_layout(name, cand, ref, floor)
    if layout:
        return {**row, "status": "layout_mismatch", "exceeds": True, "note": f"layout: {layout}"}
    return {**row, "status": "diverged", "exceeds": True}


def _routing_row(row: dict, name: str, cand, ref, limit: float, cand_tensors: dict, ref_tensors: dict) -> dict:
    if cand.shape != ref.shape:
        return {**row, "status": "shape_mismatch", "exceeds": True}
    logits = logits_name(name)
    routing = compare_routing(cand, ref, ref_tensors.get(logits), cand_tensors.get(logits), limit)
    bad = bool(routing.unexplained)
    return {**row, "status": "routing_flip" if bad else "routing", "exceeds": bad, "agreement": routing.agreement,
            "flips": len(routing.flips), "routing": routing.to_json(), "note": routing.note()}


@dataclass
class DiffResult:
    rows: list[dict]
    dtype: str
    logits: dict | None = None
    only_in_candidate: list[str] = field(default_factory=list)
    only_in_reference: list[str] = field(default_factory=list)
    coverage: Coverage | None = None
    same_file: str | None = None  # both sides are this one file
    isolated: bool = False  # the candidate ran teacher-forced: compared layer by layer

    @property
    def reference_nonfinite(self) -> str | None:
        """The first tensor whose reference holds NaN or inf (the reference run is broken there)."""
        return next((row["name"] for row in self.rows if row["status"] == "reference_nonfinite"), None)
    prompt_ids: list[int] | None = None

    @property
    def prompt_warning(self) -> str | None:
        return position_warning(len(self.prompt_ids)) if self.prompt_ids is not None else None

    @property
    def first_divergence_row(self) -> dict | None:
        return next((row for row in self.rows if row["exceeds"]), None)

    @property
    def first_divergence(self) -> str | None:
        row = self.first_divergence_row
        return row["name"] if row else None

    @property
    def routing(self) -> dict[str, dict]:
        """{router_ids name: agreement, flips (token, the two sets, margin, limit, explained)} of each MoE layer."""
        return {row["name"]: row["routing"] for row in self.rows if "routing" in row}

    @property
    def compared(self) -> int:
        return sum(row["status"] not in ("only_in_candidate", "only_in_reference") for row in self.rows)

    @property
    def verdict(self) -> str:
        """'pass'; 'diverged' (a tensor over its floor); 'incomplete' (reference tensors missing from the candidate,
        not declared, no allow_missing); 'nothing_compared' (no name in common: nothing was checked);
        'reference_nonfinite' (the reference holds NaN or inf: it cannot judge the candidate)."""
        if self.compared == 0:
            return "nothing_compared"
        if self.reference_nonfinite is not None:
            return "reference_nonfinite"
        if self.first_divergence is not None:
            return "diverged"
        if self.coverage is not None and not self.coverage.complete:
            return "incomplete"
        return "pass"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows).set_index("name")
        if not frame.empty:
            frame["layer"] = frame["layer"].astype("Int64")
        return frame

    def to_json_dict(self) -> dict:
        return json_safe({"rows": self.rows, "first_divergence": self.first_divergence,
                           "logits": self.logits, "only_in_candidate": self.only_in_candidate,
                           "only_in_reference": self.only_in_reference, "dtype": self.dtype,
                           "coverage": self.coverage.to_json_dict() if self.coverage else None,
                           "verdict": self.verdict, "passed": self.passed, "same_file": self.same_file,
                           "isolated": self.isolated,
                           "prompt_tokens": len(self.prompt_ids) if self.prompt_ids is not None else None,
                           "prompt_warning": self.prompt_warning})


def is_isolated(dump: Dump) -> bool:
    """A dump written teacher-forced (metadata `isolated: true`): its layer i ran on the reference's
    layers.{i}.input."""
    return str(dump.metadata.get("isolated", "")).lower() in ("true", "1", "yes")


def isolated_view(cand: Dump, ref: Dump) -> tuple[Dump, Dump]:
    """Both sides as the isolated comparison reads them: the per-layer tensors the candidate computed (not the inputs
    it was given), the residual points as the layer's update x - layers.{i}.input (the reference's input), so a
    layer's own error does not drown in the residual stream it adds to."""
    cand_t, ref_t = {}, {}
    for name, tensor in ref.tensors.items():
        layer, point = split_name(name)
        if layer is None or point == "input":
            continue
        base = ref.tensors.get(f"layers.{layer}.input")
        delta = point in ("post_attention_residual", "output") and base is not None
        ref_t[name] = tensor - base if delta else tensor
        if name in cand.tensors:
            cand_t[name] = cand.tensors[name].to(tensor.dtype) - base if delta else cand.tensors[name]
    extra = {n: t for n, t in cand.tensors.items() if n not in ref_t and split_name(n)[1] != "input"}
    return Dump(cand_t | extra, cand.metadata, cand.path), Dump(ref_t, ref.metadata, ref.path)


def _local(name: str) -> str:
    """The name whose default floor an isolated tensor gets: its point at layer 0 (a local error, not a deep one)."""
    layer, point = split_name(name)
    return f"layers.0.{point}" if layer is not None else name


def diff_dumps(cand, ref, dtype: str | None = None, num_layers: int | None = None,
               floors: dict | None = None, allow_missing: bool = False, routing: dict | None = None) -> DiffResult:
    """Every name of either dump, in forward order. Floors: `dtype` if given, else floor_dtype(cand, ref).
    Passes only when no row exceeds and every reference tensor was compared, declared in the candidate's
    `not_produced` metadata, or allow_missing is set. An isolated candidate (metadata `isolated: true`) is compared
    layer by layer (isolated_view), each tensor against its layer-0 floor. routing: the candidate's own
    `mlp.router_ids` and `mlp.router_logits` for the routing rows, when `cand` is a routing-forced capture
    (qwenlab.activations.forced_routing): its tensors compare like with like, its routing rows say what the candidate
    chose on its own and how far its own router logits were from the reference's."""
    cand, ref = _as_dump(cand), _as_dump(ref)
    floors = check_floors(floors)
    _check_prompts(cand, ref)
    dtype = _require_dtype(dtype) if dtype else floor_dtype(cand, ref)
    isolated = is_isolated(cand)
    if isolated:
        cand, ref = isolated_view(cand, ref)
    names = sort_forward(set(cand.tensors) | set(ref.tensors))
    num_layers = num_layers or _infer_num_layers(names)
    routed = {**cand.tensors, **routing} if routing else cand.tensors  # what the routing rows read
    rows = [compare_tensor(name, (routed if is_routing(name) else cand.tensors).get(name), ref.tensors.get(name),
                           floor_for(_local(name) if isolated else name, dtype, num_layers, floors),
                           routed if is_routing(name) else cand.tensors, ref.tensors)
            for name in names]
    logits = None
    if "logits" in cand.tensors and "logits" in ref.tensors:
        c, r = cand.tensors["logits"], ref.tensors["logits"]
        if is_last_position("logits", c, r):
            r = r[-1:]
        if c.numel() == r.numel():
            logits = logits_metrics(c.reshape(r.shape), r)
    coverage = measure(cand.tensors, ref.tensors, declared_absent(cand.metadata, _label(cand, "candidate")),
                       allow_missing)
    return DiffResult(rows=rows, dtype=dtype, logits=logits, coverage=coverage, same_file=_same_file(cand, ref),
                      isolated=isolated,
                      prompt_ids=list(ref.prompt_ids or cand.prompt_ids or []) or None,
                      only_in_candidate=[r["name"] for r in rows if r["status"] == "only_in_candidate"],
                      only_in_reference=[r["name"] for r in rows if r["status"] == "only_in_reference"])


def styled(frame: pd.DataFrame):
    """Styler: rows over their floor in red, the first divergence in bold."""
    first = next((name for name, bad in frame["exceeds"].items() if bad), None)

    def row_style(row):
        css = "background-color: #f8d0d0; color: #900;" if row["exceeds"] else ""
        if row.name == first:
            css += " font-weight: bold;"
        return [css] * len(row)

    floats = [c for c in ("max_abs", "mean_abs", "rel_l2", "cosine", "nmse_db", "floor") if c in frame]
    return frame.style.apply(row_style, axis=1).format("{:.3g}", subset=floats, na_rep="-")


def rel_l2_grid(result) -> pd.DataFrame:
    """Layer x point table of rel_l2 for a heatmap."""
    frame = result.to_frame() if isinstance(result, DiffResult) else result
    layered = frame[frame["layer"].notna()]
    grid = layered.pivot_table(index="layer", columns="point", values="rel_l2", aggfunc="first",
                               dropna=False)
    columns = [p for p in ALL_LAYER_POINTS if p in grid.columns]
    columns += sorted(c for c in grid.columns if c not in ALL_LAYER_POINTS)
    grid = grid.reindex(columns=columns)
    grid.index = grid.index.astype(int)
    return grid

"""Floors measured, not guessed. A verdict asks: is the candidate within the precision budget of this model, in
this dtype? The budget is the reference's own noise on the same prompt: transformers run in the candidate's dtype
(or on the same NVFP4 numbers) against transformers in float32. A tensor's floor is

    floor = multiple x noise(tensor) + absolute(dtype)

and each logits statistic (KL mean and p99, top-1 disagreement, delta-p max) is gated the same way. The multiples
and absolute minimums live in data/thresholds/; a float32 candidate has no lower-precision noise to measure, so it
is held to the float32 fallbacks there (float32 rounding between two correct implementations is about 1e-6).
A MoE layer's chosen experts (router_ids, integers) have no rel_l2: their row is routing agreement, gated at the
routing margin of the thresholds (qwenlab.activations.routing), and they are left out of the noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwenlab.activations.diff import default_floor, logits_metrics, tensor_metrics
from qwenlab.activations.names import split_name
from qwenlab.activations.routing import DEFAULT_MARGIN, explained_flips, is_routing

LOGITS_STATS = ("kl_mean", "kl_p99", "top1_disagreement", "delta_p_max")
RESIDUAL_POINTS = ("post_attention_residual", "output")
AFTER_ROUTING = ("mlp.experts", "output")  # a MoE layer's points whose token rows carry the chosen experts' output
EXACT_DTYPES = ("float32", "float64")


def logits_stats(metrics: dict) -> dict:
    """The gated logits statistics of a logits_metrics() result (top-1 as a disagreement: lower is better)."""
    return {"kl_mean": metrics["kl_mean"], "kl_p99": metrics["kl_p99"],
            "top1_disagreement": 1.0 - metrics["top1_agreement"], "delta_p_max": metrics["delta_p_max"]}


@dataclass
class Noise:
    """The reference's precision noise on one prompt: rel_l2 per tensor of reference(dtype) vs reference(float32),
    the same for the isolated (teacher-forced) run, and the logits metrics (logits_metrics(), per position too, so
    several prompts pool the way the candidate's do)."""
    dtype: str
    tensors: dict[str, float] = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    isolated: dict[str, float] = field(default_factory=dict)
    measured: bool = True  # False: no float32 reference could run, the dtype's default floors apply

    @property
    def exact(self) -> bool:
        """A float32 candidate: nothing lower-precision to measure, the float32 fallbacks apply."""
        return self.dtype in EXACT_DTYPES

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "measured": self.measured, "tensors": self.tensors, "isolated": self.isolated}


def measure(low: dict, high: dict | None, dtype: str, isolated_low: dict | None = None) -> Noise:
    """Noise of `low` (the reference in `dtype`) against `high` (the reference in float32), both {name: tensor};
    high None: not measured (the float32 reference fitted nowhere)."""
    if dtype in EXACT_DTYPES:
        return Noise(dtype)
    if high is None:
        return Noise(dtype, measured=False)
    tensors = {name: tensor_metrics(low[name], high[name])["rel_l2"] for name in low
               if name in high and low[name].is_floating_point()}
    logits = logits_metrics(low["logits"], high["logits"]) if "logits" in low and "logits" in high else {}
    isolated = isolated_errors(isolated_low, high, DEFAULT_MARGIN.get(dtype, 0.0)) if isolated_low else {}
    return Noise(dtype, tensors, logits, isolated)


def isolated_errors(isolated: dict, truth: dict,
                    routing_margin: float = DEFAULT_MARGIN["bfloat16"]) -> dict[str, float]:
    """Per tensor of a teacher-forced run (every layer fed the float32 reference's input to it): rel_l2 against the
    float32 reference. The residual points are compared as the layer's update (x - layers.i.input), not the whole
    residual stream, so the error is the layer's own and does not drown in the residual it adds to. In a MoE layer,
    a token whose experts flipped at a near-tie (within routing_margin, routing.explained_flips) went through other
    experts by rounding alone: it is left out of that layer's `mlp.experts` and `output` errors (its routing row
    reports the flip)."""
    out, flipped = {}, None
    for name, tensor in isolated.items():
        layer, point = split_name(name)
        if layer is None or point == "input" or name not in truth or not tensor.is_floating_point():
            continue
        cand, ref = tensor.double(), truth[name].double()
        if point in RESIDUAL_POINTS:
            base = truth[f"layers.{layer}.input"].double()
            cand, ref = cand - base, ref - base
        if point in AFTER_ROUTING:
            if flipped is None:
                flipped = explained_flips(isolated, truth, routing_margin)
            if flipped.get(layer):
                keep = [t for t in range(cand.shape[-2]) if t not in flipped[layer]]
                cand, ref = cand[..., keep, :], ref[..., keep, :]
        out[name] = tensor_metrics(cand, ref)["rel_l2"]
    return out


@dataclass(frozen=True)
class Gates:
    """The multiples and absolute minimums of data/thresholds/ (see from_thresholds)."""
    multiple: float
    absolute: dict[str, float]  # per dtype
    fp32: float
    logits: dict[str, tuple[float, dict[str, float]]]  # stat -> (multiple, {dtype: absolute})
    fp32_logits: dict[str, float]
    isolated_multiple: float
    unmeasured_logits: dict[str, dict[str, float]]  # stat -> {dtype: limit}, when no float32 reference ran
    routing_margin: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MARGIN))  # {dtype: logit units}

    @classmethod
    def from_thresholds(cls, t: dict) -> "Gates":
        n = t["noise"]
        return cls(float(n["multiple"]), {k: float(v) for k, v in n["absolute"].items()}, float(n["float32"]),
                   {k: (float(v["multiple"]), {d: float(a) for d, a in v["absolute"].items()})
                    for k, v in t["logits"].items()},
                   {k: float(v) for k, v in t["float32_logits"].items()}, float(t["isolated"]["multiple"]),
                   t.get("unmeasured_logits", {}),
                   DEFAULT_MARGIN | {k: float(v) for k, v in t.get("routing", {}).get("margin", {}).items()})

    def absolute_for(self, dtype: str) -> float:
        return self.fp32 if dtype in EXACT_DTYPES else self.absolute.get(dtype, self.absolute["bfloat16"])

    def floors(self, noise: Noise, names) -> dict[str, float]:
        """{name: rel_l2 floor} for every name compared (the dtype's defaults when the noise was not measured)."""
        margin = self.routing_margin.get(noise.dtype, DEFAULT_MARGIN.get(noise.dtype, 0.0))
        if not noise.measured:
            layers = max((split_name(n)[0] or 0 for n in names), default=0) + 1
            return {name: margin if is_routing(name) else default_floor(name, noise.dtype, layers) for name in names}
        absolute = self.absolute_for(noise.dtype)
        return {name: margin if is_routing(name) else self.multiple * noise.tensors.get(name, 0.0) + absolute
                for name in names}

    def isolated_floors(self, noise: Noise, names) -> dict[str, float]:
        if not noise.measured:
            return {name: default_floor(name, noise.dtype, 1) for name in names}  # a local error: one layer deep
        absolute = self.absolute_for(noise.dtype)
        return {name: self.isolated_multiple * noise.isolated.get(name, 0.0) + absolute for name in names}

    def logits_limits(self, noise_stats: dict, dtype: str, measured: bool = True) -> dict[str, float]:
        """Limits of the gated logits statistics from the noise's own statistics (logits_stats of pooled metrics)."""
        if dtype in EXACT_DTYPES:
            return dict(self.fp32_logits)
        if not measured:
            return {stat: float(by_dtype.get(dtype, by_dtype["bfloat16"]))
                    for stat, by_dtype in self.unmeasured_logits.items()}
        limits = {}
        for stat in LOGITS_STATS:
            multiple, absolute = self.logits[stat]
            limits[stat] = multiple * noise_stats.get(stat, 0.0) + absolute.get(dtype, absolute["bfloat16"])
        return limits

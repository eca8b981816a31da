"""Records named activations during a forward. Absent probe = no cost: the forward checks `probe is not None`."""
import fnmatch


class Probe:
    """Collects canonical activations (batch row 0, shape [T, ...]) in forward order.

    `include` is a list of glob patterns over canonical names (None records everything);
    `to_cpu` moves each tensor off the accelerator as it is recorded, so a long capture
    does not hold every activation in GPU memory.
    """

    def __init__(self, include: list[str] | None = None, to_cpu: bool = False):
        self.include = include
        self.to_cpu = to_cpu
        self.tensors: dict = {}

    def wants(self, name: str) -> bool:
        return self.include is None or any(fnmatch.fnmatchcase(name, p) for p in self.include)

    def record(self, name: str, x):
        if not self.wants(name):
            return
        x = x[0].detach()
        self.tensors[name] = x.to("cpu", copy=True) if self.to_cpu else x.clone()

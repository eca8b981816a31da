"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the kernel before it
ends; it reads what does not depend on that kernel (its weights), then waits for it (griddepcontrol.wait). Where
each of qwenlab's decode kernels lets the next one launch (griddepcontrol.launch_dependents), as the kernels'
PDL constexpr; 0 is no PDL."""
AT_START = 1  # first thing: the next kernel's programs may start before this one waits
AFTER_WAIT = 2  # once the kernel before has finished: at most one kernel runs ahead
AFTER_LOOP = 3  # after the main loop: the next kernel starts during this one's epilogue
MODES = {"start": AT_START, "after-wait": AFTER_WAIT, "after-loop": AFTER_LOOP}

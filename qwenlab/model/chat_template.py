"""A checkpoint's chat template rendered as transformers renders it (jinja2's immutable sandbox, the same globals and
extensions), within limits, so that a broken or hostile template ends in one line instead of hanging the process or
exhausting its memory:

- time: TIME_LIMIT_S of wall time, checked at every loop iteration, call, filter, guarded operator and output chunk
  (no thread is killed: the render stops itself at the next check);
- size: the rendered text, and any string, list or number a call, filter, `+`, `*`, `**` or `~` builds, at most
  MAX_SIZE characters/items (numbers: MAX_INT_BITS bits); an int argument of a call or filter at most MAX_SIZE
  (`"x" * 10**12`, `range(10**12)`, `s|center(10**9)` fail before allocating);
- recursion: Python's own limit (a self-calling macro ends in RecursionError, reported as one line).

What stays unguarded: one C-level operation on large inputs within those sizes (e.g. str.replace of a 4 MB string
by another) runs to its end before the next check.
"""
import contextvars
import functools
import json
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

TIME_LIMIT_S = 5.0
MAX_SIZE = 4_000_000  # characters of output (about 1M tokens, 4x Qwen3's longest context) or items of a value
MAX_INT_BITS = 100_000
ITER_GUARD, CONCAT_GUARD = "qwenlab_guarded_iter", "qwenlab_guarded_concat"


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A chat template went past one of the limits."""


_deadline = contextvars.ContextVar("chat_template_deadline", default=None)


def tick():
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took longer than {TIME_LIMIT_S:g} s (an endless or huge loop?)")


def check_size(value):
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_SIZE:
        raise TemplateLimitError(f"builds a {type(value).__name__} of {len(value)} items (limit {MAX_SIZE})")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"builds a number of {value.bit_length()} bits (limit {MAX_INT_BITS})")
    return value


def check_args(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise TemplateLimitError(f"passes {value} to a function or filter (limit {MAX_SIZE})")


def guarded_iter(iterable):
    for item in iterable:
        tick()
        yield item


def guarded_concat(*parts):
    return check_size("".join(str(part) for part in parts))


def guarded_filter(func):
    @functools.wraps(func)  # keeps jinja's pass_context / pass_eval_context marker
    def run(*args, **kwargs):
        tick()
        check_args(args, kwargs)
        return check_size(func(*args, **kwargs))
    return run


class Guards(NodeTransformer):
    """Every for loop iterates through guarded_iter, every `~` goes through guarded_concat."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(ITER_GUARD, "load"), [node.iter], [], None, None).set_lineno(node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(CONCAT_GUARD, "load"), node.nodes, [], None, None).set_lineno(node.lineno)


class LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**"})

    def _parse(self, source, name, filename):
        return Guards().visit(super()._parse(source, name, filename))

    def call(self, context, obj, /, *args, **kwargs):
        tick()
        check_args(args, kwargs)
        return check_size(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                abs(left).bit_length() * right > MAX_INT_BITS:
            raise TemplateLimitError(f"computes {left} ** {right} (over {MAX_INT_BITS} bits)")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and hasattr(seq, "__len__") and len(seq) * n > MAX_SIZE:
                raise TemplateLimitError(f"repeats a sequence to over {MAX_SIZE} items")
        return check_size(super().call_binop(context, operator, left, right))


class GuardedNamespace(jinja2.utils.Namespace):
    """Jinja namespace that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            GuardedNamespace.check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        GuardedNamespace.check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("render_body"), [], [], body).set_lineno(lineno)

    def render_body(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """optimized=False: no constant folding, so nothing of the template runs while it compiles."""
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols],
                         optimized=False)
    env.filters["tojson"] = tojson
    env.filters = {name: guarded_filter(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=GuardedNamespace)
    env.globals.update({ITER_GUARD: guarded_iter, CONCAT_GUARD: guarded_concat})
    return env.from_string(template)


def render(template: str, **variables) -> str:
    """The template rendered within the limits; any failure raises (the caller turns it into one line)."""
    token = _deadline.set(time.monotonic() + TIME_LIMIT_S)
    try:
        compiled = compile_chat_template(template)
        out, size = [], 0
        for chunk in compiled.generate(**variables):
            tick()
            size += len(chunk)
            if size > MAX_SIZE:
                raise TemplateLimitError(f"renders more than {MAX_SIZE} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        _deadline.reset(token)

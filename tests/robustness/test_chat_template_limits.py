"""A chat template that loops for ever, builds huge values, recurses or throws ends in one line, within the time
limit (shortened here), and the process goes on."""
import time

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.model import chat_template
from qwenlab.model.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    tokenizer = Tokenizer.from_dir(tiny_dir)
    tokenizer.real_template = tokenizer.chat_template
    return tokenizer


@pytest.fixture(autouse=True)
def short_limit(monkeypatch):
    monkeypatch.setattr(chat_template, "TIME_LIMIT_S", 0.5)


def render(tok, template: str) -> str:
    tok.chat_template = template
    return tok.render_chat(MESSAGES)


@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 0.5 s"),
    ("{% set s = 'x' * 3000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "longer than 0.5 s"),
    ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
     "longer than 0.5 s"),
    ("{% for i in range(10**12) %}{% endfor %}", "passes 1000000000000"),
    ("{{ 'x' * 10**12 }}", "repeats a sequence"),
    ("{{ 'x'|center(10**10) }}", "passes 10000000000"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds a str of"),
    ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", "bits"),
    ("{{ 7 ** 1000000000 }}", "computes 7 ** 1000000000"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "renders more than"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ raise_exception('no system prompt') }}", "no system prompt"),
    ("{% for %}", "TemplateSyntaxError"),
    ("{{ messages.__class__ }}", ""),
])
def test_a_bad_template_is_one_line_within_the_limit(tok, template, needle):
    start = time.monotonic()
    try:
        render(tok, template)
    except QwenlabError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"chat template of {tok.source_dir} failed: ")
        assert needle in message, message
    else:
        assert template == "{{ messages.__class__ }}"  # the sandbox renders it harmlessly (undefined)
    assert time.monotonic() - start < 5


def test_the_limits_leave_real_templates_alone(tok):
    tok.chat_template = tok.real_template
    text = tok.render_chat([{"role": "system", "content": "Be brief."}, *MESSAGES], enable_thinking=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<think>\n\n</think>\n\n")


def test_the_command_prints_one_line(ckpt, fails):
    (ckpt / "chat_template.jinja").write_text("{% for i in range(100000) %}{% for j in range(100000) %}"
                                              "{% endfor %}{% endfor %}")
    fails("tokenize", "--model", ckpt, "--text", "hi", "--chat", needles=("chat template", "longer than 0.5 s"))

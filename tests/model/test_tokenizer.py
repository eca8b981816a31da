"""qwenlab.model.tokenizer against HF transformers' AutoTokenizer on the real Qwen3 tokenizer files."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import shutil
import unicodedata

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.model.tokenizer import IncrementalDecoder, Tokenizer, byte_level_char_to_byte
from qwenlab.model.tokenizer_files import TOKENIZER_FILES, qwen3_tokenizer_dir, qwen_tiktoken_path
from qwenlab.paths import DATA_DIR

CORPUS_PATH = DATA_DIR / "tokenizer_corpus.jsonl"
REQUIRED_CATEGORIES = {
    "english", "chinese", "japanese", "korean", "emoji", "combining", "numbers", "code", "whitespace", "crlf",
    "special_tokens", "mixed_scripts", "rtl", "cyrillic", "greek", "math", "urls", "edge",
}


def load_corpus():
    lines = CORPUS_PATH.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines if line]


CORPUS = load_corpus()
CORPUS_BY_ID = {row["id"]: row["text"] for row in CORPUS}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy(qwen3_tokenizer_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_tokenizer_files_are_found():
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(TOKENIZER_FILES)
    assert (qwen3_tokenizer_dir() / "tokenizer.json").is_file()
    assert qwen_tiktoken_path().name == "qwen.tiktoken" and qwen_tiktoken_path().is_file()


def test_corpus_size_and_categories():
    assert len(CORPUS) >= 200
    assert len(CORPUS_BY_ID) == len(CORPUS), "corpus ids must be unique"
    assert {row["category"] for row in CORPUS} == REQUIRED_CATEGORIES
    texts = set(CORPUS_BY_ID.values())
    assert "" in texts and " " in texts
    assert max(len(word) for text in texts for word in text.split(" ")) >= 200


def test_encode_matches_hf_on_corpus(ours, hf):
    mismatches = {}
    for row in CORPUS:
        expected = hf.encode(row["text"], add_special_tokens=False)
        assert hf.encode(row["text"]) == expected, "Qwen adds no BOS/EOS by default"
        if ours.encode(row["text"]) != expected:
            mismatches[row["id"]] = (ours.encode(row["text"]), expected)
    assert mismatches == {}


def test_special_tokens_in_text_are_recognised(ours):
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 151644
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 151645
    assert 151645 not in ours.encode("<|im_end")
    assert ours.encode("<think>") == [151667]


def test_decode_round_trip_on_corpus(ours, hf):
    not_nfc = set()
    for row in CORPUS:
        text, ids = row["text"], ours.encode(row["text"])
        decoded = ours.decode(ids)
        assert decoded == hf.decode(ids, skip_special_tokens=False), row["id"]
        assert decoded == unicodedata.normalize("NFC", text), row["id"]
        if decoded != text:
            not_nfc.add(row["id"])
    # tokenizer.json normalizes to NFC, so only decomposed input fails to round-trip byte for byte
    assert not_nfc, "the corpus should hold decomposed (non-NFC) text"
    assert all(CORPUS_BY_ID[i] != unicodedata.normalize("NFC", CORPUS_BY_ID[i]) for i in not_nfc)


def test_skip_special_tokens_matches_hf(ours, hf):
    ids = ours.encode(CORPUS_BY_ID["special_tokens-006"] + CORPUS_BY_ID["special_tokens-015"])
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def conversations():
    return {
        "single_turn": [{"role": "user", "content": "Hello!"}],
        "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
        "multi_turn": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": CORPUS_BY_ID["chinese-002"]},
        ],
        "thinking_in_history": [
            {"role": "user", "content": "What is 3*7?"},
            {"role": "assistant", "content": "<think>\n3*7 is 21.\n</think>\n\n21"},
            {"role": "user", "content": "And 3*8?"},
            {"role": "assistant", "content": "<think>\nAdd 3.\n</think>\n\n24"},
        ],
        "reasoning_field": [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because.", "reasoning_content": "Think first."},
        ],
        "special_token_text": [
            {"role": "user", "content": CORPUS_BY_ID["special_tokens-006"]},
            {"role": "assistant", "content": CORPUS_BY_ID["special_tokens-008"], "tool_calls": None},
            {"role": "user", "content": CORPUS_BY_ID["emoji-002"] + CORPUS_BY_ID["crlf-000"]},
        ],
        "tool_round_trip": [
            {"role": "user", "content": "Weather in 北京?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "北京", "unit": "°C"}}}]},
            {"role": "tool", "content": "{\"temp\": 21}"},
        ],
    }


def hf_input_ids(result):
    return list(result["input_ids"] if hasattr(result, "keys") else result)


@pytest.mark.parametrize("name", sorted(conversations()))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_chat_matches_hf(ours, hf, name, add_generation_prompt, enable_thinking):
    messages = conversations()[name]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **extra)
    assert ours.render_chat(messages, add_generation_prompt, enable_thinking) == expected_text
    assert ours.encode_chat(messages, add_generation_prompt, enable_thinking) == hf_input_ids(expected_ids)


def test_chat_with_tools_matches_hf(ours, hf):
    tools = [{"type": "function", "function": {"name": "weather", "description": "天气 <now>",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    assert ours.render_chat(messages, tools=tools) == hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_chat_template_sources(tokenizer_dir, tmp_path):
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).render_chat([]) == "D<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "J1"


def test_stop_ids(tokenizer_dir):
    assert Tokenizer.from_dir(tokenizer_dir).stop_ids == (151645, 151643)
    assert Tokenizer.from_dir(tokenizer_dir, {"eos_token_id": [151645, 151643, 42]}).stop_ids == (151645, 151643, 42)
    assert Tokenizer.from_dir(tokenizer_dir, {"eos_token_id": 7}).stop_ids == (151645, 151643, 7)
    with pytest.raises(QwenlabError, match="eos_token_id"):
        Tokenizer.from_dir(tokenizer_dir, {"eos_token_id": "oops"})


def stream_pieces(tokenizer, ids, skip_special_tokens=False):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def splits_a_character(tokenizer, ids):
    """True when some token holds only part of a UTF-8 character."""
    for token_id in ids:
        if tokenizer.id_to_token(token_id) is None:
            continue
        try:
            tokenizer.token_bytes(token_id).decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


def byte_token_ids(tokenizer, text):
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    byte_to_char = {b: c for c, b in byte_level_char_to_byte().items()}
    return [tokenizer.token_to_id(byte_to_char[b]) for b in text.encode("utf-8")]


def stream_cases(tokenizer):
    cases = {row["id"]: tokenizer.encode(row["text"]) for row in CORPUS}
    for key in ("emoji-002", "emoji-010", "chinese-009", "combining-005", "korean-004", "rtl-003"):
        cases[f"bytes:{key}"] = byte_token_ids(tokenizer, CORPUS_BY_ID[key])
    cases["scrambled"] = [(i * 7919) % tokenizer.vocab_size for i in range(2000)]
    cases["padding_rows_dropped"] = tokenizer.encode("hello") + [151700, 151935] + tokenizer.encode(" world")
    cases["truncated_emoji"] = byte_token_ids(tokenizer, "ok 👍")[:-1] + tokenizer.encode(" tail")
    return cases


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_decoder_equals_full_decode(ours, skip_special_tokens):
    split_cases = []
    for name, ids in stream_cases(ours).items():
        pieces = stream_pieces(ours, ids, skip_special_tokens)
        full = ours.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == full, name
        if "\ufffd" not in full:
            assert not any("\ufffd" in piece for piece in pieces), name
            if splits_a_character(ours, ids):
                split_cases.append(name)
    assert any(not name.startswith("bytes:") for name in split_cases), "natural encodings should split some chars"
    assert {"bytes:emoji-002", "bytes:chinese-009"} <= set(split_cases)


def test_token_bytes(ours):
    assert ours.token_bytes(ours.encode(" hello")[0]) == b" hello"
    assert ours.token_bytes(151645) == b"<|im_end|>"
    assert b"".join(ours.token_bytes(i) for i in ours.encode("你好👋")) == "你好👋".encode("utf-8")
    with pytest.raises(QwenlabError, match="outside"):
        ours.token_bytes(ours.vocab_size + 10)


def test_vocab_size(ours, hf):
    assert ours.vocab_size == len(hf) == 151669


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(QwenlabError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(QwenlabError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_render_without_template_names_the_dir(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(QwenlabError, match="chat template"):
        Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "x"}])

"""`qwenlab` / `python -m qwenlab`: the workbench's commands. Those that load a model share --model DIR (default:
the embedded tiny fixture), --dtype, --device, --quant and --device-map; `tiny`, `diff` and `quantize` take their
own arguments. Errors are one line (exit 2); --debug shows the traceback of an internal error."""
import argparse
import json
import sys
from pathlib import Path

from qwenlab.activations.capture import capture_to_file
from qwenlab.activations.diff import diff_dumps, read_floors
from qwenlab.activations.diff_text import nothing_compared, summary_text
from qwenlab.activations.dump import check_output_path
from qwenlab.activations.nvfp4_reference import REFERENCES
from qwenlab.activations.prompt_check import position_warning
from qwenlab.arguments import COUNT, NON_NEGATIVE, SECONDS, SEED, TEMPERATURE, TOP_P
from qwenlab.bench import decode as bench_decode
from qwenlab.errors import Parser, QwenlabError, add_debug_flag, parse, run_command
from qwenlab.generation.decode import check_context, generate
from qwenlab.generation.engine import ENGINES
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory import stress
from qwenlab.model import quantize
from qwenlab.model.config import read_generation_config
from qwenlab.model.files import refuse_inside
from qwenlab.model.loader import load, resolve_device
from qwenlab.model.spec import LoadSpec, add_load_arguments
from qwenlab.model.tiny import expected_digest, resolve_model_dir, verify, write_checkpoint
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.model.training import trained
from qwenlab.report import run as report_run

# Commands defined beside their logic, each adding its own subparser.
PLUGIN_COMMANDS = (report_run.register, stress.register, quantize.register, bench_decode.register)


def _text_args(p: argparse.ArgumentParser, flag: str):
    p.add_argument(flag, dest="text", required=True, help="text, encoded as-is unless --chat")
    p.add_argument("--chat", action="store_true", help="render as the user message of a chat (generation prompt on)")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--thinking", choices=("on", "off"), default=None, help="enable_thinking for the chat template")


def _model_dir(args) -> Path:
    return resolve_model_dir(args.model)


def _prompt_ids(args, tokenizer) -> list[int]:
    if not args.chat:
        return tokenizer.encode(args.text)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.text}]
    thinking = None if args.thinking is None else args.thinking == "on"
    return tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=thinking)


def cmd_tiny(args):
    if args.train_steps is not None or args.train_seconds is not None:
        record = trained.write_trained_checkpoint(args.dir, args.preset, steps=args.train_steps,
                                                  seconds=args.train_seconds, seed=args.seed,
                                                  device=args.device or "cpu")
        print(trained.summary(record, args.dir))
        return 0 if record["realism"]["realistic"] else 1
    path = write_checkpoint(args.dir, args.preset, args.seed, str(resolve_device(args.device or "cpu")))
    checked = args.seed == 0 and expected_digest(args.preset) is not None  # hashing 65 GB for nothing takes minutes
    digest = verify(path, args.preset) if checked else "not checked: no committed checksum for this preset and seed"
    print(f"wrote {args.preset} checkpoint to {path} (sha256 {digest})")


def cmd_tokenize(args):
    model_dir = _model_dir(args)
    tok = Tokenizer.from_dir(model_dir, read_generation_config(model_dir))
    ids = _prompt_ids(args, tok)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    else:
        for i in ids:
            print(f"{i:>7}  {tok.token_bytes(i)!r}")
        print(f"{len(ids)} tokens")


def cmd_generate(args):
    ckpt = load(LoadSpec.from_args(args))
    ids = _prompt_ids(args, ckpt.tokenizer)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed, args.max_new_tokens)
    stream = ckpt.tokenizer.stream()
    on_token = None
    if not args.json:
        def on_token(token):
            if token not in ckpt.tokenizer.stop_ids:
                print(stream.push(token), end="", flush=True)
    gen = generate(ckpt.model, ids, params, mode=args.mode, engine=args.engine, tokenizer=ckpt.tokenizer,
                   on_token=on_token)
    if args.json:
        print(json.dumps(gen.to_json(), ensure_ascii=False))
    else:
        print(stream.flush())
        compiled = f", compile+capture {gen.compile_s:.1f} s" if gen.compile_s else ""
        print(f"[{len(gen.ids)} tokens, stop: {gen.stop_reason}, prefill {gen.prefill_s * 1e3:.1f} ms, "
              f"decode {gen.decode_tok_s:.1f} tok/s, {ckpt.model.device}, {ckpt.model.dtype}, engine {gen.engine}"
              f"{compiled}{f' ({gen.engine_note})' if gen.engine_note else ''}]", file=sys.stderr)
    quantization = ckpt.model.quantization
    if quantization is not None:
        print(f"[{quantization.summary()}]", file=sys.stderr)


def cmd_capture(args):
    refuse_inside(args.out, _model_dir(args))  # before anything loads: never overwrite what is read
    if args.unquantized_model:
        refuse_inside(args.out, args.unquantized_model)
    check_output_path(args.out)
    ckpt = load(LoadSpec.from_args(args))
    ids = _prompt_ids(args, ckpt.tokenizer)
    check_context(ckpt.model, len(ids))
    path = capture_to_file(ckpt, ids, args.impl, args.out, attention=args.attention, reference=args.reference,
                           unquantized_model=args.unquantized_model)
    print(f"wrote {path} ({args.impl}, {len(ids)} token{'s' if len(ids) != 1 else ''})")
    if warning := position_warning(len(ids)):  # after the write: a refusal stays one line
        print(f"qwenlab capture: warning: {warning}", file=sys.stderr)


def cmd_diff(args):
    floors = read_floors(args.floors) if args.floors else None
    result = diff_dumps(args.candidate, args.reference, dtype=args.dtype, floors=floors,
                        allow_missing=args.allow_missing)
    if args.json:
        print(json.dumps(result.to_json_dict(), allow_nan=False))
    else:
        print(summary_text(result, all_rows=args.all))
    if result.verdict == "nothing_compared":
        raise QwenlabError(nothing_compared(result, args.candidate, args.reference))
    return 0 if result.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwenlab", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a deterministic tiny Qwen3 checkpoint (HF layout)")
    p.add_argument("dir", type=Path)
    p.add_argument("--preset", default="tiny",
                   help="tiny (default) | tiny-untied | tiny-moe | qwen3-4b | qwen3-32b | qwen3-30b-a3b | "
                        "trained-24l (needs --train-steps)")
    p.add_argument("--seed", type=SEED, default=0, help="weights seed (with --train-*: init and data order)")
    p.add_argument("--device", default=None, help="where to draw the random bf16 weights or train (cpu default; "
                                                   "cuda is much faster for qwen3-32b and for training)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--train-steps", type=COUNT, default=None, help="train the preset's shape for N steps on the "
                        "standard library's .py files (qwenlab.model.training); exit 1 when its logits miss the "
                        "realism bar")
    budget.add_argument("--train-seconds", type=SECONDS, default=None, help="as --train-steps, with N the number of "
                        "steps that fit S seconds (timed on the first steps; training.json records N)")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("tokenize", help="text -> token ids with the checkpoint's tokenizer")
    p.add_argument("--model", type=Path, default=None,
                   help="Qwen3 checkpoint directory in HF layout (default: the embedded tiny fixture)")
    _text_args(p, "--text")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("generate", help="decode after a prompt (greedy at --temperature 0)")
    add_load_arguments(p)
    _text_args(p, "--prompt")
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="0 (default): off")
    p.add_argument("--top-p", type=TOP_P, default=1.0)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--mode", choices=("kv", "replay"), default="kv")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto (default): the CUDA-graph engine on a GPU, else eager; graph; eager")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("capture", help="write a canonical activation dump (.safetensors) for one prompt")
    add_load_arguments(p)
    _text_args(p, "--prompt")
    p.add_argument("--impl", choices=("qwenlab", "reference"), required=True)
    p.add_argument("--attention", choices=("sdpa", "eager"), default=None, help="qwenlab attention kernel")
    p.add_argument("--reference", choices=REFERENCES, default="quantized",
                   help="for a quantized model and --impl reference: transformers on the same NVFP4 checkpoint "
                        "(quantized, default) or on the bf16/fp32 one it came from (unquantized)")
    p.add_argument("--unquantized-model", type=Path, default=None,
                   help="with --reference unquantized when --model is already NVFP4: the checkpoint it came from")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("diff", help="compare two dumps; exit 1 when a tensor exceeds its floor or is missing, "
                                    "2 when nothing could be compared")
    p.add_argument("candidate", type=Path)
    p.add_argument("reference", type=Path)
    p.add_argument("--dtype", default=None,
                   help="floors for this dtype (default: the lowest precision of both dumps' dtype and tensors)")
    p.add_argument("--floors", default=None, help="JSON file of floor overrides (dtype or glob -> rel_l2)")
    p.add_argument("--allow-missing", action="store_true",
                   help="pass although reference tensors are missing from the candidate")
    p.add_argument("--all", action="store_true", help="every row in the table, not only those over their floor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    for register in PLUGIN_COMMANDS:
        register(sub)
    return parser


def main(argv=None) -> int:
    args = parse(build_parser(), argv)
    return args if isinstance(args, int) else run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())

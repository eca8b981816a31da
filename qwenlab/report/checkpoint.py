"""The model folder `qwenlab report` is asked to run on, checked before anything is written: config.json, every
tensor's presence and shape from the safetensors headers (the loader's own validation; no weights are read) and the
tokenizer, so a bad folder is a usage error (exit 2), not every notebook failing one after another."""
from pathlib import Path

from qwenlab.model.config import read_generation_config
from qwenlab.model.loader import read_config, validate
from qwenlab.model.tokenizer import Tokenizer


def check_checkpoint(path: Path, quant: str | None) -> str:
    """QwenlabError naming the file or tensor at fault; -> the config hash for the run header."""
    config = read_config(path)
    validate(path, config, quant)
    Tokenizer.from_dir(path, read_generation_config(path))
    return config.config_hash()

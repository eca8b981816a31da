"""Multi-turn chat: a persistent KV cache across turns (only the new turn is prefilled), or the naive strategies."""
from dataclasses import dataclass

from qwenlab.errors import QwenlabError
from qwenlab.generation.decode import Generation, check_context, engine_for, generate
from qwenlab.generation.engine import Engine
from qwenlab.generation.sampling import SamplingParams
from qwenlab.sequences import common_prefix

STRATEGIES = ("session", "rebuild", "replay")
DEFAULT_MAX_LEN = 8192


@dataclass
class Turn:
    user: str
    generation: Generation
    reused_tokens: int
    prefill_tokens: int


class ChatSession:
    """strategy: 'session' keeps one KV cache for the whole chat and prefills only what the rendered conversation
    adds beyond the cached tokens; 'rebuild' builds a fresh cache from the full history every turn; 'replay'
    uses no cache at all and recomputes the whole sequence for every token (the slow path kept for parity)."""

    def __init__(self, model, tokenizer, *, system: str | None = None, enable_thinking: bool | None = None,
                 strategy: str = "session", max_len: int | None = None, preallocate: bool = True,
                 engine: "str | Engine" = "auto"):
        if strategy not in STRATEGIES:
            raise QwenlabError(f"strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.model, self.tokenizer, self.strategy = model, tokenizer, strategy
        self.system, self.enable_thinking = system, enable_thinking
        self.max_len = min(max_len or DEFAULT_MAX_LEN, model.config.max_position_embeddings)
        self.preallocate = preallocate
        self.engine = engine_for(model, engine)  # one engine for the whole chat: compiled once
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns: list[Turn] = []
        self.cache = None
        self.cached_ids: list[int] = []

    def prompt_ids(self, user: str) -> list[int]:
        messages = self.messages + [{"role": "user", "content": user}]
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def send(self, user: str, params: SamplingParams = SamplingParams(), **kwargs) -> Turn:
        ids = self.prompt_ids(user)
        check_context(self.model, len(ids), "conversation")
        reused = 0
        if self.strategy == "replay":
            gen = generate(self.model, ids, params, mode="replay", engine=self.engine, tokenizer=self.tokenizer,
                           **kwargs)
        else:
            if self.strategy == "rebuild" or self.cache is None:
                self.cache = None  # drop the old cache before allocating the new one: one cache alive, not two
                self.cache, self.cached_ids = self.engine.new_cache(self.max_len, self.preallocate), []
            reused = common_prefix(self.cached_ids, ids)
            if reused == len(ids):
                reused -= 1  # the last prompt token must run through the model to give the next logits
            self.cache.crop(reused)
            gen = generate(self.model, ids, params, mode="kv", cache=self.cache, engine=self.engine,
                           tokenizer=self.tokenizer, **kwargs)
            self.cached_ids = (ids + gen.ids)[: self.cache.length]
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": gen.text}]
        turn = Turn(user, gen, reused, len(ids) - reused)
        self.turns.append(turn)
        return turn

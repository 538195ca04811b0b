"""How one request wants its tokens chosen, checked once when the request arrives.

Everything here is user input (it comes straight from the CLI or an HTTP body), so every field is
validated in `__post_init__` and a bad value raises `LDMoleError` naming the field, instead of
failing later inside the sampler in the middle of a batch that other requests share.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ldmole_runtime.errors import LDMoleError

# Below this a temperature is treated as greedy: dividing logits by it would overflow fp32 to inf,
# and inf - inf in the softmax is NaN. vLLM uses the same cut-off.
GREEDY_TEMPERATURE = 1e-5

MAX_LOGPROBS = 20  # the OpenAI API's cap on top_logprobs

# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
_MASK64 = 2**64 - 1


def _is_int(value) -> bool:
    # bool is an int subclass, but `top_k=True` is a mistake, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: until stop / max model length
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI semantics, on generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, on generated tokens
    repetition_penalty: float = 1.0  # HF/CTRL semantics, on prompt + generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # a single str is accepted too
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0 = only the sampled token's)
    prompt_logprobs: int | None = None  # same, for prompt tokens
    min_tokens: int = 0  # eos / stop_token_ids are masked until this many tokens are generated
    # token id -> bias added to its logit (OpenAI: [-100, 100])
    logit_bias: dict[int, float] = field(default_factory=dict)
    # per-token expert routing in the outputs: "counts" or "weights" (routing_trace.py); None: off
    routing: str | None = None

    def __post_init__(self) -> None:
        self.n = self._int("n", self.n, low=1)
        if self.max_tokens is not None:
            self.max_tokens = self._int("max_tokens", self.max_tokens, low=0, none_ok=True)
        self.min_tokens = self._int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise LDMoleError(f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                              f"and max_tokens={self.max_tokens}")

        self.temperature = self._real("temperature", self.temperature)
        if self.temperature < 0:
            raise LDMoleError(f"temperature must be >= 0, got {self.temperature:g}")
        self.top_p = self._real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise LDMoleError(f"top_p must be in (0, 1], got {self.top_p:g}")
        self.top_k = self._int("top_k", self.top_k, low=-1,
                               why="(0 or -1 disables it)")
        self.min_p = self._real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise LDMoleError(f"min_p must be in [0, 1], got {self.min_p:g}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = self._real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise LDMoleError(f"{name} must be in [-2, 2], got {value:g}")
            setattr(self, name, value)
        self.repetition_penalty = self._real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise LDMoleError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty:g}")

        if self.seed is not None:
            if not _is_int(self.seed):
                raise LDMoleError(f"seed must be an integer or None, got {self.seed!r}")
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise LDMoleError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
            self.seed = int(self.seed)

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise LDMoleError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise LDMoleError("stop strings must not be empty")
        self.stop = list(self.stop)

        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise LDMoleError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

        if not isinstance(self.ignore_eos, bool):
            raise LDMoleError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.logit_bias, dict):
            raise LDMoleError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        bias = {}
        for token, value in self.logit_bias.items():
            if isinstance(token, str) and token.strip().lstrip("-").isdigit():
                token = int(token)  # JSON object keys are strings
            if not _is_int(token) or token < 0:
                raise LDMoleError(f"logit_bias keys must be non-negative token ids, got {token!r}")
            value = self._real(f"logit_bias[{token}]", value)
            if not -100 <= value <= 100:
                raise LDMoleError(f"logit_bias values must be in [-100, 100], got {value:g} for token {token}")
            bias[int(token)] = value
        self.logit_bias = bias
        if self.routing is not None and self.routing not in ("counts", "weights"):
            raise LDMoleError(f"routing must be \"counts\", \"weights\" or None, got {self.routing!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                value = self._int(name, value, low=0, high=MAX_LOGPROBS, none_ok=True)
            setattr(self, name, value)

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """Temperature 0 (or one so small that it can only mean greedy, see GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE

    def sample_seed(self, i: int) -> int | None:
        """The seed of the i-th of the n samples: `seed` itself for i = 0, so n = 1 behaves exactly
        like a plain seeded request, and a well-mixed, deterministic function of (seed, i) for the
        others, so the n samples differ from each other but repeat across runs."""
        if not 0 <= i < self.n:
            raise ValueError(f"sample index {i} out of range for n={self.n}")
        if self.seed is None:
            return None
        if i == 0:
            return self.seed
        # splitmix64 finaliser over seed + i * golden ratio: neighbouring (seed, i) pairs land far apart.
        z = (self.seed + i * 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)  # in [0, 2**64), which torch.Generator.manual_seed accepts

    # ---- validation helpers -----------------------------------------------------------------------
    @staticmethod
    def _int(name: str, value, low: int | None = None, high: int | None = None, none_ok: bool = False,
             why: str = "") -> int:
        if not _is_int(value):
            kind = "an integer or None" if none_ok else "an integer"
            raise LDMoleError(f"{name} must be {kind}, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                bound = f">= {low}"
            elif low is None:
                bound = f"<= {high}"
            else:
                bound = f"in [{low}, {high}]"
            raise LDMoleError(f"{name} must be {bound}{' ' + why if why else ''}, got {value}")
        return int(value)

    @staticmethod
    def _real(name: str, value) -> float:
        if not _is_real(value):
            raise LDMoleError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise LDMoleError(f"{name} must be a finite number, got {value}")
        return value

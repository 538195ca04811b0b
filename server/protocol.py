"""The OpenAI-compatible request bodies (and ldmole's own), as pydantic models.

Field names, types and defaults follow the OpenAI API and vLLM's extensions (top_k, min_p,
repetition_penalty, stop_token_ids, ...), so existing clients work unchanged. Unknown fields are
accepted and logged, as vLLM does; everything else that is wrong becomes a 400 with the OpenAI
error shape. Value ranges are checked once, by SamplingParams.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger("ldmole.server")

TokenIds = list[Annotated[int, Field(strict=True)]]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            logger.warning("ignoring unknown fields in a %s: %s", type(self).__name__, sorted(self.model_extra))
        return self


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class LDMoleOptions(OpenAIModel):
    """ldmole's own request options (`"ldmole": {...}` in a body): `routing` asks for each token's
    expert routing in the choices (server/routing.py), as counts or as the weights themselves."""
    routing: Literal["counts", "weights"] | None = Field(None, description=(
        "Per-token expert routing in each choice, at choices[i].ldmole.routing: {format, layers, experts, "
        "router, projections, tokens}. tokens has one entry per token of the choice (echoed prompt first), "
        "each [layers][projections]: with 'counts' the number of active experts, with 'weights' "
        "{experts: [...], p: [...], lambda}. A token's entry is the routing of the position whose logits "
        "chose it (as logprobs), so the first echoed prompt token's is null. The bare base and "
        "single-expert sets send {format, none: <why>}. Streamed chunks carry their tokens' entries."))


class SamplingFields(OpenAIModel):
    """Sampling settings common to completions and chat completions."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: TokenIds | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ldmole: LDMoleOptions | None = None

    @property
    def routing(self) -> str | None:
        return None if self.ldmole is None else self.ldmole.routing


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class ScoreItem(OpenAIModel):
    model: str | None = None
    context: str | TokenIds
    choices: list[str | TokenIds] = Field(min_length=1)
    ldmole: LDMoleOptions | None = None  # routing: each choice's tokens' routing, in choices[i].ldmole


class ClassifyRequest(OpenAIModel):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]


# An adapter set's name: it becomes a `model` value, a metrics label and a log field, so it keeps to
# a plain character set (no controls, spaces or direction marks); "auto" asks the adapter selector.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
RESERVED_NAMES = frozenset({"auto"})


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"an adapter name is 1-128 characters of A-Z a-z 0-9 . _ : / -, starting with a letter "
                         f"or digit; got {name[:140]!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"the adapter name {name!r} is reserved")
    return name


class LoadAdapterRequest(OpenAIModel):
    lora_name: Annotated[str, AfterValidator(check_adapter_name)]
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    force: bool = False  # also a set given at start-up


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False  # also each token's string from the vocabulary, as vLLM's /tokenize

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: TokenIds

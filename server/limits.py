"""What one request may ask for. A field that multiplies the server's work (per step, per token or per
item) has a limit here, with a default and a `ldmole serve` flag; a request over one gets a 400 that
names the limit and its flag, before any of its work is queued."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ldmole_server.errors import APIError


@dataclass(frozen=True)
class RequestLimits:
    max_stop: int = 16  # stop strings per request (OpenAI and TGI: 4; lm-eval's `until` lists stay under 16)
    max_stop_chars: int = 256  # characters per stop string (each is searched for in the text of every step)
    max_stop_token_ids: int = 64  # stop_token_ids per request (vLLM: no limit)
    max_logit_bias: int = 300  # logit_bias entries per request (OpenAI: 300)
    max_score_items: int = 64  # items in one /v1/score list
    max_score_choices: int = 128  # choices per /v1/score item (each runs as a sequence of its own)
    max_classify_inputs: int = 64  # inputs in one /v1/classify request
    max_text_chars: int = 1 << 20  # characters of text one request has tokenized (prompts, messages, ...)

    def check(self, name: str, count: int, param: str) -> None:
        limit = getattr(self, name)
        if count > limit:
            raise APIError(400, f"{param} has {count}; the limit is {limit} ({name}, `ldmole serve "
                                f"--{name.replace('_', '-')}`)", param)

    def check_text(self, *texts, param: str) -> None:
        """Text to tokenize: strings (or lists of them) count their characters; token ids count nothing."""
        chars = sum(_chars(t) for t in texts)
        self.check("max_text_chars", chars, param)

    def check_sampling(self, body) -> None:
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        self.check("max_stop", len(stop), "stop")
        self.check("max_stop_chars", max((len(s) for s in stop), default=0), "stop")
        self.check("max_stop_token_ids", len(body.stop_token_ids or []), "stop_token_ids")
        self.check("max_logit_bias", len(body.logit_bias or {}), "logit_bias")


def _chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return len(value.text()) if hasattr(value, "text") else 0  # a chat message


HELP = {
    "max_stop": "stop strings per request",
    "max_stop_chars": "characters in one stop string",
    "max_stop_token_ids": "stop_token_ids per request",
    "max_logit_bias": "logit_bias entries per request",
    "max_score_items": "items in one /v1/score list",
    "max_score_choices": "choices in one /v1/score item",
    "max_classify_inputs": "inputs in one /v1/classify request",
    "max_text_chars": "characters of text in one request (prompts, messages, contexts, choices, inputs), "
                      "all of which the server tokenizes",
}


def add_limit_flags(parser) -> None:
    defaults = RequestLimits()
    for f in fields(RequestLimits):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(defaults, f.name),
                            help=f"most {HELP[f.name]}; more is a 400 (default {getattr(defaults, f.name)})")


def limits_from_args(args) -> RequestLimits:
    return RequestLimits(**{f.name: getattr(args, f.name) for f in fields(RequestLimits)})

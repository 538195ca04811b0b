"""What every route needs: the engine, the tokenizer, the served model names, and the limits."""

from __future__ import annotations

import functools
import hmac
import time
import uuid
from dataclasses import dataclass, field, fields

from ldmole_runtime.engine.adapter_cache import AdapterHandle
from ldmole_runtime.engine.async_engine import AsyncLLMEngine
from ldmole_runtime.errors import LDMoleError, UnknownAdapterError
from ldmole_server.errors import APIError
from ldmole_server.metrics import ServerMetrics

# Reachable without the key, as in vLLM: liveness probes and the Prometheus scraper; and the /ui page,
# which holds no data and asks for the key itself.
OPEN_PATHS = ("/health", "/ready", "/version", "/metrics", "/docs", "/openapi.json", "/redoc", "/ui")
# Runtime adapter management: absent unless enabled, then only with the admin key (vLLM hides these
# routes unless VLLM_ALLOW_RUNTIME_LORA_UPDATING is set; TGI has none).
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
AUTO = "auto"  # the `model` that asks the adapter selector to pick the adapter set


# ---- what one request may ask for ------------------------------------------------------------------
# A field that multiplies the server's work (per step, per token or per item) has a limit here, with a
# default and a `ldmole serve` flag; a request over one gets a 400 that names the limit and its flag,
# before any of its work is queued.
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


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    limits: RequestLimits = field(default_factory=RequestLimits)
    # runtime adapter management (load/unload), an admin surface: off unless enabled, loads only from
    # folders under adapter_roots, and guarded by admin_key (else the API key)
    enable_adapter_loading: bool = False
    adapter_roots: tuple[str, ...] = ()
    admin_key: str | None = None
    stall_timeout_s: float = 60.0  # work waiting this long with no engine step finishing: /health says 503

    @property
    def admin_credential(self) -> str | None:
        return self.admin_key or self.api_key

    def is_admin(self, authorization: str | bytes | None) -> bool:
        """The request carries the admin's key (nobody is an admin on a server without keys)."""
        key = self.admin_credential
        if not key or authorization is None:
            return False
        given = authorization.encode() if isinstance(authorization, str) else authorization
        return hmac.compare_digest(given, f"Bearer {key}".encode())

    def refusal(self, path: str, authorization: str | bytes | None) -> tuple[int, str] | None:
        """(status, message) if the key guards turn this request away (server/middleware.py and the Ray
        ingress both ask here), else None."""
        if path.rstrip("/") in ADMIN_PATHS:
            if not self.enable_adapter_loading:
                return 404, "runtime adapter loading is off; start the server with --enable-adapter-loading"
            if not self.is_admin(authorization):
                return 401, "adapter loading needs the admin key: Authorization: Bearer <key>"
        elif self.api_key and not path.startswith(OPEN_PATHS):  # the admin key opens the API too
            given = authorization.encode() if isinstance(authorization, str) else authorization or b""
            if not (hmac.compare_digest(given, f"Bearer {self.api_key}".encode()) or self.is_admin(authorization)):
                return 401, "a valid API key is required: Authorization: Bearer <key>"
        return None

    def check_admin_setup(self) -> None:
        if self.enable_adapter_loading and not self.adapter_roots:
            raise LDMoleError("--enable-adapter-loading needs at least one --adapter-root DIR to load from")
        if self.enable_adapter_loading and not self.admin_credential:
            raise LDMoleError("--enable-adapter-loading needs a key: --admin-key-file, $LDMOLE_ADMIN_KEY or "
                              "--admin-key (or an API key)")


@dataclass
class ServerState:
    engine: AsyncLLMEngine  # the server's one door to the engine: sets, tokenizer, limits, admission
    base_name: str  # the base model's served name (`model` field for the bare base)
    base_path: str
    adapter_paths: dict[str, str] = field(default_factory=dict)  # adapter-set name -> folder it came from
    settings: ServerSettings = field(default_factory=ServerSettings)
    metrics: ServerMetrics | None = None
    adapter_selector: object | None = None  # a adapter_selector.AdapterSelector: serves `model: "auto"`
    pinned: frozenset[str] | None = None  # sets unloaded only when a request insists (default: those at start-up)
    created: int = field(default_factory=lambda: int(time.time()))
    dtype_choice: str = ""  # the engine's dtype and why (`--dtype auto` says what it found), for /version

    def __post_init__(self):
        if self.pinned is None:
            self.pinned = frozenset(self.adapter_paths)
        # a cache per instance (a cached method would key on, and keep alive, every ServerState)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        if self.metrics is None:
            self.metrics = ServerMetrics(self.engine, self.adapter_selector)

    def resolve_model(self, model: str | None) -> AdapterHandle | None:
        """The adapter set a request's `model` field selects, resolved once (None: the bare base)."""
        if model is None or model == self.base_name:
            return None
        if model == AUTO and AUTO not in self.engine.adapter_names():
            if self.adapter_selector is None:
                raise LDMoleError("model 'auto' needs an adapter selector: start the server with "
                                  "--adapter-selector DIR")
            raise LDMoleError("model 'auto' (adapter selection) works on /v1/completions and /v1/chat/completions")
        try:
            return self.engine.resolve_adapter(model)
        except UnknownAdapterError:
            names = self.model_names()
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all: GET /v1/models)" if len(names) > 20 else "")
            raise UnknownAdapterError(f"the model {model!r} does not exist; served: [{shown}]") from None

    async def pick_model(self, model: str | None, text) -> AdapterHandle | None:
        """As resolve_model, but `model: "auto"` asks the adapter selector, which reads text() (the
        prompt, or a chat's last user message)."""
        if model == AUTO and self.adapter_selector is not None and AUTO not in self.engine.adapter_names():
            return self.resolve_model(await self.adapter_selector.select(text()))
        return self.resolve_model(model)

    def model_names(self) -> list[str]:
        return [self.base_name] + self.engine.adapter_names()

    def label(self, adapter: AdapterHandle | None) -> str:
        """The `adapter` metrics label and `model` response field of a request."""
        return self.base_name if adapter is None else adapter.name

    def _token_text(self, token_id: int) -> str:
        if self.engine.tokenizer is None:
            return f"token_id:{token_id}"
        return self.engine.tokenizer.decode([token_id])

    def decode(self, token_ids: list[int]) -> str:
        return "" if self.engine.tokenizer is None else self.engine.tokenizer.decode(token_ids)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"

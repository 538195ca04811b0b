"""A real ldmole server (uvicorn on a free localhost port, in a thread of the test process) over a
tiny Llama with a character tokenizer and three adapter sets; and the same model offline, as the
reference the HTTP answers must equal."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn
from tiny_models import tiny_config, write_char_tokenizer, write_tiny_model

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.async_engine import AsyncLLMEngine
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.model.tokenizer import load_tokenizer
from ldmole_server.adapter_selector import AdapterSelector
from ldmole_server.app import build_app
from ldmole_server.state import RequestLimits, ServerSettings, ServerState

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
BASE_NAME = "tiny-llama"


def write_model(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny Llama (vocab = the 100 ids of the character tokenizer) and three adapter sets on disk."""
    base = write_tiny_model(root / "base", tiny_config("llama", vocab_size=100, max_position_embeddings=512))
    write_char_tokenizer(base)
    tok = load_tokenizer(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    rt = LDMoleRuntime.from_pretrained(base)
    sets = {
        "math": new_adapter_set(rt.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=1, b_std=0.3),
        "code": new_adapter_set(rt.cfg, num_experts=3, rank=2, lambda_hidden=16, seed=2, b_std=0.3,
                                target_modules=["k_proj", "v_proj", "up_proj"]),
        "cls": new_adapter_set(rt.cfg, num_experts=2, rank=2, lambda_hidden=8, seed=3, b_std=0.3, num_labels=3),
    }
    paths = {name: adapter.save(root / name) for name, adapter in sets.items()}
    return base, {name: Path(p) for name, p in paths.items()}


def offline_llm(base: Path, adapters: dict[str, Path]) -> LLM:
    return LLM(base, adapters={k: str(v) for k, v in adapters.items()}, block_size=4, num_blocks=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, base: Path, adapters: dict[str, Path], *, api_key: str | None = None,
                 max_queue: int | None = 256,
                 num_blocks: int = 256, max_body_bytes: int = 1 << 20, adapter_selector: Path | None = None,
                 limits: RequestLimits | None = None, admin_key: str | None = None, engine_options: dict | None = None):
        """admin_key: turn on adapter loading under that key, from the folder that holds the model;
        engine_options: more EngineConfig fields (the adapter tiers)."""
        runtime = LDMoleRuntime.from_pretrained(base, adapters={k: str(v) for k, v in adapters.items()})
        tokenizer = load_tokenizer(base)
        engine = LLMEngine(runtime, tokenizer, EngineConfig(block_size=4, num_blocks=num_blocks, max_num_seqs=32,
                                                            max_num_batched_tokens=256, expert_sample_every=1,
                                                            check_blocks=True, **(engine_options or {})))
        selector = None
        if adapter_selector is not None:
            selector = AdapterSelector(adapter_selector, None, runtime, tokenizer)
            selector.check_targets([BASE_NAME] + list(adapters))
        self.state = ServerState(AsyncLLMEngine(engine, max_queue), BASE_NAME, str(base),
                                 {k: str(v) for k, v in adapters.items()},
                                 ServerSettings(api_key=api_key, max_body_bytes=max_body_bytes,
                                                limits=limits or RequestLimits(),
                                                enable_adapter_loading=admin_key is not None, admin_key=admin_key,
                                                adapter_roots=(str(Path(base).parent),) if admin_key else ()),
                                 adapter_selector=selector)
        self.admin_headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.app = build_app(self.state)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def engine(self) -> LLMEngine:
        return self.state.engine.engine

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def idle(server: LiveServer) -> bool:
    """Nothing in flight or held, and every KV block free."""
    e = server.engine
    return (not e.requests and not e.held and not e.scheduler.running and not e.scheduler.waiting
            and e.block_manager.num_free_blocks == e.block_manager.num_blocks)


def wait_idle(server: LiveServer, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not idle(server):
        assert time.time() < deadline, server.engine.stats()
        time.sleep(0.05)

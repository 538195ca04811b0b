"""One `/v1/completions` request, traced from the route to the expert math, file by file.

A profiler watches a (warm) request from the moment it enters the app until the backend's expert
math is first called: the way down; sampling and output processing on the way back are not
counted. It records

* the path: the project files on the call stack where the request is validated (the engine's
  `prepare_request`), where it is handed to the engine loop (`_stream`), and where the expert
  math runs (from the engine step down). At most 12 files, and none appears twice in a stack
  (no A -> B -> A back and forth);
* every project file in which any Python function runs meanwhile, helpers called on the side
  included (the scheduler, the block manager, ...): a ceiling that keeps the path from spreading.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from pathlib import Path

import httpx
import pytest
from live_server import BASE_NAME, write_model

from ldmole_runtime import LDMoleRuntime
from ldmole_runtime.engine.async_engine import AsyncLLMEngine
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.model.tokenizer import load_tokenizer
from ldmole_server.app import build_app
from ldmole_server.state import ServerState

REPO = Path(__file__).resolve().parents[2]
SOURCES = tuple(str(REPO / folder) + "/" for folder in ("ldmole_runtime", "server", "kernels", "eval", "cli"))
MAX_PATH_FILES = 12
MAX_FILES_TOUCHED = 20
# the backend function that does the expert math, per backend
EXPERT_MATH = {"cpu": ("ldmole_runtime/lora/ops/cpu.py", "fused_segment"),
               "triton": ("kernels/triton/routing.py", "route_logits"),  # Triton's interpreter on CPU
               "torch": ("ldmole_runtime/lora/ops/torch_ref.py", "apply_segment")}


HAND_OFFS = {("ldmole_runtime/engine/llm_engine.py", "prepare_request"),  # the one validation point
             ("ldmole_runtime/engine/async_engine.py", "_stream")}  # queued for the engine loop


def project_file(filename: str) -> str | None:
    return filename[len(str(REPO)) + 1:] if filename.startswith(SOURCES) else None


class PathRecorder:
    def __init__(self, target: tuple[str, str]):
        self.target = target
        self.files: list[str] = []  # in order of first visit
        self.stacks: list[list[str]] = []  # project files on the stack at each hand-off point, outermost first
        self.done = False

    def __call__(self, frame, event, arg):
        if self.done or event != "call":
            return
        name = project_file(frame.f_code.co_filename)
        if name is None:
            return
        if name not in self.files:
            self.files.append(name)
        if (name, frame.f_code.co_name) in HAND_OFFS:
            self.stacks.append(self.stack(frame))
        if (name, frame.f_code.co_name) == self.target:
            self.stacks.append(self.stack(frame))
            self.done = True

    @staticmethod
    def stack(frame) -> list[str]:
        files = []
        while frame is not None:
            name = project_file(frame.f_code.co_filename)
            if name is not None and (not files or files[-1] != name):
                files.append(name)
            frame = frame.f_back
        return files[::-1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("path"))


@pytest.mark.parametrize("backend", sorted(EXPERT_MATH))
def test_a_completion_reaches_the_expert_math_through_few_files(model_files, backend):
    base, adapters = model_files
    runtime = LDMoleRuntime.from_pretrained(base, adapters={k: str(v) for k, v in adapters.items()})
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # the engine's step thread, profiled too
    config = EngineConfig(num_blocks=256, block_size=4, lora_backend=backend)
    engine = AsyncLLMEngine(LLMEngine(runtime, load_tokenizer(base), config), executor=worker)
    state = ServerState(engine, BASE_NAME, str(base), {k: str(v) for k, v in adapters.items()})
    recorder = PathRecorder(EXPERT_MATH[backend])

    async def one_request():
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            warm = await client.post("/v1/completions", json={"model": "math", "prompt": "hi", "max_tokens": 2})
            assert warm.status_code == 200, warm.text  # one-time work (kernel builds, tables) is not the path
            worker.submit(sys.setprofile, recorder).result()
            sys.setprofile(recorder)
            try:
                r = await client.post("/v1/completions", json={"model": "math", "prompt": "hello", "max_tokens": 2})
            finally:
                sys.setprofile(None)
                worker.submit(sys.setprofile, None).result()
        return r

    response = asyncio.run(one_request())
    assert response.status_code == 200, response.text
    assert recorder.done, f"the {backend} backend's expert math never ran"
    path = list(dict.fromkeys(f for stack in recorder.stacks for f in stack))
    print(f"\n{backend}: the path, {len(path)} files:\n  " + "\n  ".join(" -> ".join(s) for s in recorder.stacks))
    print(f"{backend}: {len(recorder.files)} files touched:\n  " + "\n  ".join(recorder.files))
    assert len(recorder.stacks) == 3, recorder.stacks  # validated, handed off, computed: each once
    assert len(path) <= MAX_PATH_FILES, path
    for stack in recorder.stacks:
        assert len(stack) == len(set(stack)), f"a file visited twice on the way down: {' -> '.join(stack)}"
    assert len(recorder.files) <= MAX_FILES_TOUCHED, recorder.files

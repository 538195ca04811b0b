"""Models and adapter management, tokenizer endpoints, health, version and metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import ldmole_runtime
from ldmole_server.chat import chat_prompt
from ldmole_server.completions import state_of
from ldmole_server.errors import APIError
from ldmole_server.protocol import DetokenizeRequest, LoadAdapterRequest, TokenizeRequest, UnloadAdapterRequest

router = APIRouter()


@router.get("/v1/models")
async def list_models(raw: Request):
    state = state_of(raw)
    card = {
        "object": "model",
        "created": state.created,
        "owned_by": "ldmole",
        "max_model_len": state.engine.max_model_len,
    }
    data = [card | {"id": state.base_name, "root": state.base_path, "parent": None}]
    for name in state.model_names()[1:]:
        data.append(card | {"id": name, "root": state.adapter_paths.get(name), "parent": state.base_name})
    return {"object": "list", "data": data}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, raw: Request):
    """Load an adapter set (native or reference LD-MoLE folder) under a new name, between engine steps."""
    state = state_of(raw)
    name = body.lora_name
    if name == state.base_name or name in state.engine.adapter_names(include_unloading=True):
        raise APIError(400, f"the name {name!r} is already in use; unload it first", "lora_name")
    if not Path(body.lora_path).is_dir():
        raise APIError(400, f"lora_path {body.lora_path!r} is not a folder on the server", "lora_path")
    await state.engine.load_adapter(name, body.lora_path)
    state.adapter_paths[name] = body.lora_path
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, raw: Request):
    """Unload a set. New requests for it are refused at once; requests already accepted finish first."""
    state = state_of(raw)
    await state.engine.unload_adapter(body.lora_name)
    state.adapter_paths.pop(body.lora_name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, raw: Request):
    state = state_of(raw)
    if body.model is not None:
        state.resolve_model(body.model)
    if state.engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if body.messages is not None:
        tokens = chat_prompt(state, body.messages, body.add_generation_prompt).token_ids
    else:
        tokens = state.engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, raw: Request):
    state = state_of(raw)
    if state.engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    vocab = state.engine.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must lie in [0, {vocab})", "tokens")
    return {"prompt": state.engine.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(raw: Request):
    state = state_of(raw)
    tok = state.engine.tokenizer
    if tok is None:
        raise APIError(404, "this model has no tokenizer")
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token,
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": state.engine.max_model_len, "vocab_size": state.engine.vocab_size}


@router.get("/health")
async def health(raw: Request):
    state = state_of(raw)
    if state.engine.errored is not None:
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/version")
async def version():
    return {"version": ldmole_runtime.__version__}


@router.get("/metrics")
async def metrics(raw: Request):
    state = state_of(raw)
    body = await asyncio.to_thread(generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

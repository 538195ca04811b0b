"""Models and adapter management, tokenizer endpoints, health, version and metrics."""

from __future__ import annotations

import asyncio
import os
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
    admin = state.settings.is_admin(raw.headers.get("authorization"))  # paths on the server: for its admin only
    data = [card | {"id": state.base_name, "root": state.base_path if admin else None, "parent": None}]
    tiers = state.engine.adapter_tiers()  # device (in a slot), host (read, in memory) or disk (not read yet)
    for name in state.model_names()[1:]:
        data.append(card | {"id": name, "root": state.adapter_paths.get(name) if admin else None,
                            "parent": state.base_name, "ldmole": {"tier": tiers.get(name, "disk")}})
    return {"object": "list", "data": data}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, raw: Request):
    """Load an adapter set (native or reference LD-MoLE folder) under a new name, between engine steps."""
    state = state_of(raw)
    name = body.lora_name
    if name == state.base_name or name in state.engine.adapter_names(include_unloading=True):
        raise APIError(400, f"the name {name!r} is already in use; unload it first", "lora_name")
    path = allowed_adapter_path(state.settings.adapter_roots, body.lora_path)
    if not path.is_dir():
        raise APIError(400, "lora_path is not a folder", "lora_path")
    await state.engine.load_adapter(name, str(path))
    state.adapter_paths[name] = str(path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, raw: Request):
    """Unload a set. New requests for it are refused at once; requests already accepted finish first."""
    state = state_of(raw)
    if body.lora_name in state.pinned and not body.force:
        raise APIError(400, f"adapter set {body.lora_name!r} was given at start-up; unloading it needs "
                            '"force": true', "force")
    await state.engine.unload_adapter(body.lora_name)
    state.metrics.forget(body.lora_name)
    state.adapter_paths.pop(body.lora_name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def allowed_adapter_path(roots, lora_path: str) -> Path:
    """lora_path resolved (symbolic links and `..` followed), if it lies under one of the roots; the
    answer is the same whether or not a path outside them exists."""
    path = Path(os.path.realpath(lora_path))
    for root in roots:
        if path.is_relative_to(os.path.realpath(root)):
            return path
    raise APIError(403, "lora_path is outside the adapter roots this server loads from (--adapter-root)",
                   "lora_path")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, raw: Request):
    state = state_of(raw)
    if body.model is not None:
        state.resolve_model(body.model)
    if state.engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if body.messages is not None:
        tokens = (await chat_prompt(state, body.messages, body.add_generation_prompt)).token_ids
    else:
        state.settings.limits.check_text(body.prompt, param="prompt")
        tokens = await asyncio.to_thread(state.engine.tokenizer.encode, body.prompt,
                                         add_special_tokens=body.add_special_tokens)
    out = {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}
    if body.return_token_strs:  # as vLLM: the vocabulary's strings (byte-level BPE shows a space as "Ġ")
        out["token_strs"] = state.engine.tokenizer.convert_ids_to_tokens(tokens)
    return out


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
    """Liveness: 503 once the engine loop has died, or has had work and finished no step for
    --stall-timeout seconds (a restart is what helps)."""
    state = state_of(raw)
    engine = state.engine
    if engine.errored is not None or engine.stalled_for() > state.settings.stall_timeout_s:
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/ready")
async def ready(raw: Request):
    """Readiness: 503 while the server would turn a new request away (draining, a full queue) or is
    not live, so a load balancer sends it elsewhere for now."""
    state = state_of(raw)
    engine = state.engine
    full = engine.max_queue is not None and engine.num_waiting >= engine.max_queue
    if engine.draining or full or (await health(raw)).status_code != 200:
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/version")
async def version(raw: Request):
    state = state_of(raw)
    dtype = str(state.engine.engine.runtime.dtype).removeprefix("torch.")
    # api_key_required: lets a client (the /ui page) ask for the key before a call fails with 401
    return {"version": ldmole_runtime.__version__, "dtype": dtype, "dtype_choice": state.dtype_choice,
            "api_key_required": bool(state.settings.api_key)}


@router.get("/metrics")
async def metrics(raw: Request):
    state = state_of(raw)
    body = await asyncio.to_thread(generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

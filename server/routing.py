"""The `ldmole.routing` object of a choice: per-token expert routing, when the request asked for it
with `"ldmole": {"routing": "counts" | "weights"}` (ldmole_runtime/engine/routing_trace.py).

    {"format": "counts", "layers": L, "experts": E, "router": "sparsegen",
     "projections": ["q_proj", "v_proj"],
     "tokens": [[[1, 2], [1, 1], ...], ...]}

`tokens` has one entry per token of the choice (the echoed prompt's first, then the generated
ones), each [layers][projections]: with "counts" the number of active experts, with "weights" an
object {"experts": [...], "p": [...], "lambda": λ} listing the experts with p > 0 (`lambda` is
AdaMoLE's threshold for that router, null for routers with neither). A token's entry is the routing
of the position whose logits chose it, as logprobs are aligned, so the first prompt token's is null.
The bare base and single-expert sets send {"format": ..., "none": "<why>"} instead.
"""

from __future__ import annotations

import math

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS
from ldmole_server.errors import APIError

# Routing multiplies a response by layers x projections per token, and the JSON is built on the event
# loop: a request may ask for it on at most this many tokens (choices x (max_tokens + echoed prompt)).
MAX_ROUTED_TOKENS = 2048


def check_routing_budget(choices: int, max_tokens: int | None, echoed: int = 0) -> None:
    """A 400 before any work when a request's routing could exceed MAX_ROUTED_TOKENS."""
    if max_tokens is None:
        raise APIError(400, "routing needs max_tokens (or max_completion_tokens): it is returned per token, "
                            f"for at most {MAX_ROUTED_TOKENS} tokens per request", "max_tokens")
    total = choices * max_tokens + echoed
    if total > MAX_ROUTED_TOKENS:
        raise APIError(400, f"routing is returned for at most {MAX_ROUTED_TOKENS} tokens per request; this one "
                            f"could reach {total} (choices x max_tokens, plus echoed prompts)", "ldmole")


def routing_object(fmt: str, info: dict | None, entries: list) -> dict:
    if info is None or "none" in info:
        why = (info or {}).get("none", "the request has not run yet")
        return {"format": fmt, "none": why}
    columns = [ALL_PROJECTIONS.index(p) for p in info["projections"]]
    tokens = [None if e is None else (_counts(e, columns) if fmt == "counts" else _weights(e, columns))
              for e in entries]
    layers = next((len(t) for t in tokens if t is not None), 0)
    return {"format": fmt, "layers": layers, "experts": info["experts"], "router": info["router"],
            "projections": info["projections"], "tokens": tokens}


def _counts(entry, columns: list[int]) -> list[list[int]]:
    return entry.counts[:, columns].tolist()


def _weights(entry, columns: list[int]) -> list[list[dict]]:
    p = entry.p[:, columns].tolist()
    scalar = entry.scalar[:, columns].tolist()
    return [[{"experts": [e for e, v in enumerate(row) if v > 0], "p": [v for v in row if v > 0],
              "lambda": None if math.isnan(s) else s}
             for row, s in zip(layer_p, layer_s, strict=True)]
            for layer_p, layer_s in zip(p, scalar, strict=True)]

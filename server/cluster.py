"""`ldmole serve --replicas N`: the same OpenAI app as N Ray Serve replicas behind Serve's HTTP proxy.

    Serve's proxy ─▶ Ingress (reads `model`, forwards the request) ─▶ EngineReplica × N

* Every EngineReplica runs the single-process app (server/app.py) unchanged, called in process
  through ASGI, with its own engine and KV cache: every endpoint behaves as without Ray.
* **Affinity** uses Serve's model multiplexing and its replica-choice hook (Serve's "request
  router"): the ingress calls the engine deployment with `multiplexed_model_id` = the request's
  `model`, and `AffinityReplicaChooser` sends a set's requests to the replica that served it (its
  prefix cache is warm there), or to the set's home replica by a stable hash, spilling to another
  replica only when that one is full (`max_ongoing_requests`). Every replica holds every adapter set
  (they are small); runtime loads and unloads go through a registry actor that every replica follows.
* **Faults**: a request whose replica dies before the response started is retried once on another
  replica; one whose stream had started ends with a retriable 503 error event. Serve replaces the
  replica.
* **Metrics**: each replica mirrors its `ldmole:` metrics into Ray's metrics (a `replica` label
  added by Serve), so Ray's one metrics port shows all replicas.
"""

# no `from __future__ import annotations`: Serve rebuilds the ingress routes' signatures, and FastAPI
# must see `Request` as a class there, not as a string
import argparse
import asyncio
import hashlib
import json
import logging
import os
import random

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.request_router import RequestRouter

from ldmole_server.errors import error_body

logger = logging.getLogger("ldmole.cluster")
REGISTRY, NAMESPACE = "ldmole-adapter-registry", "ldmole"  # a named actor in our own Ray namespace
AFFINITY_HEADER = "x-ldmole-affinity"  # "off": route at random (to measure what affinity buys)
REPLICA_HEADER = "x-ldmole-replica"  # which replica answered


# ---- the adapter registry: load/unload at runtime reaches every replica ---------------------------
class AdapterRegistry:
    """Served adapter sets (name → folder) and a version every replica follows."""

    def __init__(self, adapters: dict[str, str]):
        self.adapters, self.version = dict(adapters), 0

    def snapshot(self) -> tuple[int, dict[str, str]]:
        return self.version, dict(self.adapters)

    def set(self, name: str, path: str | None) -> int:
        if path is None:
            self.adapters.pop(name, None)
        else:
            self.adapters[name] = path
        self.version += 1
        return self.version


# ---- one engine replica --------------------------------------------------------------------------
class EngineReplica:
    def __init__(self, serve_args: dict, torch_threads: int):
        import ray
        import torch

        from ldmole_server.app import build_app
        from ldmole_server.build import build_state

        # Ray sets OMP_NUM_THREADS=1 for actors reserving no CPU; a replica gets its share of the node
        torch.set_num_threads(torch_threads)
        self.state = build_state(argparse.Namespace(**serve_args))
        self.app = build_app(self.state)
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.version = 0
        self.tag = serve.get_replica_context().replica_tag
        self.mirror = MetricsMirror(self.state)
        self.sync_task = None
        self.sync_lock = asyncio.Lock()

    @serve.multiplexed(max_num_models_per_replica=1024)
    async def get_model(self, model_id: str) -> str:
        # every set is loaded on every replica: this only lets Serve learn which replica serves which
        return model_id

    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """Run one HTTP request through the app; yields (status, headers) first, then body chunks."""
        model = serve.get_multiplexed_model_id()
        if self.sync_task is None or (model and model not in self.state.model_names()):
            await self._sync()  # a set loaded since the last poll is served at once, not 404
        if self.sync_task is None:
            self.sync_task = asyncio.get_running_loop().create_task(self._follow_registry())
        if model:
            await self.get_model(model)
        async for part in asgi_call(self.app, method, path, query, headers, body):
            if isinstance(part, tuple):
                status, out_headers = part
                yield status, out_headers + [(REPLICA_HEADER.encode(), self.tag.encode())]
            else:
                yield part

    async def _follow_registry(self) -> None:
        """Load and unload sets as the registry changes (and mirror metrics), every 0.5 s."""
        while True:
            try:
                await self._sync()
                self.mirror.update()
            except Exception:  # noqa: BLE001 - a failed sync is retried; the replica keeps serving
                logger.exception("adapter registry sync failed")
            await asyncio.sleep(0.5)

    async def _sync(self) -> None:
        async with self.sync_lock:  # requests and the poll loop may ask at once: apply each change once
            version, adapters = await self.registry.snapshot.remote()
            if version != self.version:
                await self._apply(adapters)
                self.version = version

    async def _apply(self, adapters: dict[str, str]) -> None:
        engine = self.state.engine
        loaded = set(engine.adapter_names(include_unloading=True))
        for name in sorted(loaded - set(adapters)):
            await engine.unload_adapter(name)
            self.state.adapter_paths.pop(name, None)
            self.state.metrics.forget(name)
        for name in sorted(set(adapters) - loaded):
            try:
                await engine.load_adapter(name, adapters[name])
            except Exception as exc:  # noqa: BLE001 - e.g. its folder went away: not retried until the registry changes
                logger.warning("adapter set %r from the registry did not load on this replica: %s", name, exc)
                continue
            self.state.adapter_paths[name] = adapters[name]


async def asgi_call(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Call an ASGI app in process, streaming: (status, headers), then each body chunk as sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "root_path": ""}
    out: asyncio.Queue = asyncio.Queue()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects from inside the replica
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    task = asyncio.get_running_loop().create_task(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(out.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                task.result()  # the app ended without finishing its response: raise its error
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
    finally:
        if not task.done():
            task.cancel()


class MetricsMirror:
    """The replica's `ldmole:` metrics as Ray Serve gauges (Serve adds the `replica` label)."""

    def __init__(self, state):
        self.state, self.gauges = state, {}

    def update(self) -> None:
        from ray.serve import metrics

        for family in self.state.metrics.registry.collect():
            for sample in family.samples:
                if not sample.name.startswith("ldmole:") or sample.name.endswith(("_created", "_bucket")):
                    continue
                name = sample.name.replace(":", "_")
                keys = tuple(sorted(sample.labels))
                gauge = self.gauges.get((name, keys))
                if gauge is None:
                    gauge = self.gauges[(name, keys)] = metrics.Gauge(name, description=family.documentation,
                                                                      tag_keys=keys)
                gauge.set(sample.value, tags=dict(sample.labels) or None)


# ---- replica choice: a set's requests go to its home replica -----------------------------------------
class AffinityReplicaChooser(RequestRouter):
    """Serve's replica-choice hook (Serve calls it a request router). A request carrying a model id
    (the adapter set) goes first to a replica that already served that set, else to the set's home by
    a stable hash; if that replica is full, Serve falls through to the others (the second rank), so
    a hot set still spreads. Requests without one are spread at random."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key or len(replicas) < 2:
            random.shuffle(replicas)
            return [replicas]
        holders = [r for r in replicas if key in r.multiplexed_model_ids]
        digest = int(hashlib.sha1(key.encode()).hexdigest(), 16)
        home = holders[digest % len(holders)] if holders else replicas[digest % len(replicas)]
        rest = [r for r in replicas if r is not home]
        random.shuffle(rest)
        return [[home], rest]


# ---- the ingress -----------------------------------------------------------------------------------
ingress_app = FastAPI(title="ldmole (Ray Serve)")


def _routing_key(body: bytes) -> str | None:
    try:
        data = json.loads(body) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


class Ingress:
    """Serve's one entry: the same guards as the single-process server (server/middleware.py) before
    anything reaches a replica, then the request to the replica that serves its adapter set."""

    def __init__(self, engine, base_name: str, settings, pinned: frozenset[str]):
        import ray

        self.engine, self.base_name, self.settings, self.pinned = engine, base_name, settings, pinned
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.known: set[str] = set(pinned)  # the registry's names, as last read: the only multiplexed model ids
        self.known_at = 0.0
        self.reading: asyncio.Future | None = None  # the registry read in flight, which concurrent requests share

    async def forward(self, request: Request, path: str):
        refused = self._guard(request, "/" + path)
        if refused is not None:
            return refused
        body = await self._body(request)
        if body is None:
            return _error(413, f"the request body is over the limit of {self.settings.max_body_bytes} bytes")
        if path in ("v1/load_lora_adapter", "v1/unload_lora_adapter") and request.method == "POST":
            return await self._adapter_change(path, body, request.headers.raw)
        options = {"stream": True}
        if request.headers.get(AFFINITY_HEADER) != "off":
            options["multiplexed_model_id"] = await self._affinity_key(body)
        args = (request.method, "/" + path, request.url.query.encode(), list(request.headers.raw), body)
        for attempt in range(2):
            stream = self.engine.options(**options).handle.remote(*args)
            try:
                status, headers = await stream.__anext__()
            except Exception as exc:  # the replica died before answering: retry once elsewhere
                if attempt == 0:
                    logger.warning("replica failed before the response started (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                return JSONResponse(_unavailable(str(exc)), status_code=503)
            return _streamed(status, headers, stream)

    def _guard(self, request: Request, path: str):
        refused = self.settings.refusal(path, request.headers.get("authorization"))
        return None if refused is None else _error(*refused)

    async def _body(self, request: Request) -> bytes | None:
        """The body, read up to the limit (None past it)."""
        limit, chunks, size = self.settings.max_body_bytes, [], 0
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return None
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _affinity_key(self, body: bytes) -> str:
        """The request's adapter set if it is one the registry holds (a made-up name must not become a
        multiplexed model id: Serve keeps a metric series per id), else the base's name."""
        key = _routing_key(body) or self.base_name
        if key not in self.known:
            loop = asyncio.get_running_loop()
            if self.reading is None or (self.reading.done() and loop.time() - self.known_at > 0.5):
                self.known_at = loop.time()  # made-up names read the registry at most twice a second
                self.reading = asyncio.ensure_future(self._read_registry())
            await asyncio.shield(self.reading)
        return key if key in self.known else self.base_name

    async def _read_registry(self) -> None:
        try:
            self.known = set((await self.registry.snapshot.remote())[1])
        except Exception:  # noqa: BLE001 - the names as last read still route; the next miss reads again
            logger.exception("reading the adapter registry failed")

    async def _adapter_change(self, path: str, body: bytes, headers: list):
        """A load is tried on one replica (it validates the folder against the base and the adapter
        roots), then put in the registry that every replica follows; an unload leaves the registry at
        once, and each replica drops the set once its running requests for it have finished (within a
        second)."""
        try:
            data = json.loads(body)
            name = data["lora_name"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return _error(400, 'expected {"lora_name": ...}')
        if path.endswith("unload_lora_adapter"):
            version, adapters = await self.registry.snapshot.remote()
            if name not in adapters:
                return _error(404, "that adapter set is not loaded")
            if name in self.pinned and data.get("force") is not True:
                return _error(400, "that adapter set was given at start-up; unloading it needs \"force\": true")
            await self.registry.set.remote(name, None)
            return JSONResponse({"status": "ok", "unloaded": name})
        kept = [(k, v) for k, v in headers if k.lower() in (b"authorization", b"content-type")]
        stream = self.engine.options(stream=True).handle.remote("POST", "/" + path, b"", kept, body)
        status, _ = await stream.__anext__()
        chunks = [c async for c in stream]
        if status == 200:
            await self.registry.set.remote(name, data.get("lora_path"))
        return Response(b"".join(chunks), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def _unavailable(reason: str) -> dict:
    logger.warning("a replica failed: %s", reason)  # Ray's traceback stays in the log
    return error_body(503, "the replica serving this request failed; retry it")


def _streamed(status: int, headers: list, stream) -> Response:
    hop = {b"content-length", b"transfer-encoding", b"connection"}
    kept = {k.decode(): v.decode() for k, v in headers if k.lower() not in hop}
    media = kept.pop("content-type", None)

    async def body():
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:  # the replica died mid-stream: end with a retriable error event
            yield f"data: {json.dumps(_unavailable(str(exc)))}\n\n".encode()
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), status_code=status, headers=kept, media_type=media)


@serve.ingress(ingress_app)
class IngressDeployment(Ingress):
    @ingress_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def route(self, request: Request, path: str):
        return await self.forward(request, path)


def deploy(args, adapters: dict, base_name: str):
    """Deploy on the connected Ray cluster: the registry actor (returned: keep it referenced), N
    engine replicas and the ingress, behind Serve's proxy at args.host:args.port."""
    import ray

    from ldmole_server.build import settings_from_args

    registry = ray.remote(AdapterRegistry).options(name=REGISTRY, namespace=NAMESPACE, get_if_exists=True,
                                                   num_cpus=0).remote(adapters)
    ray.get(registry.snapshot.remote())
    serve.start(http_options={"host": args.host, "port": args.port})
    cluster_only = ("func", "command", "replicas", "address", "metrics_port", "cpus_per_replica", "gpus_per_replica")
    serve_args = {k: v for k, v in vars(args).items() if k not in cluster_only}
    # torch threads per replica: its reserved CPUs, else an even share of this machine's cores but one,
    # which Serve's proxy and the ingress need (on 2 cores, 1 replica with 2 threads ran at 0.78x of 1 thread)
    share = max(1, ((os.cpu_count() or 1) - 1) // args.replicas)
    threads = int(args.cpus_per_replica) if args.cpus_per_replica >= 1 else share
    engine = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=args.replicas,
                              max_ongoing_requests=args.max_num_seqs, health_check_period_s=1,
                              request_router_config={"request_router_class": AffinityReplicaChooser},
                              ray_actor_options={"num_cpus": args.cpus_per_replica,
                                                 "num_gpus": args.gpus_per_replica}).bind(serve_args, threads)
    ingress = serve.deployment(IngressDeployment, name="Ingress", max_ongoing_requests=4096,
                               ray_actor_options={"num_cpus": 0}).bind(engine, base_name, settings_from_args(args),
                                                                       frozenset(adapters))
    serve.run(ingress, name="ldmole", route_prefix="/")
    return registry


def run_cluster(args, adapters: dict, base_name: str) -> int:
    """Start (or join, with --address) a Ray cluster, deploy, and serve until interrupted."""
    import signal
    import threading

    import ray

    local = args.address in (None, "local")
    ray.init(address=args.address, include_dashboard=False, ignore_reinit_error=True,
             **({"num_cpus": max(2, args.replicas)} if local else {}),
             **({"_metrics_export_port": args.metrics_port} if args.metrics_port else {}))
    registry = deploy(args, adapters, base_name)  # noqa: F841 - an actor nobody references is destroyed
    print(f"ldmole is serving on {args.replicas} Ray Serve replica(s) at http://{args.host}:{args.port} "
          "(OpenAI API under /v1; routing page at /ui)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0

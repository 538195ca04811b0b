"""`ldmole train --load-into URL`: hand the finished adapter to a running `ldmole serve`.

The server loads it through its load endpoint, so it appears in `/v1/models` without a restart.
That endpoint is the server's admin surface: on only with `--enable-adapter-loading`, behind its
admin key (else its API key), for folders under its `--adapter-root`. The server is probed before
training, so a wrong URL or key, or a server that does not load adapters, fails before any compute
is spent.
"""

from __future__ import annotations

import os

from ldmole_runtime.errors import LDMoleError


def _client(url: str, api_key: str | None):
    import httpx

    if not url.startswith(("http://", "https://")):
        raise LDMoleError(f"--load-into takes the server's base URL (http://HOST:PORT), got {url!r}")
    key = api_key or os.environ.get("LDMOLE_ADMIN_KEY") or os.environ.get("LDMOLE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120)


def _check(response, what: str) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise LDMoleError(f"{what}: the server answered {response.status_code}: {message}")


def probe(url: str, name: str, api_key: str | None) -> None:
    """The server answers, loads adapters for this key, and has no model called `name` yet."""
    import httpx

    try:
        with _client(url, api_key) as client:
            response = client.get("/v1/models")
            # an empty load request: refused as malformed (400) only where loading is on and the key is right
            loading = client.post("/v1/load_lora_adapter", json={})
    except httpx.HTTPError as exc:
        raise LDMoleError(f"--load-into: cannot reach {url} ({exc})") from None
    _check(response, f"--load-into {url}")
    if loading.status_code != 400:
        _check(loading, f"--load-into {url}")
    if name in {m["id"] for m in response.json().get("data", [])}:
        raise LDMoleError(f"--load-into: the server already serves a model called {name!r}; choose --load-as")


def load_into(url: str, name: str, path: str, api_key: str | None) -> None:
    import httpx

    try:
        with _client(url, api_key) as client:
            response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    except httpx.HTTPError as exc:
        raise LDMoleError(f"--load-into: cannot reach {url} ({exc}); the adapter is saved at {path}") from None
    _check(response, f"--load-into {url} (the adapter is saved at {path})")

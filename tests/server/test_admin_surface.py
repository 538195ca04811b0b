"""Runtime adapter management is an admin surface: off unless `--enable-adapter-loading`, behind the
admin key, confined to `--adapter-root` folders; sets given at start-up stay unless a request insists;
paths on the server are shown to the admin only; adapter names keep to a plain character set; and a
server that listens beyond localhost needs a key."""

import argparse
import os
import shutil

import httpx
import pytest
from live_server import BASE_NAME, LiveServer, write_model

from ldmole_runtime.errors import LDMoleError
from ldmole_server.build import build_state, read_key
from ldmole_server.launch import add_serve_flags, check_exposure


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("admin") / "root")


@pytest.fixture(scope="module")
def admin_server(model_files):
    with LiveServer(*model_files, admin_key="admin") as srv:
        yield srv


def names(url, headers) -> dict:
    return {m["id"]: m["root"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]}


def test_adapter_loading_is_off_unless_enabled(model_files):
    _, adapters = model_files
    with LiveServer(*model_files) as srv:
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapters["math"])}),
                           ("/v1/unload_lora_adapter", {"lora_name": "math"})):
            r = httpx.post(srv.url + path, json=body)
            assert r.status_code == 404 and "--enable-adapter-loading" in r.json()["error"]["message"]
        models = names(srv.url, {})
        assert "math" in models and set(models.values()) == {None}  # no paths without an admin


def test_the_admin_key_guards_loading_and_the_roots_confine_it(model_files, tmp_path):
    base, adapters = model_files
    elsewhere = shutil.copytree(adapters["math"], tmp_path / "elsewhere")  # a real adapter, outside the root
    (base.parent / "link").symlink_to(elsewhere)  # inside the root, pointing out of it
    with LiveServer(*model_files, api_key="user", admin_key="admin") as srv:
        user, admin = {"Authorization": "Bearer user"}, srv.admin_headers

        def load(path, headers=admin, name="again"):
            return httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                              headers=headers)

        assert load(adapters["math"], {}).status_code == 401
        assert load(adapters["math"], user).status_code == 401  # the API key is not the admin's
        refusals = [load(p) for p in (elsewhere, "/no/such/folder", base.parent / "link",
                                      base.parent / ".." / "elsewhere")]
        assert {r.status_code for r in refusals} == {403}
        assert len({r.json()["error"]["message"] for r in refusals}) == 1  # nothing said about what exists
        assert load(adapters["math"]).status_code == 200
        assert names(srv.url, user)["again"] is None and names(srv.url, admin)["again"] == str(adapters["math"])

        def unload(name, **extra):
            return httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": name} | extra, headers=admin)

        kept = unload("math")
        assert kept.status_code == 400 and '"force": true' in kept.json()["error"]["message"]
        assert unload("again").status_code == 200  # loaded at run time: no insisting needed
        assert unload("math", force=True).status_code == 200
        assert set(names(srv.url, user)) == {BASE_NAME, "code", "cls"}
        r = httpx.post(srv.url + "/v1/completions", json={"model": "code", "prompt": "hi", "max_tokens": 2},
                       headers=admin)  # the admin key opens the API as well
        assert r.status_code == 200


@pytest.mark.parametrize("name", ["a\x00b", "two\nlines", "right\u202eleft", "auto", "", "-x", "x" * 129])
def test_adapter_names_keep_to_a_plain_character_set(model_files, admin_server, name):
    base, adapters = model_files
    srv = admin_server
    r = httpx.post(srv.url + "/v1/load_lora_adapter", headers=srv.admin_headers,
                   json={"lora_name": name, "lora_path": str(adapters["math"])})
    assert r.status_code == 400, r.text
    assert "\x00" not in httpx.get(srv.url + "/metrics").text
    args = serve_args("--base", str(base), f"--adapter={name}={adapters['math']}")
    with pytest.raises(LDMoleError):
        build_state(args)


def serve_args(*argv):
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return parser.parse_args(list(argv))


def test_start_up_refuses_unsafe_settings(model_files, tmp_path, monkeypatch):
    base, _ = model_files
    monkeypatch.delenv("LDMOLE_API_KEY", raising=False)
    with pytest.raises(LDMoleError, match="--adapter-root"):
        build_state(serve_args("--base", str(base), "--enable-adapter-loading", "--admin-key", "k"))
    with pytest.raises(LDMoleError, match="needs a key"):
        build_state(serve_args("--base", str(base), "--enable-adapter-loading", "--adapter-root", str(tmp_path)))
    with pytest.raises(LDMoleError, match="--allow-unauthenticated"):
        check_exposure(serve_args("--host", "0.0.0.0"))
    check_exposure(serve_args("--host", "0.0.0.0", "--allow-unauthenticated"))
    check_exposure(serve_args())  # 127.0.0.1
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    check_exposure(serve_args("--host", "0.0.0.0", "--api-key-file", str(key_file)))
    assert read_key(None, str(key_file), "UNSET_VARIABLE") == "from-a-file"
    monkeypatch.setenv("LDMOLE_API_KEY", "from-the-environment")
    check_exposure(serve_args("--host", "0.0.0.0"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(LDMoleError, match="empty"):
        read_key(None, str(tmp_path / "empty"), "LDMOLE_API_KEY")
    assert os.environ["LDMOLE_API_KEY"] == "from-the-environment"


def series(url) -> set[str]:
    return {line.split(" ")[0] for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("ldmole:")}


def test_an_unloaded_set_leaves_no_metric_series_and_labels_are_capped(model_files, admin_server):
    """Every set used to leave its ~75 series behind when unloaded; now they go with it, and past a cap
    sets share the label "other"."""
    _, adapters = model_files
    srv, admin = admin_server, admin_server.admin_headers
    body = {"model": "math", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 200
    before = series(srv.url)
    load = {"lora_name": "passing", "lora_path": str(adapters["math"])}
    assert httpx.post(srv.url + "/v1/load_lora_adapter", json=load, headers=admin).status_code == 200
    for _ in range(2):
        r = httpx.post(srv.url + "/v1/completions", json=body | {"model": "passing", "stream": True})
        assert r.status_code == 200
    during = series(srv.url)
    assert any('adapter="passing"' in s for s in during) and len(during) > len(before)
    assert httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "passing"},
                      headers=admin).status_code == 200
    assert series(srv.url) == before
    assert httpx.post(srv.url + "/v1/completions", json=body | {"model": "made-up"}).status_code == 404
    assert not any("made-up" in s for s in series(srv.url))  # a rejected name makes no series

    from ldmole_server.metrics import OTHER, ServerMetrics

    metrics = ServerMetrics(srv.state.engine, max_labelled_sets=2)
    assert [metrics.tracker(name).adapter for name in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]
    metrics.forget("a")
    assert metrics.tracker("e").adapter == "e"

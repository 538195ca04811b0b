"""`ldmole train --load-into URL`: the finished adapter appears in a running server, its admin key
honoured; a wrong key, or a server that does not load adapters, fails before any training."""

import json
import random

import httpx
from live_server import LiveServer, write_model

from ldmole_cli.main import main


def test_trained_adapter_is_loaded_into_a_running_server(tmp_path, capsys):
    base, adapters = write_model(tmp_path / "model")
    g = random.Random(0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"Key {w}?", "choices": ["ox", "fig"], "answer": i})
                            + "\n" for w, i in (g.choice([("sun", 0), ("moon", 1)]) for _ in range(16))))
    flags = ["train", "--base", str(base), "--data", str(data), "--task", "mc", "--experts", "2", "--rank", "2",
             "--lambda-hidden", "8", "--epochs", "1", "--max-length", "128", "--no-progress", "--device", "cpu",
             "--eval-kv-cache-gib", "0.01"]
    with LiveServer(base, adapters, api_key="user") as srv:  # adapter loading off
        assert main([*flags, "--out", str(tmp_path / "bad"), "--load-into", srv.url, "--api-key", "user"]) == 2
        assert "--enable-adapter-loading" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with LiveServer(base, adapters, api_key="user", admin_key="secret") as srv:
        # a key that is not the admin's: refused before any compute, nothing written
        assert main([*flags, "--out", str(tmp_path / "bad"), "--load-into", srv.url, "--api-key", "user"]) == 2
        assert "401" in capsys.readouterr().err and not (tmp_path / "bad").exists()
        run = base.parent / "run"  # under the server's --adapter-root
        assert main([*flags, "--out", str(run), "--load-into", srv.url, "--api-key", "secret",
                     "--load-as", "fresh"]) == 0
        assert "loaded into" in capsys.readouterr().out
        auth = {"Authorization": "Bearer user"}
        models = httpx.get(f"{srv.url}/v1/models", headers=auth).json()["data"]
        assert "fresh" in {m["id"] for m in models}
        out = httpx.post(f"{srv.url}/v1/completions", headers=auth,
                         json={"model": "fresh", "prompt": "Key sun?", "max_tokens": 3, "temperature": 0}).json()
        assert out["model"] == "fresh" and len(out["choices"]) == 1

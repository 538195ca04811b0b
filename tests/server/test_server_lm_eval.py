"""lm-eval's own `local-completions` backend against the server, offline, on a small local
multiple-choice task: its accuracy equals what LLM.score gives in-process."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import LiveServer, offline_llm, write_model

WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain", "snow"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("lmeval"))


def write_task(folder: Path, n: int = 16) -> list[dict]:
    rng = random.Random(0)
    docs = [{"question": f"Q{i}: {' '.join(rng.sample(WORDS, 3))} is", "choices": rng.sample(WORDS, 4),
             "answer": rng.randrange(4)} for i in range(n)]
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return docs


@pytest.mark.parametrize("adapter", ["math", None])
def test_local_completions_accuracy_equals_llm_score(model_files, tmp_path, adapter):
    docs = write_task(tmp_path)
    llm = offline_llm(*model_files)
    tok = llm.engine.tokenizer
    correct = 0
    for d in docs:  # lm-eval's split: the context, then " " + choice as the continuation
        ctx = tok.encode(d["question"], add_special_tokens=False)
        res = llm.score(ctx, [tok.encode(" " + c, add_special_tokens=False) for c in d["choices"]], adapter=adapter)
        correct += res.best == d["answer"]
    expected = correct / len(docs)

    with LiveServer(*model_files) as srv:
        model = adapter or "tiny-llama"
        cli = Path(sys.executable).with_name("lm_eval")
        out = subprocess.run(
            [str(cli), "--model", "local-completions", "--model_args",
             f"model={model},base_url={srv.url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
             "num_concurrent=2,max_retries=1",
             "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
             "--batch_size", "4"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env=os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(expected, abs=1e-9), (acc, expected)
    assert 0 < expected < 1  # the task separates right from wrong on this model

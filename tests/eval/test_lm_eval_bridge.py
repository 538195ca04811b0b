"""`lm_eval --model ldmole` on a tiny Llama with adapter sets, offline.

The references: `LLM.score` / `LLM.generate` computed directly (the engine), and lm-eval's own `hf`
backend on the same folder (transformers' model, for the bare base)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import offline_llm, write_model

from ldmole_runtime.engine.sampling_params import SamplingParams

WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain", "snow"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("bridge"))


@pytest.fixture(scope="module")
def llm(model_files):
    return offline_llm(*model_files)


def _yaml_task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {data}\ntest_split: test\n{body}")


def write_mc_task(folder: Path, n: int = 20) -> list[dict]:
    rng = random.Random(0)
    # several questions share a context, so groups hold 4 or 8 continuations
    docs = [{"question": f"Q{i // 2}: {' '.join(rng.sample(WORDS, 3))} is", "choices": rng.sample(WORDS, 4),
             "answer": rng.randrange(4)} for i in range(n)]
    for i in range(1, n, 2):
        docs[i]["question"] = docs[i - 1]["question"]
    _yaml_task(folder, "tiny_mc", docs, "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
               "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return docs


def expected_accuracy(llm, docs, adapter):
    """acc and acc_norm as lm-eval defines them, from LLM.score: the context, then " " + choice."""
    tok = llm.engine.tokenizer
    acc = acc_norm = 0
    for d in docs:
        res = llm.score(tok.encode(d["question"]), [tok.encode(" " + c) for c in d["choices"]], adapter=adapter)
        sums = [c.sum_logprob for c in res.choices]
        normed = [s / len(c) for s, c in zip(sums, d["choices"], strict=True)]  # lm-eval: per byte of the choice text
        acc += max(range(4), key=sums.__getitem__) == d["answer"]
        acc_norm += max(range(4), key=normed.__getitem__) == d["answer"]
    return acc / len(docs), acc_norm / len(docs)


def lm_eval_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("lm_eval")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=os.environ | OFFLINE)


def printed_metrics(stdout: str) -> dict[str, float]:
    """Metric -> value from the results table lm_eval prints (|Tasks|Version|Filter|n-shot|Metric| |Value|...)."""
    metrics = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[4] in ("acc", "acc_norm"):
            metrics[cells[4]] = float(cells[6])
    return metrics


def test_cli_accuracy_equals_llm_score(model_files, llm, tmp_path):
    base, adapters = model_files
    docs = write_mc_task(tmp_path)
    limit = 16
    out = lm_eval_cli(["--model", "ldmole", "--model_args",
                       f"base={base},adapter=math:{adapters['math']};code:{adapters['code']},active=code,dtype=float32",
                       "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--limit", str(limit),
                       "--batch_size", "3", "--output_path", str(tmp_path / "out")], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["tiny_mc"]
    acc, acc_norm = expected_accuracy(llm, docs[:limit], "code")
    assert results["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert results["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    assert 0 < acc < 1
    printed = printed_metrics(out.stdout)  # the table lm_eval prints carries the same figures
    assert printed["acc"] == pytest.approx(acc, abs=1e-4) and printed["acc_norm"] == pytest.approx(acc_norm, abs=1e-4)
    assert expected_accuracy(llm, docs[:limit], "math") != (acc, acc_norm)  # the active set mattered


def write_rolling_and_gen_tasks(folder: Path) -> tuple[list[dict], list[dict]]:
    rng = random.Random(1)
    texts = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 25)))} for _ in range(6)]
    _yaml_task(folder, "tiny_rolling", texts, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
               "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    prompts = [{"prompt": f"{' '.join(rng.sample(WORDS, 3))} and", "target": "x"} for _ in range(6)]
    _yaml_task(folder, "tiny_gen", prompts, "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
               "doc_to_target: \"{{target}}\"\ngeneration_kwargs:\n  until: [\"e\", \"o\"]\n  max_gen_toks: 10\n"
               "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return texts, prompts


def evaluate(model: str, model_args: str, folder: Path) -> dict[str, list]:
    """Per-document responses of tiny_rolling and tiny_gen, through lm-eval's own evaluator."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_rolling", "tiny_gen"],
                                  task_manager=TaskManager(include_path=str(folder)), log_samples=True,
                                  batch_size=4, device="cpu")
    return {task: [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in out["samples"].items()}


def test_rolling_and_generation_match_hf_and_engine(model_files, llm, tmp_path, monkeypatch):
    import lm_eval.utils
    base, adapters = model_files
    texts, prompts = write_rolling_and_gen_tasks(tmp_path)
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    # max_length 24 splits the longer texts into several rolling windows
    ours = evaluate("ldmole", f"base={base},dtype=float32,max_length=24", tmp_path)
    hf = evaluate("hf", f"pretrained={base},dtype=float32,max_length=24", tmp_path)
    assert ours["tiny_rolling"] == pytest.approx(hf["tiny_rolling"], rel=1e-5, abs=1e-4)
    assert ours["tiny_gen"] == hf["tiny_gen"]
    assert any(len(llm.engine.tokenizer.encode(t["text"])) > 24 for t in texts)  # several windows were needed

    # with an adapter set: against the engine directly, windows as lm-eval cuts them
    with_adapter = evaluate("ldmole", f"base={base},adapter={adapters['math']},dtype=float32,max_length=24",
                            tmp_path)
    tok = llm.engine.tokenizer
    for doc, got in zip(texts, with_adapter["tiny_rolling"], strict=True):
        windows = map(lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
            token_list=tok.encode(doc["text"]), prefix_token=tok.bos_token_id, max_seq_len=24, context_len=1))
        want = 0.0
        for ctx, cont in windows:
            out = llm.generate(ctx + cont, SamplingParams(max_tokens=0, prompt_logprobs=0), adapter="math")[0]
            want += sum(lp.logprob for lp in out.prompt_logprobs[len(ctx):])
        assert got == pytest.approx(want, abs=1e-4)
    assert with_adapter["tiny_rolling"] != pytest.approx(ours["tiny_rolling"], abs=1e-3)
    for doc, got in zip(prompts, with_adapter["tiny_gen"], strict=True):
        prompt = tok.encode(doc["prompt"])[-(24 - 10):]  # max_length - max_gen_toks, cut from the left as `hf` does
        out = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, stop=["e", "o", "</s>"]),
                           adapter="math")[0]
        assert got == out.outputs[0].text


def test_bad_model_args_are_one_line_before_any_task_loads(model_files, tmp_path):
    # the task's data file does not exist: had the task loaded first, that would be the error
    (tmp_path / "never.yaml").write_text("task: never_loaded\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\n"
                                        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n"
                                        "doc_to_target: 0\n")
    base, adapters = model_files
    out = lm_eval_cli(["--model", "ldmole", "--model_args", f"base={base},adaptr={adapters['math']}",
                       "--tasks", "never_loaded", "--include_path", str(tmp_path)], tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lm_eval --model ldmole: unknown model_args key(s) adaptr"), last


@pytest.mark.parametrize("args, message", [
    ("base={tmp}/nope", "no such folder"),
    ("base={base},adapter={tmp}/nope", "is not a folder"),
    ("base={base},adapter=math:{math};code:{code}", "pick one with active=NAME"),
    ("base={base},adapter=math:{math},active=code", "active=code: no adapter set of that name"),
    ("base={base},adapter={other}", "hidden size 48 != base hidden size 64"),
    ("base={base},batch_size=0", "batch_size"),
    ("base={base},max_length=100000", "too long for this base"),
])
def test_bad_model_args(model_files, tmp_path, args, message):
    from tiny_models import tiny_config, write_tiny_model

    from ldmole_eval.harness import LDMoleLM
    from ldmole_runtime import LDMoleRuntime, new_adapter_set
    from ldmole_runtime.errors import LDMoleError

    base, adapters = model_files
    other_base = write_tiny_model(tmp_path / "other", tiny_config("llama", hidden_size=48))
    other = new_adapter_set(LDMoleRuntime.from_pretrained(other_base).cfg, num_experts=2, rank=2,
                            lambda_hidden=8).save(tmp_path / "other_adapter")
    args = args.format(tmp=tmp_path, base=base, math=adapters["math"], code=adapters["code"], other=other)
    with pytest.raises(LDMoleError, match=message):
        LDMoleLM.create_from_arg_string(args, {"device": "cpu"})


def test_several_adapters_one_engine(model_files, llm):
    from lm_eval.api.instance import Instance

    from ldmole_eval.harness import LDMoleLM

    base, adapters = model_files
    lm = LDMoleLM(base=str(base), adapter=f"math:{adapters['math']};code:{adapters['code']}", active="base",
                  batch_size="auto", max_batch_size=16, dtype="float32")
    assert lm.llm.engine.config.max_num_seqs == 16  # auto: the engine's default, capped by max_batch_size
    reqs = [Instance("loglikelihood", {}, args, 0)
            for args in (("red cat is", " blue"), ("red cat is", " sun"), ("dog", " moon rock"))]
    tok = llm.engine.tokenizer
    for name in (None, "math", "code"):
        before = lm.llm.engine.computed_tokens
        got = [lp for lp, _ in lm.for_adapter(name).loglikelihood(reqs)]
        # a shared context runs once; a continuation's last token is only a target
        assert lm.llm.engine.computed_tokens - before == len("red cat is") + 4 + 3 + len("dog") + 9
        want = [llm.score(tok.encode(c), [tok.encode(x)], adapter=name).choices[0].sum_logprob
                for c, x in (r.args for r in reqs)]
        assert got == pytest.approx(want, abs=1e-5)
    assert lm.for_adapter("math").llm is lm.llm  # one engine, weights loaded once
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi\n<assistant>"


def test_hook_registers_once_and_keeps_builtin_models():
    code = ("import site, sys, ldmole_eval.lm_eval_hook as h\n"
            "h.install(); h.install()\n"
            "for d in site.getsitepackages(): site.addsitedir(d)\n"  # the .pth processed a second time
            "from lm_eval.api.registry import get_model, model_registry\n"
            "print(sum(type(f).__name__ == 'RegistryWatcher' for f in sys.meta_path), get_model('ldmole').__name__,\n"
            "      get_model('hf').__name__, 'local-completions' in model_registry)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "LDMoleLM", "HFLM", "True"]

"""`ldmole bench-hf`: the bare base on ldmole's engine against transformers' own `generate`.

The same base folder loaded by both, the same prompts (windows of real text, all of one length, so
neither pads), greedy, the same number of new tokens (EOS ignored), whole requests timed (prefill
and decode), rounds of the two interleaved in one process so that machine noise hits both alike;
medians. It also reports how many of the greedy outputs are token for token identical.
"""

from __future__ import annotations

import statistics
import time

import torch

from ldmole_cli.bench import PromptSource
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.dtypes import auto_dtype
from ldmole_runtime.model.runtime import LDMoleRuntime, resolve_dtype


def run(base: str, dtype: str, batch_sizes: tuple[int, ...], prompt_len: int, new_tokens: int, rounds: int,
        text: str | None = "social_iqa") -> dict:
    from transformers import AutoModelForCausalLM

    folder = resolve_base(base)
    dtype = auto_dtype("cpu")[0] if dtype == "auto" else dtype
    runtime = LDMoleRuntime.from_pretrained(folder, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype)).eval()
    vocab = runtime.cfg.vocab_size
    prompts = PromptSource.from_text(folder, text, vocab) if text else PromptSource(vocab)
    engine = LLMEngine(runtime, config=EngineConfig(max_num_seqs=max(batch_sizes)))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    result = {"base": folder.name, "dtype": dtype, "threads": torch.get_num_threads(), "prompt_len": prompt_len,
              "new_tokens": new_tokens, "rounds": rounds, "tokens_per_s": {}, "identical_outputs": {}}
    for b in batch_sizes:
        batch = prompts(b, prompt_len, seed=b)
        times: dict[str, list[float]] = {"ldmole": [], "hf": []}
        for r in range(rounds + 1):  # round 0 warms both up and is not timed
            start = time.perf_counter()
            for i, ids in enumerate(batch):
                engine.add_request(f"{b}-{r}-{i}", ids, params)
            ours = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        ours[out.request_id] = out.outputs[0].token_ids
            ours_time = time.perf_counter() - start
            start = time.perf_counter()
            with torch.inference_mode():
                ids = torch.tensor(batch)
                theirs = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, prompt_len:]
            hf_time = time.perf_counter() - start
            if r:
                times["ldmole"].append(ours_time)
                times["hf"].append(hf_time)
        same = sum(list(ours[f"{b}-{rounds}-{i}"]) == theirs[i].tolist() for i in range(b))
        result["tokens_per_s"][str(b)] = {k: round(b * new_tokens / statistics.median(v), 2) for k, v in times.items()}
        result["tokens_per_s"][str(b)]["ldmole_over_hf"] = round(statistics.median(times["hf"])
                                                                  / statistics.median(times["ldmole"]), 3)
        result["identical_outputs"][str(b)] = f"{same}/{b}"
    return result

"""`lm_eval --model ldmole`: lm-evaluation-harness requests answered by the ldmole engine.

    lm_eval --model ldmole --model_args base=DIR,adapter=DIR --tasks ldmole_arc_easy \\
        --include_path "$(ldmole eval-tasks --path)"

Tokenisation follows lm-eval's `hf` backend exactly (TemplateLM's context/continuation split,
the same special-token rule, the same truncation and rolling windows), so that both backends score
the same token sequences; only the forward differs:

* loglikelihood: requests are grouped by context. A group's context is prefilled once and each
  continuation is a fork of its KV (`LLM.score_many`); many groups share every engine step.
* loglikelihood_rolling: lm-eval's own disjoint rolling windows, scored as above.
* generate_until: continuous batching, stop strings and `max_gen_toks` as the task asks.

`batch_size` is the number of sequences per engine step (`auto`: the engine's default, sized to
its KV cache). Several adapter sets load once and `for_adapter(name)` evaluates each in turn.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ldmole_eval.model_args import parse_model_args
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.model.tokenizer import load_tokenizer

logger = logging.getLogger("ldmole.eval")

# Generation kwargs that map onto SamplingParams; `do_sample` and the token limits are handled first.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
_NO_OP_KEYS = ("do_sample", "use_cache")
# contexts per LLM.score_many / requests per LLM.generate call: the engine batches them (and keeps
# held contexts within its cache); these only pace the progress bar
_SCORE_CHUNK = 256
_GENERATE_CHUNK = 256


def _from_lm_eval_cli() -> bool:
    argv0 = Path(sys.argv[0])
    return argv0.name in ("lm_eval", "lm-eval") or argv0.parent.name == "lm_eval"


class LDMoleLM(TemplateLM):
    def __init__(self, **model_args):
        super().__init__()
        args = parse_model_args(model_args)
        base = resolve_base(args.base)
        runtime = LDMoleRuntime.from_pretrained(base, adapters=args.adapters, dtype=args.dtype, device=args.device)
        base_len = runtime.cfg.max_position_embeddings
        # A scored sequence is context + continuation, at most max_length + 1 tokens (as in `hf`),
        # and the engine wants room for one more position than its longest prompt.
        self.max_length = args.max_length or base_len - 2
        if self.max_length + 2 > base_len:
            raise LDMoleError(f"max_length={self.max_length} is too long for this base: at most {base_len - 2} "
                              f"(max_position_embeddings {base_len})")
        self.llm = LLM(runtime, tokenizer=load_tokenizer(base), lora_backend=args.lora_backend,
                       max_num_seqs=args.max_num_seqs,
                       kv_cache_gib=args.kv_cache_gib, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=self.max_length + 2)
        self.tokenizer = self.llm.engine.tokenizer
        if self.tokenizer is None:
            raise LDMoleError(f"base={args.base} has no tokenizer files; lm-eval's tasks are text")
        self.active = args.active
        self.add_bos_token = args.add_bos_token
        self.batch_size = args.batch_size
        self._device = args.device

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return _cli_errors(lambda: super(LDMoleLM, cls).create_from_arg_string(arg_string, additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        return _cli_errors(lambda: super(LDMoleLM, cls).create_from_arg_obj(arg_dict, additional_config))

    def for_adapter(self, name: str | None) -> LDMoleLM:
        """The same engine answering with another loaded adapter set (None: the bare base)."""
        if name is not None:
            self.llm.engine.resolve_adapter(name)  # unknown: a clear error now, not mid-evaluation
        view = copy.copy(self)
        view.active = name
        return view

    # ---- what lm-eval asks of a model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def device(self) -> str:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        # The `hf` backend's rule: the tokenizer's own habit unless add_bos_token says otherwise,
        # and never a second BOS in front of a string that already starts with one.
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **extra)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- loglikelihood ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        conts = []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            ctx, cont = self._truncate(list(context_enc), list(continuation_enc))
            groups.setdefault(tuple(ctx), []).append(i)
            conts.append(cont)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="ldmole loglikelihood") as bar:
            order = list(groups.items())
            for chunk in (order[at:at + _SCORE_CHUNK] for at in range(0, len(order), _SCORE_CHUNK)):
                items = [(list(ctx), [conts[i] for i in idxs]) for ctx, idxs in chunk]
                for (_, idxs), scored in zip(chunk, self.llm.score_many(items, adapter=self.active), strict=True):
                    for i, choice in zip(idxs, scored.choices, strict=True):
                        results[i] = (choice.sum_logprob, choice.is_greedy)
                        if requests[i][0] is not None and requests[i][0][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                    bar.update(len(idxs))
        return results

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """As the `hf` backend: keep the last max_length + 1 tokens of context + continuation."""
        if not cont:
            raise LDMoleError("lm-eval sent an empty continuation to score")
        if len(cont) > self.max_length:
            raise LDMoleError(f"a continuation of {len(cont)} tokens is longer than max_length={self.max_length}")
        whole = (ctx + cont)[-(self.max_length + 1):]
        return whole[:len(whole) - len(cont)], cont

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise LDMoleError(f"max_gen_toks={max_gen_toks} leaves no room for the prompt in "
                                  f"max_length={self.max_length}")
            prompts.append(self.tok_encode(context, left_truncate_len=room))
            params.append(_sampling_params(kwargs, [s for s in until if s], max_gen_toks))
            stops.append(until)
        texts = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="ldmole generate_until") as bar:
            for at in range(0, len(prompts), _GENERATE_CHUNK):
                outs = self.llm.generate(prompts[at:at + _GENERATE_CHUNK], params[at:at + _GENERATE_CHUNK],
                                         adapter=self.active)
                texts += [out.outputs[0].text for out in outs]
                bar.update(len(outs))
        results = []
        for req, text, until in zip(requests, texts, stops, strict=True):
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results


def _sampling_params(kwargs: dict, stop: list[str], max_tokens: int) -> SamplingParams:
    unknown = sorted(k for k in kwargs if k not in _SAMPLING_KEYS + _NO_OP_KEYS
                     and not (k == "num_beams" and kwargs[k] == 1))
    if unknown:
        raise LDMoleError(f"unsupported generation kwargs {', '.join(unknown)} "
                          f"(supported: {', '.join(_SAMPLING_KEYS)}, do_sample, until, max_gen_toks)")
    values = {k: kwargs[k] for k in _SAMPLING_KEYS if k in kwargs}
    if not kwargs.get("do_sample"):
        values["temperature"] = 0.0
    return SamplingParams(max_tokens=max_tokens, stop=stop, **values)


def _cli_errors(create):
    """Under the lm_eval command line, a bad model argument is one line on stderr, not a traceback."""
    try:
        return create()
    except LDMoleError as e:
        if _from_lm_eval_cli():
            raise SystemExit(f"lm_eval --model ldmole: {e}") from None
        raise

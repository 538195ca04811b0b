"""Turns a scheduled step into one forward over the paged KV cache, and returns the logits rows.

Per step it builds, once, everything every layer needs: token ids and positions, the KV slot of
each new token, block tables, the per-token adapter-set indices (from which the adapters' own
(set, expert) grouping is derived), and which rows need logits: the last token of a sequence
that samples next, and prompt positions whose logprobs were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import PagedAttention
from ..errors import LDMoleError
from ..lora.adapter_batch import AdapterBatch
from ..model import ForwardContext
from ..runtime import LDMoleRuntime
from .expert_stats import ActiveExpertCount
from .sequence import Sequence


@dataclass
class StepLogits:
    sample_seqs: list[Sequence]  # sequences that sample a token after this step, in row order
    sample_logits: torch.Tensor  # [len(sample_seqs), vocab] fp32
    # (sequence, first, end): the prompt tokens at positions first..end-1 are scored this step
    prompt_spans: list[tuple[Sequence, int, int]]
    prompt_logits: torch.Tensor  # [Σ (end - first), vocab] fp32, the logits predicting those tokens
    # sampled steps only: mean active experts per token [N] and each token's set index [N] (-1: base)
    expert_means: torch.Tensor | None = None
    token_sets: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, runtime: LDMoleRuntime, num_blocks: int, block_size: int, mode: str = "sparse"):
        cfg = runtime.cfg
        if runtime.model.lm_head_weight is None:
            raise LDMoleError("the engine generates text: the base model needs an LM head "
                              "(a sequence-classification checkpoint has none)")
        self.runtime, self.block_size, self.mode = runtime, block_size, mode
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=runtime.dtype, device=runtime.device)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], count_experts: bool = False) -> StepLogits:
        device, bs = self.runtime.device, self.block_size
        input_ids: list[int] = []
        q_lens, ctx_lens, starts, set_ids, tables = [], [], [], [], []
        sample_seqs, sample_rows, prompt_spans, prompt_index = [], [], [], []
        index_of = {slot.name: i for i, slot in enumerate(self.runtime.bank.slots)}
        for seq, n in batch:
            c = seq.num_computed_tokens
            row0 = len(input_ids)
            input_ids += seq.token_ids[c:c + n]
            q_lens.append(n)
            ctx_lens.append(c + n)
            starts.append(c)
            set_ids.append(-1 if seq.adapter is None else index_of[seq.adapter])
            tables.append(seq.block_table)
            if c + n == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(row0 + n - 1)
            if seq.next_prompt_logprob is not None:
                # the token at position j is predicted by the logits at j - 1
                first, end = max(seq.next_prompt_logprob, c + 1), min(c + n + 1, seq.num_prompt_tokens)
                if first < end:
                    prompt_spans.append((seq, first, end))
                    prompt_index.extend(range(row0 + first - 1 - c, row0 + end - 1 - c))

        q_len_t = torch.tensor(q_lens, device=device)
        owner = torch.repeat_interleave(torch.arange(len(batch), device=device), q_len_t)
        first_row = torch.cumsum(q_len_t, 0) - q_len_t
        positions = torch.tensor(starts, device=device)[owner] + torch.arange(len(input_ids), device=device) - first_row[owner]
        width = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        slots = table_t[owner, positions // bs] * bs + positions % bs

        attention = PagedAttention.build(self.kv_cache, q_lens, ctx_lens, tables, slots)
        token_sets = torch.tensor(set_ids, device=device)[owner]
        adapters = AdapterBatch.build(token_sets, len(self.runtime.bank.slots))
        counter = ActiveExpertCount(len(input_ids), device) if count_experts and not adapters.is_bare else None
        ctx = ForwardContext(adapters, self.runtime.bank, attention, self.mode, counter)
        hidden = self.runtime.model(torch.tensor(input_ids, device=device), positions, ctx)

        rows = torch.tensor(sample_rows + prompt_index, device=device, dtype=torch.long)
        logits = F.linear(hidden[rows], self.runtime.model.lm_head_weight).float()
        step = StepLogits(sample_seqs, logits[:len(sample_rows)], prompt_spans, logits[len(sample_rows):])
        if counter is not None:
            step.expert_means, step.token_sets = counter.per_token_mean(), token_sets
        return step

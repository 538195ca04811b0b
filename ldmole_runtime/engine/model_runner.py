"""Turns a scheduled step into one forward over the paged KV cache, and returns the logits rows.

Per step it builds, once, everything every layer needs: token ids and positions, the KV slot of
each new token, block tables, the per-token adapter-set indices (from which the adapters' own
(set, expert) grouping is derived), and which rows need logits: the last token of a sequence
that samples next, and prompt positions whose logprobs were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ldmole_runtime.engine.config import EngineConfig
from ldmole_runtime.engine.decode_graphs import BATCH_BUCKETS, DecodeGraphs
from ldmole_runtime.engine.expert_stats import ActiveExpertCount
from ldmole_runtime.engine.routing_trace import StepRouting, wants_routing
from ldmole_runtime.engine.sequence import Sequence
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.adapter_batch import BASE, AdapterBatch, AdapterBatchBuffers
from ldmole_runtime.lora.capture import TeeSink
from ldmole_runtime.lora.ops import select_lora_backend
from ldmole_runtime.model.attention import PagedAttention
from ldmole_runtime.model.decoder import ForwardContext
from ldmole_runtime.model.runtime import LDMoleRuntime

DECODE_GRAPH_SETTINGS = ("auto", "off", "eager")


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
    # requests that asked for routing: (sequence, kind, RoutingEntry) in the order their tokens come;
    # kind: "sampled" (the token sampled from the row), "prompt" (a scored prompt token, or a scoring
    # target) or "final" (a held context's last position, which a fork's first token is read from)
    routing: list = field(default_factory=list)


class ModelRunner:
    def __init__(self, runtime: LDMoleRuntime, config: EngineConfig):
        """`config` resolved against this runtime (EngineConfig.resolve)."""
        cfg = runtime.cfg
        num_blocks, block_size = config.num_blocks, config.block_size
        if runtime.model.lm_head_weight is None:
            raise LDMoleError("the engine generates text: the base model needs an LM head "
                              "(a sequence-classification checkpoint has none)")
        self.runtime, self.block_size, self.num_blocks = runtime, block_size, num_blocks
        self.max_blocks_per_seq = -(-config.max_model_len // block_size)
        self.lora_backend = select_lora_backend(config.lora_backend, runtime.device)  # chosen once
        # one block more than the block manager hands out: a static decode step's padding rows write there
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=runtime.dtype, device=runtime.device)
        # the adapters' metadata of every step, eager or replayed, in one set of buffers
        self.adapter_buffers = AdapterBatchBuffers(max(config.max_num_batched_tokens, BATCH_BUCKETS[-1]),
                                                   runtime.device)
        self.graphs = self._decode_graphs(config.decode_graphs)
        self._warm_bank_version = None
        self.warm_up()

    def warm_up(self) -> None:
        """Compile the LoRA backend's kernels for the bank as it now is: at start-up, and after a load or
        unload (the engine calls this between steps; a step also checks, in case the bank was changed
        behind the engine's back)."""
        bank = self.runtime.bank
        if bank is not None and bank.version != self._warm_bank_version:
            self.lora_backend.warm_up(bank)
            self._warm_bank_version = bank.version

    def _decode_graphs(self, setting: str) -> DecodeGraphs | None:
        """CUDA graphs need a backend that keeps its metadata on the device (triton), and a GPU."""
        if setting not in DECODE_GRAPH_SETTINGS:
            raise LDMoleError(f"decode_graphs must be one of {DECODE_GRAPH_SETTINGS}, got {setting!r}")
        if setting == "eager":
            return DecodeGraphs(self, "eager")
        if setting == "auto" and self.runtime.device.type == "cuda" and self.lora_backend.name == "triton":
            return DecodeGraphs(self, "graph")
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention, adapters: AdapterBatch,
                sink=None) -> torch.Tensor:
        """The one forward assembly, for eager and graph-replayed steps: final hidden states [N, hidden].
        `sink`: where the adapters' routing goes (ActiveExpertCount, StepRouting or both), or None."""
        ctx = ForwardContext(adapters, self.runtime.bank, attention, self.lora_backend, sink)
        return self.runtime.model(input_ids, positions, ctx)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], count_experts: bool = False) -> StepLogits:
        self.warm_up()  # a no-op unless the bank changed since the last warm-up
        routing_asked = any(seq.params.routing and wants_routing(seq) for seq, _ in batch)
        if self.graphs is not None and not count_experts and not routing_asked and all(
                n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens and seq.next_prompt_logprob is None
                for seq, n in batch):
            step = self._static_decode([seq for seq, _ in batch])
            if step is not None:
                return step
        return self._run_eager(batch, count_experts)

    def _static_decode(self, seqs: list[Sequence]) -> StepLogits | None:
        """A decode-only step through the static buffers (a CUDA graph replay on a GPU)."""
        bs = self.block_size
        positions = [seq.num_computed_tokens for seq in seqs]
        hidden = self.graphs.run(
            [seq.token_ids[p] for seq, p in zip(seqs, positions, strict=True)],
            positions,
            [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions, strict=True)],
            [seq.block_table for seq in seqs],
            self._set_indices(seqs),
        )
        if hidden is None:
            return None
        logits = F.linear(hidden, self.runtime.model.lm_head_weight).float()
        return StepLogits(seqs, logits, [], logits[:0])

    @staticmethod
    def _set_indices(seqs: list[Sequence]) -> list[int]:
        """Each sequence's adapter-set index in the bank (-1: the bare base)."""
        return [BASE if seq.handle is None else seq.handle.slot.index for seq in seqs]

    def _run_eager(self, batch: list[tuple[Sequence, int]], count_experts: bool) -> StepLogits:
        device, bs = self.runtime.device, self.block_size
        input_ids: list[int] = []
        q_lens, ctx_lens, starts, tables = [], [], [], []
        set_ids = self._set_indices([seq for seq, _ in batch])
        sample_seqs, sample_rows, prompt_spans, prompt_index = [], [], [], []
        routed = []  # (sequence, kind, row) of the rows whose routing a request asked for (StepLogits.routing)
        for seq, n in batch:
            c = seq.num_computed_tokens
            row0 = len(input_ids)
            input_ids += seq.token_ids[c:c + n]
            q_lens.append(n)
            ctx_lens.append(c + n)
            starts.append(c)
            tables.append(seq.block_table)
            # requests without routing (the common case) never call into routing_trace
            wanted = seq.params.routing is not None and wants_routing(seq)
            if c + n == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(row0 + n - 1)
            if seq.next_prompt_logprob is not None:
                # the token at position j is predicted by the logits at j - 1
                first, end = max(seq.next_prompt_logprob, c + 1), min(c + n + 1, seq.num_prompt_tokens)
                if first < end:
                    prompt_spans.append((seq, first, end))
                    prompt_index.extend(range(row0 + first - 1 - c, row0 + end - 1 - c))
                    if wanted:
                        routed += [(seq, "prompt", row) for row in range(row0 + first - 1 - c, row0 + end - 1 - c)]
            if wanted and c + n == seq.num_tokens:
                if seq.params.max_tokens != 0:
                    routed.append((seq, "sampled", row0 + n - 1))
                elif seq.target_token is not None:
                    routed.append((seq, "prompt", row0 + n - 1))
                elif seq.hold:
                    routed.append((seq, "final", row0 + n - 1))

        q_len_t = torch.tensor(q_lens, device=device)
        owner = torch.repeat_interleave(torch.arange(len(batch), device=device), q_len_t)
        first_row = torch.cumsum(q_len_t, 0) - q_len_t
        positions = (
            torch.tensor(starts, device=device)[owner] + torch.arange(len(input_ids), device=device) - first_row[owner]
        )
        width = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        slots = table_t[owner, positions // bs] * bs + positions % bs

        attention = PagedAttention.build(self.kv_cache, q_lens, ctx_lens, tables, slots)
        adapters = self.adapter_buffers.fill(list(zip(set_ids, q_lens, strict=True)), self.runtime.bank.capacity)
        counter = ActiveExpertCount(len(input_ids), device) if count_experts and not adapters.is_bare else None
        tracer = StepRouting(len(input_ids), self.runtime.cfg.num_layers, self.runtime.bank.kernel_tables().max_experts,
                             device) if routed else None
        sink = TeeSink(counter, tracer) if counter is not None and tracer is not None else (counter or tracer)
        hidden = self.forward(torch.tensor(input_ids, device=device), positions, attention, adapters, sink)

        rows = torch.tensor(sample_rows + prompt_index, device=device, dtype=torch.long)
        logits = F.linear(hidden[rows], self.runtime.model.lm_head_weight).float()
        step = StepLogits(sample_seqs, logits[:len(sample_rows)], prompt_spans, logits[len(sample_rows):])
        if counter is not None:
            step.expert_means = counter.per_token_mean()
            step.token_sets = torch.tensor(set_ids, device=device)[owner]
        if tracer is not None:
            entries = tracer.read([row for _, _, row in routed])
            step.routing = [(seq, kind, entry) for (seq, kind, _), entry in zip(routed, entries, strict=True)]
        return step

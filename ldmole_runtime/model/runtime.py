"""The Python entry point: one base model, any number of named LD-MoLE adapter sets, one forward.

    rt = LDMoleRuntime.from_pretrained("path/to/base", adapters={"math": "path/to/adapter"})
    out = rt.forward(input_ids, adapters=["math", None])   # one adapter name (or None) per row
    out.logits
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.errors import LDMoleError, UnknownAdapterError
from ldmole_runtime.lora.adapter_batch import BASE, AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank
from ldmole_runtime.lora.capture import RoutingCapture
from ldmole_runtime.lora.ops import lora_backend_setting, select_lora_backend
from ldmole_runtime.model.attention import DenseCausalAttention
from ldmole_runtime.model.decoder import DecoderModel, ForwardContext
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.dtypes import DTYPES, resolve_dtype  # noqa: F401 (API: imported from here too)
from ldmole_runtime.model.weights import load_base_model


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [B, T, hidden]
    logits: torch.Tensor  # [B, T, vocab] (LM head) or [B, num_labels] (classification head)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # "{layer}.{proj}" -> [B, T, E]
    # "{layer}.{proj}" -> [B, T]: a Sparsegen router's λ, AdaMoLE's threshold (NaN where the router has none)
    lambdas: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)


class LDMoleRuntime:
    def __init__(self, model: DecoderModel):
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.bank = AdapterBank(model.cfg, self.device, self.dtype)

    @classmethod
    def from_pretrained(cls, base: str | Path, adapters: dict[str, str | Path | AdapterSet] | None = None,
                        dtype: str | torch.dtype = "float32", device: str = "cpu") -> LDMoleRuntime:
        rt = cls(load_base_model(resolve_base(base), resolve_dtype(dtype, device), device))
        for name, source in (adapters or {}).items():
            rt.load_adapter(name, source)
        return rt

    @property
    def cfg(self):
        return self.model.cfg

    # ---- adapter sets -----------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str | Path | AdapterSet) -> int:
        """Add an adapter set (native or reference folder, or an AdapterSet); returns its index."""
        adapter = source if isinstance(source, AdapterSet) else AdapterSet.load(source)
        return self.bank.add(name, adapter)

    def unload_adapter(self, name: str) -> None:
        self.bank.remove(name)

    def adapter_index(self, name: str | None) -> int:
        if name is None:
            return BASE
        try:
            return self.bank.index_of(name)
        except KeyError:
            raise UnknownAdapterError(f"unknown adapter set {name!r}; loaded: {self.bank.names}") from None

    # ---- forward ----------------------------------------------------------------------------------
    def _set_ids(self, adapters, shape: tuple[int, int]) -> torch.Tensor:
        """Per-token set indices [B, T] from None, one name per row, or an index tensor ([B] or [B, T])."""
        B, T = shape
        if adapters is None or isinstance(adapters, str):
            ids = torch.full((B,), self.adapter_index(adapters), dtype=torch.long)
        elif isinstance(adapters, torch.Tensor):
            ids = adapters.long()
            for s in ids.unique().tolist():
                if s != BASE and not (0 <= s < self.bank.capacity and self.bank.at(s) is not None):
                    raise LDMoleError(f"adapter-set index {s} names no loaded set (loaded: "
                                      f"{[x.index for x in self.bank.slots]}, or -1 for the base)")
        else:
            if len(adapters) != B:
                raise LDMoleError(f"got {len(adapters)} adapter names for {B} rows")
            ids = torch.tensor([self.adapter_index(a) for a in adapters], dtype=torch.long)
        ids = ids.to(self.device)
        return ids[:, None].expand(B, T) if ids.dim() == 1 else ids

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, adapters: str | Sequence[str | None] | torch.Tensor | None = None,
                lora_backend: str | None = None, capture_routing: bool = False,
                lengths: torch.Tensor | None = None, mode: str | None = None) -> ForwardOutput:
        """`lora_backend`: one of LORA_BACKENDS (default "sparse"; `mode` is its older name). `lengths`
        (classification heads): each row's real length; by default the last token that is not the pad
        token, as transformers' sequence classifiers read it."""
        backend = select_lora_backend(lora_backend_setting(lora_backend, mode), self.device)
        if input_ids.dim() != 2:
            raise LDMoleError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device).long()
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            raise LDMoleError(
                f"token ids must lie in [0, {self.cfg.vocab_size}); got {int(input_ids.min())}..{int(input_ids.max())}"
            )
        B, T = input_ids.shape
        set_ids = self._set_ids(adapters, (B, T))
        batch = AdapterBatch.build(set_ids, self.bank.capacity)
        capture = None
        if capture_routing:
            E = max((self.bank.at(s.set_index).num_experts for s in batch.segments), default=1)
            capture = RoutingCapture(B * T, E)
        positions = torch.arange(T, device=self.device).repeat(B)
        ctx = ForwardContext(batch, self.bank, DenseCausalAttention(B, T), backend, capture)
        hidden = self.model(input_ids.reshape(-1), positions, ctx).view(B, T, -1)
        out = ForwardOutput(hidden, self._logits(hidden, input_ids, set_ids[:, -1], lengths))
        if capture is not None:
            out.routing = {k: v.view(B, T, -1) for k, v in capture.routing.items()}
            out.lambdas = {k: v.view(B, T) for k, v in capture.lambdas.items()}
            out.thresholds = {k: v.view(B, T) for k, v in capture.thresholds.items()}
        return out

    @torch.inference_mode()
    def classify(self, token_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Class probabilities [num_labels] of one unpadded input under a set with a score head."""
        if self._score_head(self.adapter_index(adapter)) is None:
            who = f"adapter set {adapter!r}" if adapter else "the base model"
            raise LDMoleError(f"{who} has no classification head (score.weight); it generates text instead")
        # one unpadded row: its last token is the one to read, even when it is the pad token (SmolLM2's
        # end token <|im_end|> is also its pad token, and the trainer ends every text with it)
        logits = self.forward(torch.tensor([token_ids]), adapter, lengths=torch.tensor([len(token_ids)])).logits[0]
        return torch.softmax(logits.float(), -1)

    # ---- heads ------------------------------------------------------------------------------------
    def _score_head(self, set_index: int):
        if set_index != BASE and self.bank.at(set_index).score is not None:
            return self.bank.at(set_index).score
        return None if self.model.score is None else (self.model.score, None)

    def _logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, row_sets: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        heads = [self._score_head(s) for s in row_sets.tolist()]
        if all(h is None for h in heads):
            return F.linear(hidden, self.model.lm_head_weight)
        if any(h is None for h in heads):
            raise LDMoleError("a batch cannot mix rows with a classification head and rows with the LM head")
        last = self._last_token_index(input_ids) if lengths is None else lengths.to(hidden.device) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rows = [F.linear(pooled[i], w, b) for i, (w, b) in enumerate(heads)]
        if len({r.shape[-1] for r in rows}) != 1:
            raise LDMoleError("rows of one batch use classification heads with different numbers of labels")
        return torch.stack(rows)

    def _last_token_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last non-pad token of each row, as transformers' sequence classifiers read it."""
        T = input_ids.shape[1]
        pad = self.cfg.pad_token_id
        if pad is None:
            return torch.full((input_ids.shape[0],), T - 1, device=input_ids.device)
        positions = torch.arange(T, device=input_ids.device)
        return (positions * (input_ids != pad)).argmax(-1)

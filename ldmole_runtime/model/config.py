"""Base-model configuration, read from an HF `config.json` with transformers' own config classes.

Only what the decoder needs is kept, in one flat dataclass. The transformers config object is kept
too: RoPE variants are computed by transformers' own init functions from it, so every scaling type
transformers supports gives the same frequencies here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ldmole_runtime.errors import CheckpointError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3 normalises q and k per head before RoPE
    num_labels: int | None  # set when the checkpoint is a *ForSequenceClassification
    pad_token_id: int | None
    max_position_embeddings: int
    hf_config: PretrainedConfig = field(repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> ModelConfig:
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {hf.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
        rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "dynamic":
            raise UnsupportedModelError("dynamic NTK RoPE scaling changes with sequence length and is not supported")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        architectures = getattr(hf, "architectures", None) or []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=hf.model_type == "qwen3",
            num_labels=hf.num_labels if is_classifier else None,
            pad_token_id=getattr(hf, "pad_token_id", None),
            max_position_embeddings=hf.max_position_embeddings,
            hf_config=hf,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
        try:
            raw = json.loads(cfg_file.read_text())
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{cfg_file}: not a readable model config ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            # checked before transformers sees it: its message for unknown types is long and multi-line
            raise UnsupportedModelError(
                f"{cfg_file}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (ValueError, KeyError, OSError, TypeError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CheckpointError(f"{cfg_file}: not a readable model config ({reason})") from exc
        return cls.from_hf(hf)

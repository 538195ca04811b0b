"""`ldmole train` settings: one dataclass, filled from an optional YAML file and then CLI flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS
from ldmole_runtime.data.datasets import MC_FORMATS
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.routing import ROUTERS

SCHEDULES = ("multistep", "cosine", "linear", "constant")
ROUTER_CHOICES = ("sparsegen", "softmax", "topk", "threshold", "lora")  # "lora": E = 1; "threshold": AdaMoLE

# Named routing recipes. A preset only sets defaults: a YAML file and flags still override each value.
PRESETS: dict[str, dict] = {
    # the reference code's objective: cross-entropy + load balance, no sparsity terms (routing
    # stays nearly dense: 7.1 of 8 experts per token after an epoch on SocialIQA)
    "paper": {"lb": 1.0, "reg": 0.0, "lam": 0.0, "k": 2, "lambda_lr": None, "lambda_init": "kaiming"},
    # the sparsity-control term caps each token at k experts. Only the λ-network learns from it, and
    # at the experts' rate it moves too slowly to reach the cap within an epoch (measured on SocialIQA:
    # still ~6 of 8 experts after 40 steps at 5e-4, 2 at 5e-3), so it gets its own, faster rate, and
    # starts from the reference code's "sparse" λ-network init
    "sparse": {"lb": 1.0, "reg": 1.0, "lam": 0.0, "k": 2, "lambda_lr": 5e-3, "lambda_init": "sparse"},
    # AdaMoLE's recipe (shared/docs/ADAMOLE.md): threshold routing, its load-balance term at 1e-3
    "adamole": {"router": "threshold", "lb": 1e-3, "reg": 0.0, "lam": 0.0, "k": 2, "lambda_lr": None,
                "lambda_init": "kaiming"},
}


@dataclass
class TrainConfig:
    preset: str = "paper"  # routing recipe: PRESETS' defaults, under the YAML file and flags
    # data
    data: str = "arc_easy"  # built-in dataset names or JSONL files, comma-separated for a mixture
    task: str | None = None  # mc, completion, classification (built-ins imply it)
    mc_format: str = "cloze"  # mc: "cloze" (answer text, lm-eval's prompt) or "letter" (the paper's)
    val_data: str | None = None  # default: each built-in's validation split
    train_split: str = "train"
    val_split: str = "validation"
    limit_train: int | None = None
    limit_val: int | None = None
    num_labels: int | None = None  # classification
    max_length: int = 1024
    # model and adapter
    base: str = "default"
    experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    lambda_hidden: int = 256
    lambda_init: str = "kaiming"
    router: str = "sparsegen"
    top_k: int = 2
    # objective
    ce: float = 1.0
    lb: float = 1.0
    reg: float = 0.0
    lam: float = 0.0
    k: int = 2
    label_smoothing: float = 0.1
    # optimisation
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    lambda_lr: float | None = None  # default: lr
    weight_decay: float = 0.1
    clip: float = 1.0
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [6, 8])  # epochs, for "multistep"
    gamma: float = 0.1
    warmup_steps: int = 0
    # run
    out: str = "runs/ldmole"
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 16
    eval_kv_cache_gib: float = 1.0  # the scoring engine's KV cache (cloze evaluation)
    progress: bool = True

    @property
    def datasets(self) -> list[str]:
        return [name.strip() for name in str(self.data).split(",") if name.strip()]

    def check(self) -> None:
        if not self.datasets:
            raise LDMoleError("--data names no dataset")
        if self.mc_format not in MC_FORMATS:
            raise LDMoleError(f"unknown mc_format {self.mc_format!r}; choose one of {', '.join(MC_FORMATS)}")
        if self.eval_kv_cache_gib <= 0:
            raise LDMoleError(f"eval_kv_cache_gib must be > 0, got {self.eval_kv_cache_gib}")
        if self.router not in ROUTER_CHOICES:
            raise LDMoleError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTER_CHOICES)}")
        if self.router == "lora":
            self.experts = 1
        if self.router != "lora" and self.experts < 2:
            raise LDMoleError(f"router {self.router!r} needs experts >= 2 (use --router lora for plain LoRA)")
        if self.router == "topk" and not 1 <= self.top_k <= self.experts:
            raise LDMoleError(f"top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if self.schedule not in SCHEDULES:
            raise LDMoleError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lambda_init not in ("kaiming", "sparse", "dense"):
            raise LDMoleError(f"unknown lambda_init {self.lambda_init!r}; choose kaiming, sparse or dense")
        bad = [m for m in self.target_modules if m not in ALL_PROJECTIONS]
        if bad or not self.target_modules:
            raise LDMoleError(f"target_modules {bad or '[]'} are not projections ({', '.join(ALL_PROJECTIONS)})")
        if self.epochs < 0:
            raise LDMoleError(
                f"epochs must be >= 0 (0: only evaluate the untrained adapter, i.e. the base), got {self.epochs}"
            )
        for name in ("batch_size", "grad_accum", "rank", "max_length", "eval_batch_size", "lambda_hidden"):
            if getattr(self, name) < 1:
                raise LDMoleError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise LDMoleError("dropout and label_smoothing must be in [0, 1)")
        if self.k < 1 or (self.reg > 0 and self.router == "sparsegen" and self.k >= self.experts):
            raise LDMoleError(
                f"k must be in [1, experts - 1] for the sparsity term, got k={self.k}, experts={self.experts}"
            )

    @property
    def router_kind(self) -> str:
        return "none" if self.router == "lora" else self.router

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict) -> TrainConfig:
        values: dict = {}
        loaded: dict = {}
        if yaml_path:
            import yaml

            try:
                loaded = yaml.safe_load(Path(yaml_path).read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise LDMoleError(f"{yaml_path}: not a readable YAML file ({exc})") from exc
            if not isinstance(loaded, dict):
                raise LDMoleError(f"{yaml_path}: expected a mapping of settings")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(loaded) - known)
            if unknown:
                raise LDMoleError(f"{yaml_path}: unknown settings {unknown}")
        flags = {k: v for k, v in overrides.items() if v is not None}
        preset = flags.get("preset", loaded.get("preset", cls.preset))
        if preset not in PRESETS:
            raise LDMoleError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset], preset=preset)
        values.update(loaded)
        values.update(flags)
        cfg = cls(**values)
        cfg.check()
        assert cfg.router_kind in ROUTERS
        return cfg


def field_help() -> dict[str, str]:
    """What each `ldmole train` flag does, with its valid values (the CLI's help texts)."""
    from ldmole_runtime.data.benchmarks import ALIASES, BUILTIN_DATASETS
    from ldmole_runtime.data.examples import TASKS

    builtins = ", ".join(BUILTIN_DATASETS)
    aliases = ", ".join(f"{a}={n}" for a, n in ALIASES.items())

    def preset_text(name: str) -> str:
        return f"{name} (" + ", ".join(f"{k}={v}" for k, v in PRESETS[name].items()) + ")"

    return {
        "preset": "routing recipe, the defaults of the objective's terms (a YAML file and flags override them): "
                  + "; ".join(preset_text(name) for name in PRESETS),
        "data": f"training data: built-in datasets ({builtins}; aliases {aliases}) or JSONL files; "
                "comma-separated for a mixture (sampled in proportion to size, evaluated per task)",
        "task": f"task of JSONL data: {', '.join(TASKS)} (built-ins imply it)",
        "mc_format": f"multiple choice: {' or '.join(MC_FORMATS)}. cloze trains on the answer's text after lm-eval's "
                     "prompt and reports acc / acc_norm by option log-likelihood; letter is the paper's protocol "
                     "(options listed, the answer letter)",
        "val_data": "validation data, one per --data entry (default: each built-in's validation split)",
        "train_split": "split of a built-in to train on: train, validation, test",
        "val_split": "split of a built-in to validate on: train, validation, test",
        "limit_train": "use at most this many training examples per dataset",
        "limit_val": "use at most this many validation examples per dataset",
        "num_labels": "classification: number of classes of the score head",
        "max_length": "tokens per example; longer prompts lose tokens from the left",
        "base": "base model folder, or 'default' (SmolLM2-135M-Instruct)",
        "experts": "LoRA experts per adapted projection (E)",
        "rank": "rank r of each expert",
        "alpha": "LoRA scale numerator: each expert's update is scaled by alpha / r",
        "dropout": "dropout on the adapters' input during training",
        "target_modules": f"projections to adapt, comma-separated, from {', '.join(ALL_PROJECTIONS)}",
        "lambda_hidden": "hidden width of the λ-network that predicts each token's sparsegen λ",
        "lambda_init": "λ-network init: kaiming, sparse (few experts at first) or dense (many)",
        "router": f"routing: {', '.join(ROUTER_CHOICES)} "
                  "(sparsegen is LD-MoLE's learned λ; lora is plain LoRA, E = 1)",
        "top_k": "experts per token for --router topk",
        "ce": "weight of the cross-entropy term",
        "lb": "weight of the load-balance term",
        "reg": "weight of the sparsity-control term (pushes tokens towards --k experts)",
        "lam": "weight of the mean(1 - λ) term",
        "k": "target active experts for the sparsity-control term",
        "label_smoothing": "label smoothing of the cross-entropy",
        "epochs": "passes over the training data (0: only evaluate the untrained adapter, i.e. the base)",
        "batch_size": "examples per step and process",
        "grad_accum": "steps whose gradients add up before one optimizer step",
        "lr": "learning rate of the LoRA experts and routers",
        "lambda_lr": "learning rate of the λ-network (default: --lr)",
        "weight_decay": "AdamW weight decay",
        "clip": "gradient-norm clip",
        "schedule": f"learning-rate schedule: {', '.join(SCHEDULES)}",
        "milestones": "epochs at which multistep multiplies the rate by --gamma",
        "gamma": "multistep's factor",
        "warmup_steps": "optimizer steps of linear warm-up",
        "out": "output folder: checkpoints, adapter/, metrics.json",
        "resume": "continue from the last checkpoint in --out",
        "seed": "random seed (init, data order)",
        "device": "auto (cuda if present, else cpu), cpu or cuda[:N]",
        "eval_batch_size": "examples per forward when evaluating (letter format, classification, completion)",
        "eval_kv_cache_gib": "KV cache of the engine that scores options (cloze evaluation), in GiB",
    }

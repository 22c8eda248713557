"""Typed model configs and the named flavours.

Configs are frozen dataclasses that validate themselves on construction, so a bad
config fails where it is written, not steps into a run. The jobs layer loads them from
YAML; this module stays PyTorch-free and import-cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from model.vocab import EOD, PAD, VOCAB_SIZE, N

Pooling = Literal["mean", "unique"]
POOLING_MODES: tuple[str, ...] = ("mean", "unique")
InitScheme = Literal["megatron", "flat"]
INIT_SCHEMES: tuple[str, ...] = ("megatron", "flat")


@dataclass(frozen=True)
class GengramConfig:
    """Conditional n-gram memory (arXiv 2601.22203).

    hidden_size: width H of the residual stream it writes into (ModelConfig keeps it in sync).
    ngram_sizes: the k of the k-mers looked up (1..6 in the paper).
    embed_dim_per_ngram: width D of each memory row; the pooled feature is |K|*D wide.
    window_size: W, the causal window in bp (21 = two helical turns); None = no pooling.
    pooling: "mean" averages every occurrence (published code), "unique" each distinct k-mer once (Eq. 7).
    short_conv / conv_kernel / conv_dilation: depthwise causal conv after the gate;
        dilation None means max(ngram_sizes).
    """

    hidden_size: int = 1024
    ngram_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    embed_dim_per_ngram: int = 256
    window_size: int | None = 21
    pooling: Pooling = "mean"
    short_conv: bool = True
    conv_kernel: int = 4
    conv_dilation: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngram_sizes", tuple(int(k) for k in self.ngram_sizes))
        ks = self.ngram_sizes
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks) or list(ks) != sorted(ks):
            raise ValueError(f"gengram.ngram_sizes must be distinct positive integers in ascending order, got {ks}")
        if self.window_size is not None and self.window_size < max(ks):
            raise ValueError(
                f"gengram.window_size={self.window_size} is smaller than the largest n-gram size {max(ks)}: "
                "no k-mer of that size fits in the window"
            )
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"gengram.pooling={self.pooling!r} is unknown; choose one of {POOLING_MODES}")
        for name in ("hidden_size", "embed_dim_per_ngram", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"gengram.{name} must be positive, got {getattr(self, name)}")
        if self.conv_dilation is not None and self.conv_dilation < 1:
            raise ValueError(f"gengram.conv_dilation must be positive or null, got {self.conv_dilation}")

    @property
    def dilation(self) -> int:
        return self.conv_dilation if self.conv_dilation is not None else max(self.ngram_sizes)

    @property
    def table_rows(self) -> int:
        """Rows of the single memory table: one per possible k-mer over 5 letters, for each k."""
        return sum(5**k for k in self.ngram_sizes)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only MoE transformer (RMSNorm, RoPE, SwiGLU, GQA) with Gengram at chosen layers.

    Layer ids are 1-based, as in the paper ("Gengram at layers 3, 6, 10").
    num_experts <= 1 makes every FFN dense; otherwise `moe_layers` (None = all) are MoE.

    Routing is dropless (drop_tokens=False), as in the released Megatron run, which sets no expert
    capacity: a token's experts then depend on that token alone, so the LM stays causal and a
    sequence's logits do not depend on the rest of its batch. drop_tokens=True caps every expert at
    max(min_capacity, ceil(tokens / num_experts * capacity_factor * top_k)) routes of the micro-batch
    (eval_capacity_factor in eval mode) and drops the rest: a throughput option for training only,
    never for evaluation or export (see `drops_tokens` and `dropless()`).

    init_scheme "megatron" is the released run's: N(0, init_std) for every weight matrix except the
    projections that write into the residual stream (attention o_proj, every FFN and expert
    down_proj), which get N(0, init_std / sqrt(2 * num_layers)); Gengram keeps PyTorch's defaults,
    as the authors' fork does. "flat" is N(0, init_std) for every weight matrix, Gengram's included.
    Norm weights start at 1 in both.
    """

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 16
    num_query_groups: int = 8
    ffn_hidden_size: int = 4096
    max_seq_len: int = 8192
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.01  # the released training script's --init-method-std
    init_scheme: InitScheme = "megatron"
    # Attention kernel: "sdpa" lets PyTorch pick (flash / memory-efficient on GPU, math on
    # CPU); "math" forces the reference kernel, e.g. for bit-exact debugging.
    attention_backend: Literal["sdpa", "math"] = "sdpa"

    num_experts: int = 8
    moe_top_k: int = 2
    moe_ffn_hidden_size: int = 4096
    moe_layers: tuple[int, ...] | None = None
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = False
    # DeepSpeed's top-2 gate may pick the second expert by Gumbel sampling, in eval mode as in
    # training; off by default: a causal LM routes every position deterministically.
    moe_second_expert_sampling: bool = False
    ep_size: int = 1
    # The released training script's --moe-aux-loss-coeff and --moe-z-loss-coeff: each MoE layer's
    # loss enters the total with the full coefficient.
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.001

    gengram: GengramConfig | None = field(default_factory=GengramConfig)
    gengram_layers: tuple[int, ...] = (3, 6, 10)

    # The LM loss always ignores PAD targets; by config also N and EOD targets.
    ignore_n_targets: bool = False
    ignore_eod_targets: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.gengram, dict):
            object.__setattr__(self, "gengram", GengramConfig(**self.gengram))
        if self.gengram is not None and self.gengram.hidden_size != self.hidden_size:
            # Gengram writes into the residual stream, so its width is always the model's.
            object.__setattr__(self, "gengram", dataclasses.replace(self.gengram, hidden_size=self.hidden_size))
        object.__setattr__(self, "gengram_layers", tuple(int(i) for i in self.gengram_layers))
        if self.moe_layers is not None:
            object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"model.vocab_size={self.vocab_size} is smaller than the vocabulary ({VOCAB_SIZE})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("model.hidden_size / num_heads must be even for rotary embeddings")
        if self.num_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not divisible by num_query_groups={self.num_query_groups}"
            )
        for name, ids in (("gengram_layers", self.gengram_layers), ("moe_layers", self.moe_layers or ())):
            bad = [i for i in ids if not 1 <= i <= self.num_layers]
            if bad:
                raise ValueError(
                    f"model.{name} holds {bad}: layer ids are 1-based and must lie in 1..{self.num_layers}"
                )
            if len(set(ids)) != len(ids):
                raise ValueError(f"model.{name} repeats a layer: {ids}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"model.init_scheme={self.init_scheme!r} is unknown; choose one of {INIT_SCHEMES}")
        if self.is_moe:
            if not 1 <= self.moe_top_k <= self.num_experts:
                raise ValueError(f"model.moe_top_k={self.moe_top_k} must lie in 1..num_experts={self.num_experts}")
            if self.num_experts % self.ep_size:
                raise ValueError(
                    f"model.num_experts={self.num_experts} is not divisible by model.ep_size={self.ep_size}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def has_gengram(self) -> bool:
        return self.gengram is not None and bool(self.gengram_layers)

    @property
    def drops_tokens(self) -> bool:
        """Whether MoE routing drops routes beyond expert capacity (then not causal: see the class doc)."""
        return self.is_moe and self.drop_tokens

    def dropless(self) -> ModelConfig:
        """This config with dropless routing; the weights are the same, so a state dict loads into either."""
        return dataclasses.replace(self, drop_tokens=False)

    @property
    def ignored_targets(self) -> tuple[int, ...]:
        """Token ids the LM loss does not score as targets."""
        return (PAD,) + (N,) * self.ignore_n_targets + (EOD,) * self.ignore_eod_targets

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.is_moe and (self.moe_layers is None or layer_id in self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with changes; `gengram` may be a dict of GengramConfig fields to change."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model config key(s): {sorted(unknown)}")
        gengram_changes = changes.get("gengram")
        if isinstance(gengram_changes, dict):
            unknown = set(gengram_changes) - {f.name for f in dataclasses.fields(GengramConfig)}
            if unknown:
                raise ValueError(f"unknown model.gengram key(s): {sorted(unknown)}")
            changes["gengram"] = dataclasses.replace(self.gengram or GengramConfig(), **gengram_changes)
        return dataclasses.replace(self, **changes)


def _gengram_twin(config: ModelConfig) -> ModelConfig:
    """The baseline twin: the same transformer with no Gengram at any layer."""
    return dataclasses.replace(config, gengram=None, gengram_layers=())


_DEBUG = ModelConfig(
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_query_groups=2,
    ffn_hidden_size=256,
    max_seq_len=4096,
    num_experts=4,
    moe_top_k=2,
    moe_ffn_hidden_size=256,
    capacity_factor=2.0,  # these two apply only when drop_tokens is switched on
    eval_capacity_factor=2.0,
    gengram=GengramConfig(embed_dim_per_ngram=16),
    gengram_layers=(2, 3),
)

# Paper Table 13: the 1.2 B-total / 0.3 B-activated ablation model, Gengram at layer 10.
_MOE_1_2B = ModelConfig(
    hidden_size=1024,
    num_layers=12,
    num_heads=16,
    num_query_groups=8,
    num_experts=8,
    moe_top_k=2,
    moe_ffn_hidden_size=4096,
    max_seq_len=8192,
    gengram=GengramConfig(embed_dim_per_ngram=1024),
    gengram_layers=(10,),
)

# Paper Table 12 with the released training script's MoE sizes; Gengram at 3, 6, 10.
_GENGRAM_10B = ModelConfig(
    hidden_size=4096,
    num_layers=12,
    num_heads=16,
    num_query_groups=8,
    num_experts=8,
    moe_top_k=2,
    moe_ffn_hidden_size=8192,
    ffn_hidden_size=8192,
    max_seq_len=32768,
    gengram=GengramConfig(embed_dim_per_ngram=1024),
    gengram_layers=(3, 6, 10),
)

# Every flavour routes dropless, without second-expert sampling, and starts from the Megatron init
# (the ModelConfig defaults).
FLAVOURS: dict[str, ModelConfig] = {
    "debug": _DEBUG,
    "baseline-debug": _gengram_twin(_DEBUG),
    "moe-1.2b": _MOE_1_2B,
    "baseline-moe-1.2b": _gengram_twin(_MOE_1_2B),
    "gengram-10b": _GENGRAM_10B,
    "baseline-10b": _gengram_twin(_GENGRAM_10B),
}


def flavour(name: str, **overrides: Any) -> ModelConfig:
    """A named flavour, optionally with field overrides (validated like any config)."""
    if name not in FLAVOURS:
        raise ValueError(f"unknown model flavour {name!r}; choose one of {sorted(FLAVOURS)}")
    return FLAVOURS[name].replace(**overrides) if overrides else FLAVOURS[name]

"""The authors' Megatron fork beside GengramLM: which tensor is which, and the math between them.

Names in a Megatron GPT model (layer i 0-based and global; a pipeline stage's reader renumbers its layers):

    embedding.word_embeddings.weight          [V, H]   V = the padded vocabulary (128 in the release)
    decoder.layers.{i}.
        input_layernorm.weight                         attention RMSNorm, local layer spec
        self_attention.linear_qkv.layer_norm_weight    the same, transformer-engine spec (fused into the QKV GEMM)
        self_attention.linear_qkv.weight      [(heads + 2 groups) d, H]  per query group: its q heads, its k, its v
        self_attention.linear_proj.weight     [H, H]
        pre_mlp_layernorm.weight                       FFN RMSNorm (both specs: a MoE layer's router reads it)
        mlp.router.weight                     [E, H]   top-k of the fp32 logits, softmax over those k
        mlp.experts.local_experts.{e}.linear_fc1.weight    [2F, H] = [gate; up]   local experts
        mlp.experts.linear_fc1.weight{e}                                          grouped experts (TE)
        mlp.experts.local_experts.{e}.linear_fc2.weight    [H, F]   (grouped: mlp.experts.linear_fc2.weight{e})
        gengram.embeddings.{j}.weight         [5^k_j, D]  one table per k, in the order of K
        gengram.{key_proj,value_proj}.weight  [H, |K| D]
        gengram.{norm_q,norm_k}.weight        [H]
        gengram.short_conv.conv.weight        [H, 1, kernel]
    decoder.final_layernorm.weight
    output_layer.weight                       [V, H]   untied from the embedding

GengramLM computes the same function (RoPE rotate-half over the whole head, base from the args; Gengram
added before the layer's input norm): the conversion only renames, splits and concatenates, and maps
vocabulary rows. The fork builds Gengram parameters in every layer and uses those of the configured
layers only; the others are dropped on import and written as zeros on export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jobs.common.errors import BadInput
from model.config import GengramConfig, ModelConfig
from model.vocab import EOD, PAD, VOCAB_SIZE, A, C, G, N, T

# The release's tokenizer (PAD 0, UNK 1, CLS 2, SEP 3, MASK 4, C 5, G 6, T 7, A 8, N 9) and Megatron's
# SentencePiece wrapper (CLS 10, SEP 11, EOD 12, MASK 13, BOS 14, EOS 15; rows padded to 128).
MEGATRON_UNK, MEGATRON_EOD = 1, 12
SPARE = VOCAB_SIZE - 1
# Megatron row of each of our ids (Contract 1). Our spare id takes UNK's row: a token that never occurs
# in DNA, so its output row was trained towards never being predicted; on export every Megatron row
# we have no token for takes the spare's rows, for the same reason.
MEGATRON_ROW: tuple[int, ...] = tuple(
    {PAD: 0, A: 8, C: 5, G: 6, T: 7, N: 9, EOD: MEGATRON_EOD, SPARE: MEGATRON_UNK}[i] for i in range(VOCAB_SIZE)
)
# The fork's --gengram-token-ids: the Megatron ids of A, C, G, T, N, read as base-5 digits 0..4, as ours.
GENGRAM_TOKEN_IDS = (MEGATRON_ROW[A], MEGATRON_ROW[C], MEGATRON_ROW[G], MEGATRON_ROW[T], MEGATRON_ROW[N])
RELEASE_PADDED_VOCAB = 128

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
# Modules keep state beside their weights (transformer-engine's FP8 metadata; None for Megatron's own
# linears) under this suffix: not a tensor of the model, skipped on import, written as None on export.
EXTRA_STATE = "._extra_state"


class ConversionError(BadInput):
    """A checkpoint that does not map onto GengramLM; the message names every offending key or setting."""


@dataclass(frozen=True)
class Spelling:
    """How a layer spec names its tensors: transformer-engine layers fuse the attention norm into the
    QKV GEMM; grouped experts (--moe-grouped-gemm) keep one weight per expert on the experts module."""

    fused_norms: bool
    grouped_experts: bool

    def attention_norm(self) -> str:
        return "self_attention.linear_qkv.layer_norm_weight" if self.fused_norms else "input_layernorm.weight"

    def expert(self, fc: str, e: int) -> str:
        return f"mlp.experts.{fc}.weight{e}" if self.grouped_experts else f"mlp.experts.local_experts.{e}.{fc}.weight"


def detect_spelling(names: Iterable[str]) -> Spelling:
    names = list(names)
    return Spelling(
        fused_norms=any(name.endswith("linear_qkv.layer_norm_weight") for name in names),
        grouped_experts=any(".mlp.experts.linear_fc1.weight" in name for name in names),
    )


def extra_state_names(config: ModelConfig, spelling: Spelling) -> list[str]:
    """The modules that the fork's load_state_dict expects an _extra_state of (the linears)."""
    experts = (["mlp.experts.linear_fc1", "mlp.experts.linear_fc2"] if spelling.grouped_experts else
               [f"mlp.experts.local_experts.{e}.linear_fc{n}" for e in range(config.num_experts) for n in (1, 2)])
    layer = ["self_attention.linear_qkv", "self_attention.linear_proj", *experts]
    return ["output_layer" + EXTRA_STATE] + [
        layer_prefix(i) + name + EXTRA_STATE for i in range(config.num_layers) for name in layer]


def layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def megatron_shapes(config: ModelConfig, spelling: Spelling, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, by Megatron name (layers numbered globally)."""
    H, d, E, F = config.hidden_size, config.head_dim, config.num_experts, config.moe_ffn_hidden_size
    shapes = {EMBEDDING: (padded_vocab, H), FINAL_NORM: (H,), OUTPUT: (padded_vocab, H)}
    for i in range(config.num_layers):
        layer = {
            spelling.attention_norm(): (H,),
            "self_attention.linear_qkv.weight": ((config.num_heads + 2 * config.num_query_groups) * d, H),
            "self_attention.linear_proj.weight": (H, H),
            "pre_mlp_layernorm.weight": (H,),
            "mlp.router.weight": (E, H),
        }
        for e in range(E):
            layer[spelling.expert("linear_fc1", e)] = (2 * F, H)
            layer[spelling.expert("linear_fc2", e)] = (H, F)
        if config.has_gengram:  # in every layer, used or not
            layer.update(gengram_shapes(config.gengram))
        shapes.update({layer_prefix(i) + name: shape for name, shape in layer.items()})
    return shapes


def gengram_shapes(gengram: GengramConfig) -> dict[str, tuple[int, ...]]:
    H, D, ks = gengram.hidden_size, gengram.embed_dim_per_ngram, gengram.ngram_sizes
    shapes = {f"gengram.embeddings.{j}.weight": (5**k, D) for j, k in enumerate(ks)}
    shapes |= {"gengram.key_proj.weight": (H, len(ks) * D), "gengram.value_proj.weight": (H, len(ks) * D),
               "gengram.norm_q.weight": (H,), "gengram.norm_k.weight": (H,)}
    if gengram.short_conv:
        shapes["gengram.short_conv.conv.weight"] = (H, 1, gengram.conv_kernel)
    return shapes


def check_names(present: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Strict loading: every missing, unknown and mis-shaped tensor, named in one error."""
    missing = sorted(set(expected) - set(present))
    unknown = sorted(set(present) - set(expected))
    misshaped = sorted(
        f"{name} {tuple(present[name])} (expected {expected[name]})"
        for name in set(present) & set(expected) if tuple(present[name]) != tuple(expected[name])
    )
    problems = [f"{label}: {', '.join(names)}" for label, names in
                (("missing", missing), ("unknown", unknown), ("mis-shaped", misshaped)) if names]
    if problems:
        raise ConversionError(f"{source} does not match the model its args describe; " + "; ".join(problems))


# --- QKV: packed per query group on Megatron's side, three projections on ours ----------------------


def split_qkv(qkv: Tensor, config: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """[(heads + 2 groups) d, H] -> q [heads d, H], k [groups d, H], v [groups d, H]. Query head
    g * per_group + j belongs to group g on both sides (our SDPA's GQA pairs head h with kv head
    h // per_group), so the q heads keep their order."""
    groups, d = config.num_query_groups, config.head_dim
    per_group = config.num_heads // groups
    packed = qkv.view(groups, per_group + 2, d, -1)
    q, k, v = packed.split([per_group, 1, 1], dim=1)
    hidden = qkv.shape[-1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, config: ModelConfig) -> Tensor:
    """The inverse of split_qkv."""
    groups, d = config.num_query_groups, config.head_dim
    hidden = q.shape[-1]
    per_group = config.num_heads // groups
    packed = torch.cat([q.view(groups, per_group, d, hidden), k.view(groups, 1, d, hidden),
                        v.view(groups, 1, d, hidden)], dim=1)
    return packed.reshape(-1, hidden)


# --- the state dicts -------------------------------------------------------------------------------


def ours_layer(i: int) -> str:
    return f"layers.{i}."


def expert_name(i: int, e: int, projection: str) -> str:
    return f"{ours_layer(i)}ffn.moe.deepspeed_moe.experts.deepspeed_experts.{e}.{projection}.weight"


def router_name(i: int) -> str:
    return f"{ours_layer(i)}ffn.moe.deepspeed_moe.gate.wg.weight"


def import_state(read: Callable[[str], Tensor], config: ModelConfig, spelling: Spelling) -> dict[str, Tensor]:
    """GengramLM's fp32 state dict from a Megatron checkpoint, `read(name)` giving one tensor at a time.
    Gengram tensors of unused layers are never read."""
    rows = torch.tensor(MEGATRON_ROW)
    state = {"embed.weight": own_copy(read(EMBEDDING)[rows]), "norm.weight": own_copy(read(FINAL_NORM)),
             "lm_head.weight": own_copy(read(OUTPUT)[rows])}
    F = config.moe_ffn_hidden_size
    for i in range(config.num_layers):
        src, dst = layer_prefix(i), ours_layer(i)

        def get(name: str, src: str = src) -> Tensor:
            return read(src + name)

        q, k, v = split_qkv(get("self_attention.linear_qkv.weight"), config)
        state |= {
            dst + "attn_norm.weight": own_copy(get(spelling.attention_norm())),
            dst + "attn.q_proj.weight": own_copy(q), dst + "attn.k_proj.weight": own_copy(k),
            dst + "attn.v_proj.weight": own_copy(v),
            dst + "attn.o_proj.weight": own_copy(get("self_attention.linear_proj.weight")),
            dst + "ffn_norm.weight": own_copy(get("pre_mlp_layernorm.weight")),
            router_name(i): own_copy(get("mlp.router.weight")),
        }
        for e in range(config.num_experts):
            gate, up = get(spelling.expert("linear_fc1", e)).split([F, F])
            state |= {expert_name(i, e, "gate_proj"): own_copy(gate), expert_name(i, e, "up_proj"): own_copy(up),
                      expert_name(i, e, "down_proj"): own_copy(get(spelling.expert("linear_fc2", e)))}
        if i + 1 in config.gengram_layers:
            state |= import_gengram(get, config.gengram, dst + "gengram.")
    return state


def own_copy(tensor: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A contiguous copy with a storage of its own: a checkpoint's tensors may be views of one large
    buffer (Megatron's distributed optimizer keeps parameters so; a split leaves views of its input),
    which torch.save would otherwise write whole."""
    return tensor.to(dtype, memory_format=torch.contiguous_format, copy=True)


def import_gengram(get: Callable[[str], Tensor], gengram: GengramConfig, dst: str) -> dict[str, Tensor]:
    tables = [get(f"gengram.embeddings.{j}.weight") for j in range(len(gengram.ngram_sizes))]
    # Our one table holds the k-blocks in the order of K, row offset_k + code as the fork's table k row code.
    state = {dst + "memory.weight": own_copy(torch.cat(tables))}
    for name in ("key_proj.weight", "value_proj.weight", "norm_q.weight", "norm_k.weight"):
        state[dst + name] = own_copy(get(f"gengram.{name}"))
    if gengram.short_conv:
        state[dst + "short_conv.weight"] = own_copy(get("gengram.short_conv.conv.weight"))
    return state


def export_state(state: dict[str, Tensor], config: ModelConfig, spelling: Spelling,
                 padded_vocab: int = RELEASE_PADDED_VOCAB, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The Megatron state dict (layers numbered globally) of a GengramLM state dict: the inverse of
    import_state on every mapped tensor, bit for bit in the same dtype. Consumes `state`: each of its
    tensors is dropped once converted, so that the export holds about one copy of the model."""
    check_exportable(config)
    take = state.pop
    model = {EMBEDDING: vocabulary_rows(take("embed.weight"), padded_vocab), FINAL_NORM: take("norm.weight"),
             OUTPUT: vocabulary_rows(take("lm_head.weight"), padded_vocab)}
    out = {name: own_copy(tensor, dtype) for name, tensor in model.items()}
    for i in range(config.num_layers):
        src, dst = ours_layer(i), layer_prefix(i)
        q, k, v = (take(f"{src}attn.{p}_proj.weight") for p in "qkv")
        layer = {
            spelling.attention_norm(): take(src + "attn_norm.weight"),
            "self_attention.linear_qkv.weight": pack_qkv(q, k, v, config),
            "self_attention.linear_proj.weight": take(src + "attn.o_proj.weight"),
            "pre_mlp_layernorm.weight": take(src + "ffn_norm.weight"),
            "mlp.router.weight": take(router_name(i)),
        }
        for e in range(config.num_experts):
            gate, up = take(expert_name(i, e, "gate_proj")), take(expert_name(i, e, "up_proj"))
            layer[spelling.expert("linear_fc1", e)] = torch.cat([gate, up])
            layer[spelling.expert("linear_fc2", e)] = take(expert_name(i, e, "down_proj"))
        if config.has_gengram:
            layer |= export_gengram(take, config, i)
        out |= {dst + name: own_copy(tensor, dtype) for name, tensor in layer.items()}
    return out


def check_exportable(config: ModelConfig) -> None:
    """What the fork cannot compute, named in one error."""
    problems = []
    if config.vocab_size != VOCAB_SIZE:
        problems.append(f"model.vocab_size={config.vocab_size} (only Contract 1's {VOCAB_SIZE} ids map to Megatron's)")
    if not config.is_moe or config.moe_layers not in (None, tuple(range(1, config.num_layers + 1))):
        problems.append("dense FFN layers (the fork's checkpoints are MoE in every layer)")
    if config.has_gengram and config.gengram.pooling != "mean":
        problems.append(f"gengram.pooling={config.gengram.pooling!r} (the fork averages every occurrence: 'mean')")
    if config.has_gengram and config.gengram.window_size is None:
        problems.append("gengram.window_size=null (the fork always pools a window)")
    if problems:
        raise ConversionError("the fork cannot run this model: " + "; ".join(problems))


def vocabulary_rows(ours: Tensor, padded_vocab: int) -> Tensor:
    """Our [8, H] rows placed at their Megatron ids; every other row a copy of the spare's (see MEGATRON_ROW)."""
    rows = ours[SPARE].expand(padded_vocab, -1).clone()
    rows[torch.tensor(MEGATRON_ROW)] = ours
    return rows


def export_gengram(take: Callable[[str], Tensor], config: ModelConfig, i: int) -> dict[str, Tensor]:
    """Layer i's Gengram under the fork's names (relative to the layer); zeros where the layer has none
    (the fork builds them in every layer and an unused one is never read)."""
    gengram, src = config.gengram, f"{ours_layer(i)}gengram."
    if i + 1 not in config.gengram_layers:
        return {name: torch.zeros(shape) for name, shape in gengram_shapes(gengram).items()}
    tables = take(src + "memory.weight").split([5**k for k in gengram.ngram_sizes])
    out = {f"gengram.embeddings.{j}.weight": table for j, table in enumerate(tables)}
    for name in ("key_proj.weight", "value_proj.weight", "norm_q.weight", "norm_k.weight"):
        out["gengram." + name] = take(src + name)
    if gengram.short_conv:
        out["gengram.short_conv.conv.weight"] = take(src + "short_conv.weight")
    return out


# --- the model config, from and to Megatron's args -------------------------------------------------

# Megatron settings GengramLM's forward has one value for: (arg, the value it needs, Megatron's default).
REQUIRED_ARGS: tuple[tuple[str, Any, Any], ...] = (
    ("normalization", "RMSNorm", "LayerNorm"),
    ("swiglu", True, False),
    ("untie_embeddings_and_output_weights", True, False),
    ("add_bias_linear", False, True),
    ("position_embedding_type", "rope", "learned_absolute"),
    ("rotary_percent", 1.0, 1.0),
    ("rotary_interleaved", False, False),
    ("use_rope_scaling", False, False),
    ("qk_layernorm", False, False),
    ("add_qkv_bias", False, False),
    ("apply_layernorm_1p", False, False),
    ("moe_layer_freq", 1, 1),
    ("moe_router_score_function", "softmax", "softmax"),
    ("moe_router_pre_softmax", False, False),
    ("moe_router_topk_scaling_factor", None, None),
    ("moe_router_enable_expert_bias", False, False),
    ("moe_router_num_groups", None, None),
    ("moe_shared_expert_intermediate_size", None, None),
    ("tensor_model_parallel_size", 1, 1),
    ("expert_model_parallel_size", 1, 1),
    ("virtual_pipeline_model_parallel_size", None, None),
)
# What decides the weights and the forward: the fields a named flavour must agree on.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_query_groups", "num_experts",
                       "moe_top_k", "moe_ffn_hidden_size", "moe_layers", "rope_base", "norm_eps", "gengram",
                       "gengram_layers")


def config_from_args(args: Mapping[str, Any]) -> ModelConfig:
    """GengramLM's config from a checkpoint's Megatron args (plain fields); every setting it cannot
    represent is named in one error."""
    problems = [f"{name}={args.get(name, default)!r} (GengramLM needs {wanted!r})"
                for name, wanted, default in REQUIRED_ARGS if args.get(name, default) != wanted]
    needed = ("num_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_router_topk", "padded_vocab_size")
    unset = [f"{name} is not set" for name in needed if args.get(name) is None]
    if unset:  # nothing below can be checked without these
        raise ConversionError("the checkpoint's args: " + "; ".join(problems + unset))
    hidden, heads = args["hidden_size"], args["num_attention_heads"]
    if args.get("kv_channels") not in (None, hidden // heads):
        problems.append(f"kv_channels={args['kv_channels']} (GengramLM needs hidden_size / heads = {hidden // heads})")
    if args["padded_vocab_size"] <= max(MEGATRON_ROW):
        problems.append(f"padded_vocab_size={args['padded_vocab_size']} lacks the release tokenizer's ids")
    gengram, gengram_layers = None, ()
    if args.get("gengram_enabled"):
        token_ids = tuple(args.get("gengram_token_ids") or ())
        if token_ids != GENGRAM_TOKEN_IDS:
            problems.append(f"gengram_token_ids={list(token_ids)} (the release tokenizer's A C G T N are "
                            f"{list(GENGRAM_TOKEN_IDS)})")
        try:
            gengram = GengramConfig(
                hidden_size=hidden, ngram_sizes=tuple(args["gengram_ngram_sizes"]),
                embed_dim_per_ngram=args["gengram_embed_dim_per_ngram"], window_size=args["gengram_window_size"],
                pooling="mean", short_conv=bool(args.get("gengram_use_short_conv", False)),
                conv_kernel=args.get("gengram_short_conv_kernel_size", 4),
                # Unset means max(K) on both sides: kept unset, so that it compares equal to a flavour's.
                conv_dilation=None if args.get("gengram_short_conv_dilation") == max(args["gengram_ngram_sizes"])
                else args.get("gengram_short_conv_dilation"),
            )
        except (KeyError, ValueError) as error:
            problems.append(f"gengram: {error}")
        # An empty layer list means every layer, as the fork reads it.
        gengram_layers = tuple(args.get("gengram_layer_ids") or range(1, args["num_layers"] + 1))
    if problems:
        raise ConversionError("the checkpoint's args: " + "; ".join(problems))
    try:
        return ModelConfig(
            hidden_size=hidden, num_layers=args["num_layers"], num_heads=heads,
            num_query_groups=args.get("num_query_groups") if args.get("group_query_attention") else heads,
            ffn_hidden_size=args.get("ffn_hidden_size") or 4 * hidden,
            max_seq_len=args.get("max_position_embeddings") or args.get("seq_length"),
            rope_base=float(args.get("rotary_base", 10000)), norm_eps=args.get("norm_epsilon", 1e-5),
            init_std=args.get("init_method_std", 0.02),
            num_experts=args["num_experts"], moe_top_k=args["moe_router_topk"],
            moe_ffn_hidden_size=args.get("moe_ffn_hidden_size") or args.get("ffn_hidden_size"),
            aux_loss_coef=args.get("moe_aux_loss_coeff", 0.0), z_loss_coef=args.get("moe_z_loss_coeff") or 0.0,
            gengram=gengram, gengram_layers=gengram_layers,
        )
    except ValueError as error:
        raise ConversionError(f"the checkpoint's args: {error}") from None


def args_for(config: ModelConfig, pipeline_stages: int = 1, padded_vocab: int = RELEASE_PADDED_VOCAB,
             dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The Megatron args (plain fields) that describe this config, as the fork's command line would set them."""
    args = {name: wanted for name, wanted, _ in REQUIRED_ARGS}
    args |= {
        "num_layers": config.num_layers, "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads, "group_query_attention": True,
        "num_query_groups": config.num_query_groups, "kv_channels": config.head_dim,
        "ffn_hidden_size": config.ffn_hidden_size, "max_position_embeddings": config.max_seq_len,
        "seq_length": config.max_seq_len, "rotary_base": int(config.rope_base), "norm_epsilon": config.norm_eps,
        "init_method_std": config.init_std, "num_experts": config.num_experts,
        "moe_router_topk": config.moe_top_k, "moe_ffn_hidden_size": config.moe_ffn_hidden_size,
        "moe_aux_loss_coeff": config.aux_loss_coef, "moe_z_loss_coeff": config.z_loss_coef,
        "padded_vocab_size": padded_vocab, "pipeline_model_parallel_size": pipeline_stages,
        "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
        "gengram_enabled": config.has_gengram,
    }
    if config.has_gengram:
        gengram = config.gengram
        args |= {
            "gengram_layer_ids": list(config.gengram_layers), "gengram_ngram_sizes": list(gengram.ngram_sizes),
            "gengram_embed_dim_per_ngram": gengram.embed_dim_per_ngram, "gengram_window_size": gengram.window_size,
            "gengram_token_ids": list(GENGRAM_TOKEN_IDS), "gengram_use_short_conv": gengram.short_conv,
            "gengram_short_conv_kernel_size": gengram.conv_kernel, "gengram_short_conv_dilation": gengram.dilation,
        }
    return args


def mismatches(config: ModelConfig, reference: ModelConfig) -> list[str]:
    """The architecture fields where a converted config differs from a named flavour (Gengram's field by field)."""
    def fields(c: ModelConfig) -> dict[str, Any]:
        values = {name: getattr(c, name) for name in ARCHITECTURE_FIELDS}
        gengram = values.pop("gengram")
        values |= {f"gengram.{f.name}": getattr(gengram, f.name) for f in dataclasses.fields(GengramConfig)
                   if f.name != "hidden_size"} if gengram is not None else {"gengram": None}
        return values

    ours, theirs = fields(config), fields(reference)
    return [f"{name}: checkpoint {ours.get(name)!r}, flavour {theirs.get(name)!r}"
            for name in dict.fromkeys([*ours, *theirs]) if ours.get(name) != theirs.get(name)]

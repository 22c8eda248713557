"""GengramLM: a decoder-only MoE transformer over DNA tokens with Gengram memory at chosen layers.

    x = embed(ids)
    for layer l = 1..L:
        x = x + Gengram_l(x, ids)            (only at configured layers)
        x = x + Attention(RMSNorm(x))        (GQA, RoPE, causal SDPA)
        x = x + FFN(RMSNorm(x))              (dense SwiGLU, or DeepSpeed MoE of SwiGLU experts)
    logits = lm_head(RMSNorm(x))

    loss = LM + aux_coef * sum_l(aux_l) + z_coef * sum_l(z_l)          (l over the MoE layers)
    aux_l = E / (k * T^2) * sum_e (sum_t p[t, e]) * n_e                  (1 at perfect balance)
    z_l   = mean_t logsumexp(router_logits[t])^2

with p the router's softmax over all E experts, n_e the routes (top-k choices) to expert e and T the
micro-batch's tokens: the released Megatron run's losses, each layer's with the full coefficient.

The model knows nothing of parallelism or training loops: DeepSpeed wraps it from outside,
and the MoE layer gets its expert-parallel groups from `deepspeed.initialize`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.config import ModelConfig
from model.gengram import Gengram, KmerWindows


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x [B, heads, S, d] by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # Angles in fp32 whatever the model dtype: bf16 positions above 256 are not exact.
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.to(device))
        return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Grouped-query attention: `num_query_groups` key/value heads shared by all query heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_query_groups
        self.head_dim = config.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # "sdpa" lets PyTorch choose flash / memory-efficient kernels where the device has
        # them and fall back to the math kernel on CPU; "math" pins the reference kernel.
        self.backends = [SDPBackend.MATH] if config.attention_backend == "math" else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if self.backends is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            with sdpa_kernel(self.backends):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class FFNOutput:
    out: Tensor
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    expert_counts: Tensor | None = None
    dropped_fraction: Tensor | None = None


class MoEFeedForward(nn.Module):
    """DeepSpeed's MoE layer over SwiGLU experts, with the released Megatron run's router losses."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        # Imported here so that dense models, and `import model`, do not pay DeepSpeed's import.
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            hidden_size=config.hidden_size,
            expert=SwiGLU(config.hidden_size, config.moe_ffn_hidden_size),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=config.moe_top_k,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            drop_tokens=config.drop_tokens,
            top2_2nd_expert_sampling=config.moe_second_expert_sampling,
        )

    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    def forward(self, x: Tensor) -> FFNOutput:
        # DeepSpeed's own l_aux is not used: its top-2 gate counts each token's first choice only.
        out, _, expert_counts = self.moe(x)
        # Nor does its gate hand out its logits: recompute them as it does, in fp32 (an H x E
        # matmul, negligible next to the experts), for both router losses.
        logits = F.linear(x.float(), self.router.weight.float()).flatten(0, -2)  # [T, E]
        T, E = logits.shape
        # Megatron's switch load-balancing loss counts both top-k choices of every token:
        #   aux = E / (k * T^2) * sum_e (sum_t p[t, e]) * n_e
        # p the softmax over all E experts (not only the chosen ones), n_e the routes to expert e
        # before any capacity limit. n_e is a count: the gradient reaches the router through p.
        probs = logits.softmax(dim=-1)
        routes = torch.zeros_like(probs).scatter_(1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        aux_loss = E / (self.top_k * T * T) * (probs.sum(0) * routes.sum(0)).sum()
        # ST-MoE's router z-loss keeps the logits small: mean over tokens of logsumexp^2.
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return FFNOutput(out, aux_loss, z_loss, expert_counts, self.dropped_fraction(expert_counts, T))

    def dropped_fraction(self, expert_counts: Tensor, num_tokens: int) -> Tensor | None:
        """Share of this forward's routes (token, expert choice) that expert capacity dropped; None if dropless.

        DeepSpeed's gate counts every route in exp_counts before it applies the capacity C, then keeps
        min(n_e, C) routes of expert e (for top-2 the first C in token order, first choices ahead of
        second ones): so sum_e max(n_e - C, 0) routes are dropped. C as the gate computes it (in fp32):
        max(min_capacity, ceil(T / E * capacity_factor * k)), eval_capacity_factor in eval mode.
        """
        gate = self.gate
        if not gate.drop_tokens:
            return None
        factor = gate.capacity_factor if self.training else gate.eval_capacity_factor
        capacity = torch.ceil(num_tokens / len(expert_counts) * torch.tensor(factor * self.top_k))
        capacity = capacity.clamp(min=gate.min_capacity).to(expert_counts.device)
        dropped = (expert_counts - capacity).clamp(min=0).sum()
        return (dropped / expert_counts.sum().clamp(min=1)).detach()


class DenseFeedForward(SwiGLU):
    def forward(self, x: Tensor) -> FFNOutput:
        return FFNOutput(super().forward(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        # Layers without Gengram hold no Gengram parameters at all.
        self.gengram = Gengram(config.gengram) if layer_id in config.gengram_layers and config.gengram else None
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn = (
            MoEFeedForward(config)
            if config.is_moe_layer(layer_id)
            else DenseFeedForward(config.hidden_size, config.ffn_hidden_size)
        )

    def forward(self, x: Tensor, input_ids: Tensor, cos: Tensor, sin: Tensor,
                windows: KmerWindows | None = None) -> tuple[Tensor, FFNOutput, Tensor | None]:
        """The block's output, its FFN's, and what Gengram wrote into the residual stream (None without)."""
        write = self.gengram(x, input_ids, windows) if self.gengram is not None else None
        if write is not None:
            x = x + write
        x = x + self.attn(self.attn_norm(x), cos, sin)
        ffn = self.ffn(self.ffn_norm(x))
        return x + ffn.out, ffn, write


@dataclass
class LMOutput:
    """Logits, the loss and its parts, and what training logs about experts and gates.

    loss = lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss, where aux_loss and z_loss are
    sums over the MoE layers (0 for a dense model); these four are computed with compute_loss only.
    Per layer, detached scalars, keyed by MoE layer id (this rank's tokens):
    aux_loss_by_layer, z_loss_by_layer: that layer's aux_l and z_l (see the module doc).
    expert_counts: routes to each expert [E], before any capacity limit (top-k choices of every token).
    dropped_fraction: share of that layer's routes dropped by expert capacity; empty when dropless.
    gate_stats: Gengram layer id -> {"gate_mean", "gate_open_fraction"} (detached scalars).
    With forward(keep_hidden=True), for evaluation:
    hidden_states: the residual stream [B, S, H] after the embedding (index 0) and after each layer l
    (index l), before the final norm; gengram_writes: Gengram layer id -> Gengram_l(h, x) [B, S, H],
    what that layer's memory added to the stream; gengram_gates: layer id -> alpha_l [B, S].
    """

    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    aux_loss_by_layer: dict[int, Tensor] = field(default_factory=dict)
    z_loss_by_layer: dict[int, Tensor] = field(default_factory=dict)
    expert_counts: dict[int, Tensor] = field(default_factory=dict)
    dropped_fraction: dict[int, Tensor] = field(default_factory=dict)
    gate_stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    hidden_states: list[Tensor] = field(default_factory=list)
    gengram_writes: dict[int, Tensor] = field(default_factory=dict)
    gengram_gates: dict[int, Tensor] = field(default_factory=dict)


class GengramLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base)
        self.layers = nn.ModuleList(Block(config, layer_id) for layer_id in range(1, config.num_layers + 1))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied from embed
        self.register_buffer("ignored_targets", torch.tensor(config.ignored_targets), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, init_std) for every weight matrix (embedding, projections, experts, router, LM head) and
        norm weights 1; init_scheme "megatron" then gives the released run's exceptions (ModelConfig)."""
        config = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        if config.init_scheme != "megatron":
            return
        # Megatron's output_layer_init_method: the residual stream sums 2L of these projections.
        out_std = config.init_std / math.sqrt(2 * config.num_layers)
        for module in self.modules():
            if isinstance(module, Attention):
                nn.init.normal_(module.o_proj.weight, mean=0.0, std=out_std)
            elif isinstance(module, SwiGLU):  # dense FFNs and every expert
                nn.init.normal_(module.down_proj.weight, mean=0.0, std=out_std)
            elif isinstance(module, Gengram):
                module.reset_parameters()  # PyTorch's defaults, which the authors' fork keeps

    @contextlib.contextmanager
    def dropless_routing(self) -> Iterator[GengramLM]:
        """Route without expert capacity inside the block, whatever the config says: evaluating or
        exporting a model trained with capacity dropping must not depend on the batch. The gates
        read drop_tokens at every forward, so nothing else changes."""
        gates = [module.gate for module in self.modules() if isinstance(module, MoEFeedForward)]
        saved = [gate.drop_tokens for gate in gates]
        for gate in gates:
            gate.drop_tokens = False
        try:
            yield self
        finally:
            for gate, drop_tokens in zip(gates, saved, strict=True):
                gate.drop_tokens = drop_tokens

    def readout(self, hidden: Tensor) -> Tensor:
        """Logits from a residual stream: the final norm, then the LM head (LogitLens reads any layer so)."""
        return self.lm_head(self.norm(hidden))

    def lm_loss(self, logits: Tensor, input_ids: Tensor) -> Tensor:
        """Next-token cross-entropy over targets that are not ignored (always PAD)."""
        targets = input_ids[:, 1:]
        keep = ~torch.isin(targets, self.ignored_targets)
        per_token = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        # A batch whose targets are all ignored yields 0 with a graph, never 0/0.
        return (per_token * keep.reshape(-1)).sum() / keep.sum().clamp(min=1)

    def forward(self, input_ids: Tensor, compute_loss: bool = True, keep_hidden: bool = False) -> LMOutput:
        input_ids = input_ids.long()
        S = input_ids.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rotary(S, input_ids.device)
        x = self.embed(input_ids)
        gengrams = [layer.gengram for layer in self.layers if layer.gengram is not None]
        windows = gengrams[0].windows(input_ids) if gengrams else None
        aux_losses, z_losses = [], []
        output = LMOutput(logits=x)
        if keep_hidden:
            output.hidden_states.append(x)
        for layer in self.layers:
            x, ffn, write = layer(x, input_ids, cos, sin, windows)
            if keep_hidden:
                output.hidden_states.append(x)
                if write is not None:
                    output.gengram_writes[layer.layer_id] = write
                    output.gengram_gates[layer.layer_id] = layer.gengram.last_gate
            if ffn.aux_loss is not None:
                aux_losses.append(ffn.aux_loss)
                z_losses.append(ffn.z_loss)
                output.aux_loss_by_layer[layer.layer_id] = ffn.aux_loss.detach()
                output.z_loss_by_layer[layer.layer_id] = ffn.z_loss.detach()
                output.expert_counts[layer.layer_id] = ffn.expert_counts
                if ffn.dropped_fraction is not None:
                    output.dropped_fraction[layer.layer_id] = ffn.dropped_fraction
            if layer.gengram is not None:
                output.gate_stats[layer.layer_id] = layer.gengram.gate_stats()
        output.logits = self.readout(x)
        if compute_loss:
            zero = output.logits.new_zeros((), dtype=torch.float32)
            output.lm_loss = self.lm_loss(output.logits, input_ids)
            # Summed, not averaged, over layers: Megatron attaches each layer's with the full coefficient.
            output.aux_loss = torch.stack(aux_losses).sum() if aux_losses else zero
            output.z_loss = torch.stack(z_losses).sum() if z_losses else zero
            output.loss = (
                output.lm_loss
                + self.config.aux_loss_coef * output.aux_loss
                + self.config.z_loss_coef * output.z_loss
            )
        return output


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total and activated parameters (activated: what one token passes through, i.e. every
    non-expert parameter plus top_k of num_experts experts). Built on the meta device, so the
    10 B flavour costs no memory; experts are counted globally (ep_size 1)."""
    with torch.device("meta"):
        model = GengramLM(config.replace(ep_size=1))
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".deepspeed_experts." in name)
    gengram = sum(p.numel() for name, p in model.named_parameters() if ".gengram." in name)
    activated = total - expert + (expert * config.moe_top_k // config.num_experts if config.is_moe else 0)
    return {"total": total, "activated": activated, "experts": expert, "gengram": gengram}

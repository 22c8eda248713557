"""Gengram: conditional n-gram memory for DNA language models (arXiv 2601.22203).

For every position t and every k in K the module reads the k-mers that lie wholly inside the W
bases ending at t, pools their memory rows, and writes a gated projection of the pooled features
into the residual stream (the caller adds it: h <- h + gengram(h, ids)):

    e_k[j] = memory[offset_k + code_k[j]]           code_k[j] = sum_i digit[j - i] * 5**i, i < k
    m_k[t] = pool{ e_k[j] : t - (W - k) <= j <= t, the k-mer ending at j is all bases }
    m      = concat_k m_k
    alpha  = sigmoid(signed_sqrt(<RMSNorm_q(h), RMSNorm_k(W_key m)> / sqrt(H)))
    out    = alpha * W_value m ;  out = out + SiLU(causal depthwise conv(out))

pooling="mean" averages every occurrence in the window (the published code); pooling="unique"
averages each distinct k-mer once (paper Eq. 7). window_size=None pools nothing: m_k[t] = e_k[t].

Every [B, S, H] temporary costs real time on CPU (at S=8192, H=1024 a fresh 32 MiB buffer takes
longer to fault in than the arithmetic on it), so three steps have hand-written backwards that
keep far fewer of them than autograd would: the window pooling, the gate's sums over H, and the
causal conv. tests/test_gengram.py checks each against finite differences and the module against
a per-position reference; benchmarks/gengram_module.py measures the gain.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from model.config import GengramConfig
from model.vocab import GENGRAM_DIGIT, GENGRAM_RADIX, NO_DIGIT, PAD

NORM_EPS = 1e-5
GATE_FLOOR = 1e-6  # |g| is floored before the square root, whose slope is infinite at 0


def _lagged(x: torch.Tensor, lags: int, fill: int) -> torch.Tensor:
    """[B, S, ...] -> [B, S, ..., lags]: entry o holds x at position t - o (`fill` before the start)."""
    padding = x.new_full((x.shape[0], lags - 1, *x.shape[2:]), fill)
    return torch.cat([padding, x], 1).unfold(1, lags, 1).flip(-1)


class _WindowBag(torch.autograd.Function):
    """m[b, t, k] = sum_o weight[b, t, k, o] * table[rows[b, t - o, k]]: for every position and k,
    the weighted bag of the memory rows of the k-mers in its window. weight is 0 where t - o < 0.

    Forward is one `embedding_bag` straight from the table. Backward first hands every occurrence j
    the gradient of all the windows that hold it (the transposed window: again one embedding_bag,
    over the rows of the gradient), then adds each occurrence into its table row once. Autograd's
    own embedding_bag backward scatters each of the S*|K|*L taps separately, several times slower
    on CPU. Every sum has at most L terms, so its rounding error is the same at every position,
    where a prefix sum over the sequence drifts with t (in bf16, past the signal within 32k).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.table_shape = table.shape
        lags = weight.shape[-1]
        m = F.embedding_bag(
            _lagged(rows, lags, fill=0).reshape(-1, lags), table,
            per_sample_weights=weight.reshape(-1, lags), mode="sum",
        )
        return m.view(*rows.shape, table.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rows, weight = ctx.saved_tensors
        B, S, nk, lags = weight.shape
        # Tap o of the window ending at t = j + o, seen from j: gradient row (t, k) with weight[t, k, o].
        grad_row = torch.arange(B * S * nk, device=grad.device).view(B, S, nk)
        index, tap_weight = torch.zeros_like(weight, dtype=torch.long), torch.zeros_like(weight)
        for o in range(min(lags, S)):
            index[:, : S - o, :, o] = grad_row[:, o:]
            tap_weight[:, : S - o, :, o] = weight[:, o:, :, o]
        grad_occurrence = F.embedding_bag(
            index.reshape(-1, lags), grad.reshape(-1, grad.shape[-1]),
            per_sample_weights=tap_weight.reshape(-1, lags), mode="sum",
        )
        # A row of k=1 collects about B*S/5 occurrences: accumulate in at least fp32.
        dtype = torch.promote_types(grad.dtype, torch.float32)
        grad_table = grad.new_zeros(ctx.table_shape, dtype=dtype)
        grad_table.index_add_(0, rows.flatten(), grad_occurrence.to(dtype))
        return grad_table.to(grad.dtype), None, None


class _GateSums(torch.autograd.Function):
    """The three sums over H that the gate needs per position: <h * w, key>, <h, h>, <key, key>."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, key: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(h, key, w)
        dot = (h * w).mul_(key).sum(-1)
        return dot, torch.linalg.vector_norm(h, dim=-1).square(), torch.linalg.vector_norm(key, dim=-1).square()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_dot: torch.Tensor, d_hh: torch.Tensor, d_kk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, key, w = ctx.saved_tensors
        grad_w = torch.mv((h * key).flatten(0, -2).T, d_dot.flatten())
        d_dot, d_hh, d_kk = d_dot.unsqueeze(-1), d_hh.unsqueeze(-1), d_kk.unsqueeze(-1)
        grad_h = (key * w).mul_(d_dot).addcmul_(h, d_hh, value=2)
        grad_key = (h * w).mul_(d_dot).addcmul_(key, d_kk, value=2)
        return grad_h, grad_key, grad_w


def _conv_taps(kernel: int, dilation: int, length: int) -> list[tuple[int, int]]:
    """(tap, lag) of the taps before the last (lag 0) that reach back inside the sequence."""
    lags = [(i, (kernel - 1 - i) * dilation) for i in range(kernel - 1)]
    return [(i, lag) for i, lag in lags if lag < length]


class _CausalConv(torch.autograd.Function):
    """y[b, t] = sum_i weight[:, i] * x[b, t - (kernel - 1 - i) * dilation] on [B, S, H]: a depthwise
    causal conv as shifted multiply-adds along S. nn.Conv1d wants [B, H, S], and the transposes and
    padding around it cost more on CPU than the conv itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        y = x * weight[:, -1]
        for i, lag in _conv_taps(weight.shape[1], dilation, x.shape[1]):
            y[:, lag:].addcmul_(x[:, :-lag], weight[:, i])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad * weight[:, -1]
        grad_weight = torch.zeros_like(weight)
        products = grad * x
        grad_weight[:, -1] = products.sum((0, 1))
        for i, lag in _conv_taps(weight.shape[1], ctx.dilation, x.shape[1]):
            grad_x[:, :-lag].addcmul_(grad[:, lag:], weight[:, i])
            torch.mul(grad[:, lag:], x[:, :-lag], out=products[:, lag:])
            grad_weight[:, i] = products[:, lag:].sum((0, 1))
        return grad_x, grad_weight, None


class ShortConv(nn.Module):
    """x + SiLU(depthwise causal conv1d(x)), no bias; weight [H, 1, kernel] as in nn.Conv1d."""

    def __init__(self, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(hidden, 1, kernel))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = kernel for a depthwise conv.
        bound = 1 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: SiLU's backward needs its input, not its output.
        return F.silu(_CausalConv.apply(x, self.weight[:, 0], self.dilation)).add_(x)


class KmerWindows(NamedTuple):
    rows: torch.Tensor  # [B, S, |K|]: table row of the k-mer ending at each position
    weight: torch.Tensor  # [B, S, |K|, L]: [..., t, k, o] weighs the k-mer ending at t - o in m_k[t]


class Gengram(nn.Module):
    """residual [B, S, H] = Gengram(config)(hidden_states [B, S, H], input_ids [B, S]).

    After each forward, `last_gate` holds alpha [B, S] (detached) and `gate_stats()` summarises it
    for training logs over the non-PAD positions: padding has no sequence to gate, whereas EOD and N
    are real positions with a gate of their own (only their k-mers are never looked up).
    """

    def __init__(self, config: GengramConfig):
        super().__init__()
        self.config = config
        ks, dim, hidden = config.ngram_sizes, config.embed_dim_per_ngram, config.hidden_size
        self.memory = nn.Embedding(config.table_rows, dim)
        self.key_proj = nn.Linear(len(ks) * dim, hidden, bias=False)
        self.value_proj = nn.Linear(len(ks) * dim, hidden, bias=False)
        # The gate applies the two RMSNorms in factored form (see gate()); these hold their weights.
        self.norm_q = nn.RMSNorm(hidden, eps=NORM_EPS)
        self.norm_k = nn.RMSNorm(hidden, eps=NORM_EPS)
        self.short_conv = ShortConv(hidden, config.conv_kernel, config.dilation) if config.short_conv else None
        # Row of k-mer code 0 for each k: the k-blocks of the one table, in the order of K.
        offsets = [sum(GENGRAM_RADIX**j for j in ks[:i]) for i in range(len(ks))]
        # k-mer end positions inside the W-base window: W - k + 1 (t itself without a window).
        spans = [config.window_size - k + 1 if config.window_size is not None else 1 for k in ks]
        self.register_buffer("digits", torch.tensor(GENGRAM_DIGIT), persistent=False)
        self.register_buffer("row_offsets", torch.tensor(offsets), persistent=False)
        self.register_buffer("spans", torch.tensor(spans), persistent=False)
        self.max_span = max(spans)
        self.last_gate: torch.Tensor | None = None
        self.last_real: torch.Tensor | None = None  # non-PAD positions of the last forward
        self.reset_parameters()

    def reset_parameters(self, init_std: float | None = None) -> None:
        """PyTorch's defaults, which the authors' fork keeps: table N(0, 1), projections
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)); or, given init_std, N(0, init_std) for all three.
        Norm weights 1 and the conv's default init either way."""
        for module in (self.memory, self.key_proj, self.value_proj):
            if init_std is None:
                module.reset_parameters()
            else:
                nn.init.normal_(module.weight, mean=0.0, std=init_std)
        self.norm_q.reset_parameters()
        self.norm_k.reset_parameters()
        if self.short_conv is not None:
            self.short_conv.reset_parameters()

    def kmer_rows(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table row of the k-mer ending at each position, and whether it is all bases: [B, S, |K|] each."""
        ks = self.config.ngram_sizes
        # Ids past the vocabulary (a padded embedding) read as the spare id: no digit.
        digit = self.digits[input_ids.long().clamp(0, len(self.digits) - 1)]
        code, valid = torch.zeros_like(digit), torch.ones_like(digit, dtype=torch.bool)
        codes, valids = [], []
        for i in range(max(ks)):
            back = F.pad(digit, (i, 0), value=NO_DIGIT)[:, : digit.shape[1]]  # digit of token t - i
            code = code + back.clamp(min=0) * GENGRAM_RADIX**i
            valid = valid & (back != NO_DIGIT)
            if i + 1 in ks:
                codes.append(code)
                valids.append(valid)
        return torch.stack(codes, -1) + self.row_offsets, torch.stack(valids, -1)

    def window_weights(self, rows: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weight of the k-mer ending at t - o in m_k[t]: [B, S, |K|, L], L the widest span."""
        lags = self.max_span
        o = torch.arange(lags, device=rows.device)
        counted = _lagged(valid, lags, fill=False) & (o < self.spans[:, None])
        if self.config.pooling == "unique":
            # Each distinct k-mer counts once, at its last occurrence in the window: the occurrence
            # at j counts for t = j + o only if the same k-mer does not recur at j + 1 .. j + o.
            recurs_after = torch.full_like(rows, lags)
            for d in range(lags - 1, 0, -1):
                again = valid[:, d:] & (rows[:, d:] == rows[:, :-d])
                recurs_after[:, :-d] = torch.where(again, d, recurs_after[:, :-d])
            counted &= o < _lagged(recurs_after, lags, fill=0)
        counted = counted.to(dtype)
        return counted / counted.sum(-1, keepdim=True).clamp(min=1)

    def gate(self, hidden_states: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        # <RMSNorm_q(h), RMSNorm_k(key)> = <h * w_q * w_k, key> / (rms(h) * rms(key)): three sums
        # per position, and no normalised copies of h and key.
        H = key.shape[-1]
        dot, hh, kk = _GateSums.apply(hidden_states, key, self.norm_q.weight * self.norm_k.weight)
        g = dot * torch.rsqrt((hh / H + self.norm_q.eps) * (kk / H + self.norm_k.eps)) / math.sqrt(H)
        g = g.sign() * g.abs().clamp(min=GATE_FLOOR).sqrt()
        return torch.sigmoid(g)

    def windows(self, input_ids: torch.Tensor) -> KmerWindows:
        """What the lookups need from the tokens alone: the same for every Gengram layer of a model
        (they share one config), so GengramLM computes it once per forward and hands it to each."""
        rows, valid = self.kmer_rows(input_ids)
        return KmerWindows(rows, self.window_weights(rows, valid, self.memory.weight.dtype))

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                windows: KmerWindows | None = None) -> torch.Tensor:
        rows, weight = windows if windows is not None else self.windows(input_ids)
        m = _WindowBag.apply(self.memory.weight, rows, weight).flatten(2)
        key, value = self.key_proj(m), self.value_proj(m)
        alpha = self.gate(hidden_states, key)
        self.last_gate, self.last_real = alpha.detach(), input_ids != PAD
        out = alpha.unsqueeze(-1) * value
        return out if self.short_conv is None else self.short_conv(out)

    def gate_stats(self) -> dict[str, torch.Tensor]:
        """Mean gate and share of gates above 0.5 over the last forward's non-PAD positions (no host sync)."""
        real = self.last_real.float()
        count = real.sum().clamp(min=1)
        return {
            "gate_mean": (self.last_gate.float() * real).sum() / count,
            "gate_open_fraction": ((self.last_gate > 0.5).float() * real).sum() / count,
        }

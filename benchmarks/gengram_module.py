"""Gengram forward+backward time and peak memory: the module against the straightforward formulation.

    python benchmarks/gengram_module.py [--seq-len 8192] [--repeats 5]

Cases:
  module           model.gengram.Gengram
  straightforward  the formulas written out: a loop over k, one nn.Embedding per k, a window mean
                   per k from a prefix sum (cumsum) over the sequence, then the same key/value,
                   gate and short conv (defined below)
  block            for scale: one dense transformer block of the same width (causal SDPA + SwiGLU)

Time: median of --repeats forward+backward passes after a warm-up, torch's default thread count;
module and straightforward take turns in one subprocess (fair under load from other processes),
the block runs in another.
Peak memory: a second subprocess per case runs one pass with glibc's mmap threshold fixed at
64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor buffer is its own mapping, returned to the OS when
freed. After a warm-up pass, peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before
the measured pass is then the high-water mark of live tensors plus parameter gradients, as the OS
sees it, without the heap slack that glibc's default policy keeps (which differs from case to
case). Timings run with the default allocator settings. Linux only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GengramConfig
from model.gengram import Gengram
from model.vocab import GENGRAM_DIGIT, GENGRAM_RADIX, NO_DIGIT

CASES = ("module", "straightforward", "block")


class Straightforward(nn.Module):
    """Gengram as the formulas read: per k its own table, k-mer codes, and a prefix-sum window mean."""

    def __init__(self, config: GengramConfig):
        super().__init__()
        self.config = config
        ks, dim, hidden = config.ngram_sizes, config.embed_dim_per_ngram, config.hidden_size
        self.embeds = nn.ModuleList(nn.Embedding(GENGRAM_RADIX**k, dim) for k in ks)
        self.key_proj = nn.Linear(len(ks) * dim, hidden, bias=False)
        self.value_proj = nn.Linear(len(ks) * dim, hidden, bias=False)
        self.norm_q = nn.RMSNorm(hidden, eps=1e-5)
        self.norm_k = nn.RMSNorm(hidden, eps=1e-5)
        self.short_conv = nn.Conv1d(
            hidden, hidden, config.conv_kernel, dilation=config.dilation, groups=hidden, bias=False
        )
        self.register_buffer("digits", torch.tensor(GENGRAM_DIGIT), persistent=False)

    def forward(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        S = ids.shape[1]
        digit = self.digits[ids]
        features = []
        for k, embed in zip(cfg.ngram_sizes, self.embeds, strict=True):
            code, valid = torch.zeros_like(digit), torch.ones_like(digit, dtype=torch.bool)
            for i in range(k):
                back = F.pad(digit, (i, 0), value=NO_DIGIT)[:, :S]
                code = code + back.clamp(min=0) * GENGRAM_RADIX**i
                valid = valid & (back != NO_DIGIT)
            e = embed(code) * valid.unsqueeze(-1)
            span = cfg.window_size - k + 1
            total = F.pad(e.cumsum(1), (0, 0, span, 0))
            count = F.pad(valid.cumsum(1), (span, 0))
            window_sum = total[:, span:] - total[:, :S]
            window_count = (count[:, span:] - count[:, :S]).clamp(min=1)
            features.append(window_sum / window_count.unsqueeze(-1))
        m = torch.cat(features, -1)
        key, value = self.key_proj(m), self.value_proj(m)
        g = (self.norm_q(h) * self.norm_k(key)).sum(-1) / math.sqrt(cfg.hidden_size)
        g = g.sign() * g.abs().clamp(min=1e-6).sqrt()
        out = torch.sigmoid(g).unsqueeze(-1) * value
        pad = (cfg.conv_kernel - 1) * cfg.dilation
        conv = self.short_conv(F.pad(out.transpose(1, 2), (pad, 0))).transpose(1, 2)
        return out + F.silu(conv)

    @torch.no_grad()
    def copy_from(self, module: Gengram) -> None:
        rows = 0
        for k, embed in zip(self.config.ngram_sizes, self.embeds, strict=True):
            embed.weight.copy_(module.memory.weight[rows : rows + GENGRAM_RADIX**k])
            rows += GENGRAM_RADIX**k
        for name in ("key_proj", "value_proj", "norm_q", "norm_k", "short_conv"):
            getattr(self, name).load_state_dict(getattr(module, name).state_dict())


class Block(nn.Module):
    """A dense pre-norm transformer block: causal SDPA attention and a SwiGLU FFN."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, H))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def build(case: str, args: argparse.Namespace) -> nn.Module:
    config = GengramConfig(hidden_size=args.hidden, embed_dim_per_ngram=args.dim, window_size=args.window)
    torch.manual_seed(0)
    if case == "block":
        return Block(args.hidden, heads=16, ffn=4 * args.hidden)
    module = Gengram(config)
    if case == "module":
        return module
    reference = Straightforward(config)
    reference.copy_from(module)
    return reference


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 6, (1, args.seq_len), generator=generator)  # bases incl. N
    h = torch.randn(1, args.seq_len, args.hidden, generator=generator).requires_grad_()
    return h, ids


def step(module: nn.Module, h: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    h.grad = None
    module(h, ids).backward(grad)


def rss_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident so far) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_time(cases: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median forward+backward seconds per case after a warm-up. The cases take turns, so that load
    from other processes on the machine falls on all of them alike."""
    modules = {case: build(case, args) for case in cases}
    h, ids = inputs(args)
    grad = torch.randn_like(h)
    times: dict[str, list[float]] = {case: [] for case in cases}
    for repeat in range(-1, args.repeats):
        for case, module in modules.items():
            start = time.perf_counter()
            step(module, h, ids, grad)
            if repeat >= 0:
                times[case].append(time.perf_counter() - start)
    return {case: statistics.median(t) for case, t in times.items()}


def measure_memory(case: str, args: argparse.Namespace) -> float:
    """Peak MiB of one forward+backward above the resident set before it (see the module docstring)."""
    module = build(case, args)
    h, ids = inputs(args)
    grad = torch.randn_like(h)
    step(module, h, ids, grad)  # one-off allocations (thread pools, kernel caches) happen here
    module.zero_grad(set_to_none=True)
    h.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = rss_mib("VmRSS")
    step(module, h, ids, grad)
    return rss_mib("VmHWM") - baseline


def in_subprocess(measure: str, cases: list[str], args: argparse.Namespace, repeats: int = 0) -> dict | float:
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    argv = [f"--seq-len={args.seq_len}", f"--hidden={args.hidden}", f"--dim={args.dim}",
            f"--window={args.window}", f"--repeats={repeats}", f"--measure={measure}", f"--cases={','.join(cases)}"]
    result = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_agreement(args: argparse.Namespace) -> dict[str, float]:
    """Agreement of module and straightforward: fp64 outputs and gradients to 1e-9 of their max, and fp32 outputs
    as accurate as each other (max error against fp64, relative to max |out|).

    fp32 outputs differ by more than fp32 rounding would suggest because the gate's signed square
    root is steep near 0 (where g sits at init), magnifying rounding differences in g; so each fp32
    output is judged against the fp64 truth rather than against the other.
    """
    module, reference = build("module", args), build("straightforward", args)
    h, ids = inputs(args)
    with torch.no_grad():
        out32 = [m(h, ids).double() for m in (module, reference)]
    outs, grads = [], []
    for m in (module.double(), reference.double()):
        h64 = h.detach().double().requires_grad_()
        out = m(h64, ids)
        out.square().sum().backward()
        memory = m.memory.weight.grad if m is module else torch.cat([e.weight.grad for e in m.embeds])
        names = ("key_proj", "value_proj", "norm_q", "norm_k", "short_conv")
        outs.append(out.detach())
        grads.append([h64.grad, memory, *(getattr(m, name).weight.grad for name in names)])
    for got, want in zip([outs[0], *grads[0]], [outs[1], *grads[1]], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * want.abs().max().item())
    truth = outs[1]
    scale = truth.abs().max().item()
    errors = {
        "module": (out32[0] - truth).abs().max().item() / scale,
        "straightforward": (out32[1] - truth).abs().max().item() / scale,
        "module vs straightforward": (out32[0] - out32[1]).abs().max().item() / scale,
    }
    assert errors["module"] <= 2 * errors["straightforward"] + 1e-6, errors
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256, help="embed_dim_per_ngram")
    parser.add_argument("--window", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-repeats", type=int, default=2)
    parser.add_argument("--measure", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "time":
        print(json.dumps(measure_time(args.cases.split(","), args)))
        return
    if args.measure == "memory":
        print(json.dumps(measure_memory(args.cases, args)))
        return

    print(f"Gengram fwd+bwd, fp32, B=1 S={args.seq_len} H={args.hidden} D={args.dim} K=1..6 "
          f"W={args.window}, {torch.get_num_threads()} threads")
    errors = check_agreement(args)
    print("agreement: fp64 outputs and all gradients equal to 1e-9 of their max; "
          "fp32 max |error vs fp64| / max |out|: " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    seconds = in_subprocess("time", ["module", "straightforward"], args, args.repeats)
    seconds |= in_subprocess("time", ["block"], args, args.block_repeats)
    peak = {case: in_subprocess("memory", [case], args) for case in CASES}
    print(f"\n{'case':<18}{'time (s)':>10}{'peak mem (MiB)':>16}")
    for case in CASES:
        print(f"{case:<18}{seconds[case]:>10.3f}{peak[case]:>16.0f}")
    time_ratio = seconds["module"] / seconds["straightforward"]
    memory_ratio = peak["module"] / peak["straightforward"]
    print(f"\nmodule / straightforward: time {time_ratio:.2f}x (target <= 0.80x), "
          f"memory {memory_ratio:.2f}x (target <= 1.00x)")


if __name__ == "__main__":
    main()

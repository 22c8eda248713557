"""Gengram against a per-position reference written straight from the formulas (outputs and
gradients), the hand-written backwards against finite differences, causality, bf16 at 32k tokens,
gate statistics, config errors, state-dict layout and init."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import GengramConfig
from model.gengram import Gengram, _CausalConv, _GateSums, _WindowBag
from model.vocab import EOD, GENGRAM_DIGIT, PAD, VOCAB_SIZE


def random_ids(B: int, S: int, generator: torch.Generator) -> torch.Tensor:
    """Mostly bases, with N, PAD, EOD and the spare id sprinkled in, and a run of one base so k-mers repeat."""
    ids = torch.randint(1, 6, (B, S), generator=generator)
    ids[torch.rand(B, S, generator=generator) < 0.08] = EOD
    ids[torch.rand(B, S, generator=generator) < 0.08] = PAD
    ids[torch.rand(B, S, generator=generator) < 0.02] = VOCAB_SIZE - 1
    ids[0, S // 3 : S // 3 + 9] = 1
    return ids


def reference(module: Gengram, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The residual, one position at a time, in float64 (differentiable: autograd gives its gradients)."""
    cfg = module.config
    ks, D, H, W = cfg.ngram_sizes, cfg.embed_dim_per_ngram, cfg.hidden_size, cfg.window_size
    table = module.memory.weight.double()
    B, S, _ = h.shape
    digits = [[GENGRAM_DIGIT[i] for i in row] for row in ids.tolist()]

    def code(b: int, j: int, k: int) -> int | None:
        ds = [digits[b][j - i] for i in range(k)] if j - k + 1 >= 0 else [-1]
        return None if min(ds) < 0 else sum(d * 5**i for i, d in enumerate(ds))

    m = torch.zeros(B, S, len(ks) * D, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            for n, k in enumerate(ks):
                ends = [t] if W is None else range(max(0, t - (W - k)), t + 1)
                codes = [c for j in ends if (c := code(b, j, k)) is not None]
                if cfg.pooling == "unique":
                    codes = sorted(set(codes))
                if codes:
                    offset = sum(5**j for j in ks[:n])
                    m[b, t, n * D : (n + 1) * D] = torch.stack([table[offset + c] for c in codes]).mean(0)
    key, value = m @ module.key_proj.weight.double().T, m @ module.value_proj.weight.double().T

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()

    q, k = rms_norm(h.double(), module.norm_q.weight), rms_norm(key, module.norm_k.weight)
    out = torch.zeros(B, S, H, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            g = q[b, t] @ k[b, t] / math.sqrt(H)
            g = torch.sign(g) * torch.sqrt(torch.clamp(g.abs(), min=1e-6))
            out[b, t] = value[b, t] / (1 + torch.exp(-g))
    if not cfg.short_conv:
        return out
    w = module.short_conv.weight.double()[:, 0]  # [H, kernel]
    conv = torch.zeros_like(out)
    for t in range(S):
        for i in range(cfg.conv_kernel):
            j = t - (cfg.conv_kernel - 1 - i) * cfg.dilation
            if j >= 0:
                conv[:, t] += w[:, i] * out[:, j]
    return out + F.silu(conv)


def make(seed: int = 0, **changes) -> Gengram:
    config = GengramConfig(hidden_size=16, embed_dim_per_ngram=4, ngram_sizes=(1, 2, 3), window_size=6)
    torch.manual_seed(seed)
    module = Gengram(dataclasses.replace(config, **changes))
    # Weights larger than the init so that every term of the output is visible in the comparison.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"pooling": "unique"},
        {"window_size": None},
        {"ngram_sizes": (2, 4), "window_size": 8, "pooling": "unique"},
        {"ngram_sizes": (2, 4), "window_size": 8, "short_conv": False},
        {"ngram_sizes": (1, 2, 3, 4, 5, 6), "window_size": 21},
        {"ngram_sizes": (1, 2, 3, 4, 5, 6), "window_size": 21, "pooling": "unique"},
        {"ngram_sizes": (3,), "window_size": 3, "conv_dilation": 2, "conv_kernel": 3},
        {"ngram_sizes": (1, 3), "window_size": None, "pooling": "unique", "conv_dilation": 1},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_matches_the_per_position_reference(changes):
    module = make(**changes).double()
    generator = torch.Generator().manual_seed(1)
    B, S = 2, 48
    ids = random_ids(B, S, generator)
    h = torch.randn(B, S, module.config.hidden_size, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(h, ids), reference(module, h, ids), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "changes",
    [{}, {"pooling": "unique", "ngram_sizes": (1, 2, 4), "window_size": 8, "conv_dilation": 2}],
    ids=["mean", "unique"],
)
def test_gradients_match_the_reference(changes):
    module = make(**changes).double()
    generator = torch.Generator().manual_seed(6)
    ids = random_ids(2, 24, generator)
    h = torch.randn(2, 24, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 24, 16, generator=generator, dtype=torch.float64)
    inputs = [h, *module.parameters()]
    got = torch.autograd.grad((module(h, ids) * weight).sum(), inputs)
    want = torch.autograd.grad((reference(module, h, ids) * weight).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("S", [1, 3, 7])
def test_sequences_shorter_than_the_window(S):
    module = make(ngram_sizes=(1, 2, 3), window_size=12, pooling="unique", conv_dilation=3).double()
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 6, (2, S), generator=generator)
    h = torch.randn(2, S, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    got = module(h, ids)
    want = reference(module, h, ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = [h, *module.parameters()]
    for g, w in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_is_causal():
    module = make(pooling="unique", ngram_sizes=(1, 2, 3, 4), window_size=10).double()
    generator = torch.Generator().manual_seed(2)
    ids = random_ids(1, 64, generator)
    h = torch.randn(1, 64, 16, generator=generator, dtype=torch.float64)
    t0 = 40
    ids2, h2 = ids.clone(), h.clone()
    ids2[0, t0:] = torch.randint(1, 6, (64 - t0,), generator=generator)
    h2[0, t0:] = torch.randn(64 - t0, 16, generator=generator, dtype=torch.float64)
    out, out2 = module(h, ids), module(h2, ids2)
    torch.testing.assert_close(out[:, :t0], out2[:, :t0], rtol=0, atol=0)
    assert not torch.equal(out[:, t0], out2[:, t0])


def test_bf16_error_does_not_grow_with_position():
    config = GengramConfig(hidden_size=64, embed_dim_per_ngram=8)
    torch.manual_seed(0)
    module = Gengram(config)
    S = 32768
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 6, (1, S), generator=generator)
    h = torch.randn(1, S, 64, generator=generator)
    with torch.no_grad():
        exact = module.double()(h.double(), ids)
        approx = module.bfloat16()(h.bfloat16(), ids).double()
    error = (approx - exact).abs()
    first, last = error[:, :1024].mean(), error[:, -1024:].mean()
    # A window mean from a bf16 prefix sum over the sequence fails this by a factor of about 40.
    assert last <= 2 * first, (float(first), float(last))
    assert first < 0.05 * exact.abs().mean()


def test_bf16_gradients():
    module = make(ngram_sizes=(1, 2, 3), window_size=8)
    generator = torch.Generator().manual_seed(7)
    ids = random_ids(2, 256, generator)
    h = torch.randn(2, 256, 16, generator=generator, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float64, torch.bfloat16):
        module.zero_grad()
        module.to(dtype)(h.to(dtype), ids).float().square().sum().backward()
        grads[dtype] = {name: p.grad for name, p in module.named_parameters()}
    for name, exact in grads[torch.float64].items():
        approx = grads[torch.bfloat16][name]
        assert approx.dtype == torch.bfloat16 and approx.isfinite().all(), name
        # Gradients behind the gate's signed square root (key_proj, the norms) are ill-conditioned
        # in bf16 for any formulation: autograd through the formulas as written errs by ~20% too.
        if name in ("memory.weight", "value_proj.weight", "short_conv.weight"):
            assert (approx.double() - exact).norm() < 0.05 * exact.norm(), name


def test_accepts_uint8_ids():
    module = make()
    ids = random_ids(1, 32, torch.Generator().manual_seed(8))
    h = torch.randn(1, 32, 16)
    torch.testing.assert_close(module(h, ids.to(torch.uint8)), module(h, ids), rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    module = make(ngram_sizes=(1, 2, 3, 4), window_size=8)
    generator = torch.Generator().manual_seed(4)
    ids = random_ids(2, 32, generator)
    h = torch.randn(2, 32, 16, generator=generator, requires_grad=True)
    module(h, ids).square().sum().backward()
    for name, p in [*module.named_parameters(), ("hidden_states", h)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hand_written_backwards_match_finite_differences():
    generator = torch.Generator().manual_seed(5)
    table = torch.randn(7, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, 7, (2, 9, 3), generator=generator)
    weight = torch.rand(2, 9, 3, 5, generator=generator, dtype=torch.float64)
    weight *= torch.arange(5) <= torch.arange(9)[:, None, None]  # no taps before the start
    assert torch.autograd.gradcheck(_WindowBag.apply, (table, rows, weight))
    h, key = torch.randn(2, 2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GateSums.apply, (h, key, w))
    x = torch.randn(2, 11, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CausalConv.apply, (x, w, 2))
    assert torch.autograd.gradcheck(_CausalConv.apply, (x, w, 5))  # a tap reaching past the start


def test_gate_stats_cover_real_tokens_only():
    module = make()
    ids = torch.tensor([[1, 2, 3, 4, PAD, PAD]])
    module(torch.randn(1, 6, 16), ids)
    gate = module.last_gate
    assert gate.shape == (1, 6) and not gate.requires_grad
    stats = module.gate_stats()
    torch.testing.assert_close(stats["gate_mean"], gate[0, :4].mean())
    torch.testing.assert_close(stats["gate_open_fraction"], (gate[0, :4] > 0.5).float().mean())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ngram_sizes": (1, 2, 6), "window_size": 5}, "smaller than the largest n-gram"),
        ({"pooling": "max"}, "pooling"),
    ],
)
def test_bad_config_raises_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        Gengram(GengramConfig(**changes))


def test_state_dict_names_and_shapes():
    config = GengramConfig(hidden_size=32, embed_dim_per_ngram=8, ngram_sizes=(1, 2, 3), conv_kernel=4)
    shapes = {name: tuple(t.shape) for name, t in Gengram(config).state_dict().items()}
    assert shapes == {
        "memory.weight": (5 + 25 + 125, 8),
        "key_proj.weight": (32, 24),
        "value_proj.weight": (32, 24),
        "norm_q.weight": (32,),
        "norm_k.weight": (32,),
        "short_conv.weight": (32, 1, 4),
    }
    no_conv = Gengram(dataclasses.replace(config, short_conv=False)).state_dict()
    assert not any(name.startswith("short_conv") for name in no_conv)


def test_init():
    """PyTorch's defaults, as the authors' fork keeps them; or N(0, init_std) on request."""
    module = Gengram(GengramConfig(hidden_size=256, embed_dim_per_ngram=64))
    fan_in = 6 * 64
    assert abs(module.memory.weight.std().item() - 1.0) < 0.01
    for p in (module.key_proj.weight, module.value_proj.weight):
        assert abs(p.std().item() * math.sqrt(3 * fan_in) - 1) < 0.02  # U(+-1/sqrt(fan_in))
    assert torch.equal(module.norm_q.weight, torch.ones(256))
    module.reset_parameters(init_std=0.02)
    for p in (module.memory.weight, module.key_proj.weight, module.value_proj.weight):
        assert abs(p.std().item() - 0.02) < 0.002

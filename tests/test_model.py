"""GengramLM: losses, causality, config errors and parameter counts (CPU, single process)."""

import dataclasses

import pytest
import torch

from model import GengramLM, ModelConfig, flavour, parameter_counts
from model.config import GengramConfig
from model.transformer import Block
from model.vocab import EOD, PAD, VOCAB_SIZE, N


def tiny(**changes) -> ModelConfig:
    return flavour("debug", hidden_size=64, num_layers=3, num_heads=4, num_query_groups=2,
                   moe_ffn_hidden_size=64, ffn_hidden_size=64, gengram_layers=(1, 3), **changes)


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, EOD + 1, (batch, seq), generator=generator)


def test_forward_returns_logits_and_loss_parts():
    torch.manual_seed(0)
    config = tiny()
    out = GengramLM(config)(random_ids(2, 64))
    assert out.logits.shape == (2, 64, VOCAB_SIZE)
    for part in (out.loss, out.lm_loss, out.aux_loss, out.z_loss):
        assert part.ndim == 0 and torch.isfinite(part)
    expected = out.lm_loss + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    # Every layer of the debug flavour is MoE; counts are top-2 assignments of all 128 tokens.
    assert sorted(out.expert_counts) == sorted(out.aux_loss_by_layer) == sorted(out.z_loss_by_layer) == [1, 2, 3]
    assert all(int(counts.sum()) == 2 * 2 * 64 for counts in out.expert_counts.values())
    torch.testing.assert_close(out.aux_loss, sum(out.aux_loss_by_layer.values()))  # a sum over layers
    assert out.dropped_fraction == {}  # dropless
    assert sorted(out.gate_stats) == [1, 3]
    for stats in out.gate_stats.values():
        assert 0.0 <= float(stats["gate_mean"]) <= 1.0
        assert 0.0 <= float(stats["gate_open_fraction"]) <= 1.0


def test_aux_and_z_losses_reach_the_router():
    torch.manual_seed(0)
    model = GengramLM(tiny())
    out = model(random_ids(2, 32))
    (out.aux_loss + out.z_loss).backward()
    router = model.layers[0].ffn.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_gradients_reach_gengram_and_only_configured_layers_hold_it():
    torch.manual_seed(0)
    model = GengramLM(tiny())
    model(random_ids(2, 48)).loss.backward()
    names = {name for name, _ in model.named_parameters() if ".gengram." in name}
    assert {name.split(".")[1] for name in names} == {"0", "2"}  # layer ids 1 and 3
    for name, param in model.named_parameters():
        if ".gengram." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gengram_layers_share_the_token_windows_the_model_computes_once(monkeypatch):
    """GengramLM hands every Gengram layer the k-mer rows and window weights it computed once;
    each layer computing its own from the tokens gives the same residuals, gradients included."""
    torch.manual_seed(0)
    model = GengramLM(tiny(gengram=GengramConfig(window_size=12, ngram_sizes=(1, 2, 3), pooling="unique")))
    ids = random_ids(2, 40)
    ids[0, 5:9] = N
    hidden = torch.randn(2, 40, 64, requires_grad=True)
    first, last = model.layers[0].gengram, model.layers[2].gengram
    shared = first.windows(ids)
    for gengram in (first, last):
        torch.testing.assert_close(gengram(hidden, ids, shared), gengram(hidden, ids), rtol=0, atol=0)
    model(ids).loss.backward()
    with_shared = {name: p.grad.clone() for name, p in model.named_parameters() if ".gengram." in name}
    model.zero_grad()
    block_forward = Block.forward  # the same model, each layer computing its own windows
    monkeypatch.setattr(Block, "forward", lambda self, x, ids, cos, sin, windows: block_forward(self, x, ids, cos, sin))
    model(ids).loss.backward()
    for name, grad in with_shared.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=0, atol=0)


def test_all_ignored_targets_give_zero_loss_with_a_graph():
    torch.manual_seed(0)
    model = GengramLM(tiny(ignore_n_targets=True, ignore_eod_targets=True))
    ids = torch.tensor([[PAD, N, EOD, PAD, N, N, EOD, PAD]])
    out = model(ids)
    assert out.lm_loss.item() == 0.0
    out.lm_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    ids = random_ids(1, 40)
    ids[0, 20:] = PAD
    model = GengramLM(tiny())
    with torch.no_grad():
        padded = model(ids).lm_loss
        prefix = model.lm_loss(model(ids[:, :21]).logits, ids[:, :21])
    torch.testing.assert_close(padded, prefix)


def test_model_is_causal():
    torch.manual_seed(0)
    # Token dropping makes a token's expert capacity depend on later tokens; turn it off here.
    model = GengramLM(tiny(drop_tokens=False)).eval()
    ids = random_ids(1, 96)
    changed = ids.clone()
    t0 = 50
    changed[0, t0] = (ids[0, t0] % 5) + 1
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :t0], after[:, :t0], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, t0:], after[:, t0:])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"gengram": {"window_size": 4}}, "window_size=4"),
        ({"gengram": {"pooling": "max"}}, "pooling"),
        ({"gengram_layers": (0, 2)}, "gengram_layers"),
        ({"gengram_layers": (5,)}, "gengram_layers"),
        ({"num_heads": 3}, "num_heads"),
        ({"ep_size": 3}, "ep_size"),
        ({"init_scheme": "xavier"}, "init_scheme"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_config_errors_are_raised_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        flavour("debug", **changes)


def test_gengram_config_rejects_window_below_largest_ngram():
    with pytest.raises(ValueError, match="smaller than the largest n-gram size 6"):
        GengramConfig(window_size=5)


def test_parameter_counts_of_the_paper_models():
    big = parameter_counts(flavour("gengram-10b"))
    twin = parameter_counts(flavour("baseline-10b"))
    assert 9.5e9 <= big["total"] <= 10.8e9
    assert 2.8e9 <= big["activated"] <= 3.3e9
    assert big["gengram"] > 0 and twin["gengram"] == 0
    assert big["total"] - twin["total"] == big["gengram"]
    ablation = parameter_counts(flavour("baseline-moe-1.2b"))
    assert 1.1e9 <= ablation["total"] <= 1.3e9
    assert 0.25e9 <= ablation["activated"] <= 0.4e9


def test_flavour_overrides_keep_gengram_width_in_sync():
    config = flavour("debug", hidden_size=256, num_heads=8, num_query_groups=4)
    assert config.gengram.hidden_size == 256
    assert dataclasses.replace(config, gengram=None).has_gengram is False
    with pytest.raises(ValueError, match="unknown model flavour"):
        flavour("gpt-5")


def test_keep_hidden_exposes_the_residual_stream_and_gengram_writes_without_changing_logits():
    torch.manual_seed(0)
    model = GengramLM(flavour("debug")).eval()
    ids = torch.randint(1, 6, (2, 48))
    captured = {}
    hooks = [
        layer.gengram.register_forward_hook(lambda module, args, out, i=layer.layer_id: captured.update({i: out}))
        for layer in model.layers
        if layer.gengram is not None
    ]
    with torch.no_grad():
        plain = model(ids, compute_loss=False)
        traced = model(ids, compute_loss=False, keep_hidden=True)
    for hook in hooks:
        hook.remove()
    assert torch.equal(plain.logits, traced.logits)
    assert len(traced.hidden_states) == model.config.num_layers + 1
    assert torch.equal(traced.hidden_states[0], model.embed(ids))
    assert torch.equal(model.readout(traced.hidden_states[-1]), traced.logits)
    assert sorted(traced.gengram_writes) == sorted(model.config.gengram_layers) == sorted(captured)
    for layer_id, write in traced.gengram_writes.items():
        assert torch.equal(write, captured[layer_id])
        assert traced.gengram_gates[layer_id].shape == ids.shape
    assert plain.hidden_states == [] and plain.gengram_writes == {}

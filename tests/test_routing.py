"""MoE routing: dropless by default, so the LM is causal and a sequence's logits do not depend on its
batch; capacity dropping (an explicit option) breaks both, and the model reports how much it drops.
The router losses are the released Megatron run's. CPU, single process (DeepSpeed MoE with ep_size 1)."""

import pytest
import torch

from model import FLAVOURS, GengramLM, ModelConfig, flavour
from model.transformer import MoEFeedForward

DROPPING = {"drop_tokens": True, "capacity_factor": 1.0, "eval_capacity_factor": 1.0}


def small(name: str, **changes) -> ModelConfig:
    """The flavour's routing (experts, top-k, capacity settings, sampling) at a small width. Weights
    5x the default init, so that a changed route moves the logits far above the tolerances here."""
    base = flavour(name)
    gengram = {"gengram_layers": (1,), "gengram": {"embed_dim_per_ngram": 4}} if base.has_gengram else {}
    return base.replace(hidden_size=32, num_layers=2, num_heads=2, num_query_groups=1, ffn_hidden_size=32,
                        moe_ffn_hidden_size=32, init_std=0.05, **gengram, **changes)


def router_inputs(model: GengramLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each MoE layer's router reads in a forward over ids, as [tokens, hidden]."""
    seen = []
    ffns = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    hooks = [ffn.register_forward_pre_hook(lambda _, args: seen.append(args[0].flatten(0, -2))) for ffn in ffns]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


def tilted(config: ModelConfig, ids: torch.Tensor) -> GengramLM:
    """A model whose routers favour expert 0: its logit is raised, on average over the tokens, by one
    standard deviation of the router logits (row 0 gains the mean router input, scaled). Enough to make
    expert 0 overflow at capacity factor 1, not so much that every token's choice stops depending on it."""
    torch.manual_seed(0)
    model = GengramLM(config)
    ffns = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    with torch.no_grad():
        for ffn, x in zip(ffns, router_inputs(model, ids), strict=True):
            mean = x.mean(0)
            spread = (x @ ffn.router.weight.T).std()
            ffn.router.weight[0] += spread * mean / mean.square().sum()
    return model


def random_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 5, (batch, seq), generator=torch.Generator().manual_seed(seed))


def leaks(config: ModelConfig, train: bool) -> tuple[float, float]:
    """(max change of the logits before position j when tokens from j on change, in every row of a
    batch of 4; max difference of a sequence's logits alone and as row 2 of that batch)."""
    ids = random_ids(4, 64, seed=1)
    model = tilted(config, ids).train(train)
    j = 32
    changed = ids.clone()
    changed[:, j:] = random_ids(4, 64 - j, seed=2)
    with torch.no_grad():
        logits = model(ids).logits
        prefix = (model(changed).logits[:, :j] - logits[:, :j]).abs().max()
        alone = (model(ids[2:3]).logits[0] - logits[2]).abs().max()
    return float(prefix), float(alone)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_every_flavour_routes_causally_and_independently_of_the_batch(name, train):
    config = small(name)
    assert not config.drops_tokens and not config.moe_second_expert_sampling
    prefix, alone = leaks(config, train)
    assert prefix == 0.0  # bit-identical
    assert alone <= 1e-5
    # The same test sees the leak once the same routers drop tokens at capacity factor 1.
    prefix, alone = leaks(small(name, **DROPPING), train)
    assert prefix > 1e-3 and alone > 1e-3, (prefix, alone)


def test_flavours_route_dropless_without_sampling():
    for name, config in FLAVOURS.items():
        assert config.is_moe and not config.drops_tokens and not config.moe_second_expert_sampling, name
    dropping = flavour("moe-1.2b", **DROPPING)
    assert dropping.drops_tokens and not dropping.dropless().drops_tokens
    assert dropping.dropless() == flavour("moe-1.2b")
    assert not flavour("debug", num_experts=1, drop_tokens=True).drops_tokens  # dense: nothing to drop


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dropped_fraction_counts_the_routes_the_gate_drops(train):
    """LMOutput.dropped_fraction against the gate's own verdict, route by route (its sparse routes
    flag a dropped one with expert -1), with train and eval capacity factors that differ."""
    config = small("moe-1.2b", drop_tokens=True, capacity_factor=1.0, eval_capacity_factor=1.25)
    ids = random_ids(4, 64, seed=1)
    model = tilted(config, ids).train(train)
    with torch.no_grad():
        out = model(ids)
        inputs = router_inputs(model, ids)
        ffns = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        for layer_id, ffn, x in zip((1, 2), ffns, inputs, strict=True):
            routes = ffn.gate(x, None, True)[3]  # [k, tokens]: each route's expert, -1 where dropped
            expected = (routes < 0).double().mean()
            assert 0.05 < expected < 0.6
            torch.testing.assert_close(out.dropped_fraction[layer_id].double(), expected, rtol=0, atol=1e-12)
    assert not out.dropped_fraction[1].requires_grad
    assert GengramLM(config.dropless())(ids).dropped_fraction == {}


def megatron_aux_loss(x: torch.Tensor, router: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch load balancing as Megatron documents it: E * sum_i f_i * P_i, f_i the share of the T * k
    routes that go to expert i, P_i the mean over tokens of the softmax probability of expert i."""
    probs = torch.softmax(x.double() @ router.double().T, dim=-1)
    T, E = probs.shape
    chosen = probs.topk(top_k, dim=-1).indices
    f = torch.stack([(chosen == i).sum() for i in range(E)]).double() / (T * top_k)
    P = probs.mean(0)
    return E * (f * P).sum()


def test_aux_loss_is_megatrons_and_losses_sum_over_layers():
    config = small("debug")
    ids = random_ids(2, 48, seed=3)
    model = tilted(config, ids)
    out = model(ids)
    ffns = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer_id, ffn, x in zip((1, 2), ffns, router_inputs(model, ids), strict=True):
        expected = megatron_aux_loss(x, ffn.router.weight, config.moe_top_k)
        torch.testing.assert_close(out.aux_loss_by_layer[layer_id].double(), expected, rtol=1e-5, atol=0)
        # Tilted routing is unbalanced: the balanced value would be 1.
        assert expected > 1.05
        z = torch.logsumexp(x @ ffn.router.weight.T, dim=-1).square().mean()
        torch.testing.assert_close(out.z_loss_by_layer[layer_id], z)
    torch.testing.assert_close(out.aux_loss, sum(out.aux_loss_by_layer.values()))
    torch.testing.assert_close(out.z_loss, sum(out.z_loss_by_layer.values()))
    expected = out.lm_loss + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected)


"""The pure parts of the pretraining worker, without Ray or DeepSpeed engines: metric accumulation,
expert renaming between the global and a rank's layout, and the exported model's files."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.pretrain.metrics import MetricAccumulator
from jobs.pretrain.weights import experts_held, global_experts, load_model, local_experts
from model import GengramLM, exported, flavour


def tiny(**changes):
    return flavour("debug", hidden_size=32, num_layers=2, num_heads=4, num_query_groups=2, moe_ffn_hidden_size=32,
                   ffn_hidden_size=32, gengram_layers=(2,), **changes)


def ids(batch: int = 2, seq: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 5, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_metrics_average_loss_parts_and_share_expert_load():
    torch.manual_seed(0)
    model = GengramLM(tiny())
    window = MetricAccumulator()
    outputs = [model(ids(seed=seed)) for seed in (1, 2)]
    for out in outputs:
        window.add(out, tokens=128, seconds=0.5, data_seconds=0.05)
    metrics = window.reduce(world=1)
    for name in ("loss", "lm_loss", "aux_loss", "z_loss"):
        assert metrics[name] == pytest.approx(sum(float(getattr(out, name).detach()) for out in outputs) / 2)
    assert metrics["tokens_per_s"] == pytest.approx(256 / 1.0)
    assert metrics["data_wait_fraction"] == pytest.approx(0.1)
    for layer in outputs[0].expert_counts:
        counts = sum(out.expert_counts[layer].float() for out in outputs)
        shares = [metrics[f"moe/layer{layer}/expert{e}_share"] for e in range(len(counts))]
        assert shares == pytest.approx((counts / counts.sum()).tolist())
        assert metrics[f"moe/layer{layer}/cv"] == pytest.approx((counts.std(unbiased=False) / counts.mean()).item())
    assert "gengram/layer2/gate_mean" in metrics
    assert window.micro_batches == 0 and not window.sums  # reset for the next interval


def test_expert_renaming_round_trips_over_expert_parallel_ranks():
    config = tiny(num_experts=4, ep_size=2)
    state = GengramLM(config.replace(ep_size=1)).state_dict()
    assert list(experts_held(config, 0)) == [0, 1] and list(experts_held(config, 1)) == [2, 3]
    merged: dict[str, torch.Tensor] = {}
    for rank in range(4):  # two expert-parallel groups of two ranks
        local = local_experts(state, config, rank)
        assert {name.split(".deepspeed_experts.")[1].split(".")[0] for name in local if ".deepspeed_experts." in name} \
            == {"0", "1"}
        shared, experts = global_experts(local, config, ep_rank=rank % 2)
        merged.update(shared)
        merged.update(experts)
    assert merged.keys() == state.keys()
    for name, tensor in state.items():
        assert merged[name] is tensor


def test_export_round_trip_reproduces_the_logits_and_is_dropless(tmp_path):
    torch.manual_seed(0)
    config = tiny(drop_tokens=True, capacity_factor=1.0)
    model = GengramLM(config).eval()
    batch = ids()
    with torch.no_grad():
        logits = model(batch, compute_loss=False).logits
    exported.write(tmp_path, model.state_dict(), config, {"input_ids": batch, "logits": logits})
    written = json.loads((tmp_path / exported.CONFIG).read_text())
    assert written["drop_tokens"] is False and written["ep_size"] == 1

    loaded = load_model(str(tmp_path))
    assert not loaded.training and not loaded.config.drops_tokens
    dropless = GengramLM(config.dropless()).eval()
    dropless.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch, compute_loss=False).logits, dropless(batch, compute_loss=False).logits,
                                   rtol=0, atol=0)
    # An export written by an older version (dropping recorded in its config) is read dropless too.
    (tmp_path / exported.CONFIG).write_text(json.dumps(config.to_dict()))
    assert not load_model(str(tmp_path)).config.drops_tokens


def test_dropless_routing_switches_a_dropping_model_for_the_block():
    torch.manual_seed(0)
    config = tiny(drop_tokens=True, capacity_factor=0.5, eval_capacity_factor=0.5)
    dropping = GengramLM(config).eval()
    dropless = GengramLM(config.dropless()).eval()
    dropless.load_state_dict(dropping.state_dict())
    batch = ids(batch=4, seq=128)
    with torch.no_grad():
        out = dropping(batch)
        assert out.dropped_fraction and all(float(f) > 0 for f in out.dropped_fraction.values())
        with dropping.dropless_routing():
            inside = dropping(batch)
        after = dropping(batch)
        reference = dropless(batch)
    assert not inside.dropped_fraction
    torch.testing.assert_close(inside.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.logits, out.logits, rtol=0, atol=0)  # dropping again after the block

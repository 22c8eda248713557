"""Initialisation: every parameter group's measured spread against its scheme's formula."""

import math

import pytest
import torch

from model import GengramLM, flavour

L = 4


def expected_std(name: str, param: torch.Tensor, scheme: str, std: float) -> float:
    """The std the scheme gives this parameter; norm weights (exactly 1) are checked apart."""
    megatron = scheme == "megatron"
    if ".gengram." in name:
        if name.endswith("short_conv.weight"):  # nn.Conv1d's default, depthwise: U(+-1/sqrt(kernel))
            return 1 / math.sqrt(3 * param.shape[-1])
        if not megatron:
            return std
        if name.endswith("memory.weight"):  # nn.Embedding's default
            return 1.0
        return 1 / math.sqrt(3 * param.shape[1])  # nn.Linear's default: U(+-1/sqrt(fan_in))
    if megatron and name.endswith(("o_proj.weight", "down_proj.weight")):
        return std / math.sqrt(2 * L)
    return std  # embedding, q/k/v, gate/up of FFNs and experts, router, LM head


@pytest.mark.parametrize("scheme", ["megatron", "flat"])
def test_each_parameter_group_has_its_schemes_std(scheme):
    std = 0.02
    config = flavour("debug", hidden_size=256, num_layers=L, num_heads=4, num_query_groups=2, ffn_hidden_size=512,
                     moe_ffn_hidden_size=512, num_experts=8, moe_layers=(1, 3), gengram_layers=(2, 3),
                     gengram={"embed_dim_per_ngram": 32}, init_std=std, init_scheme=scheme)
    torch.manual_seed(0)
    model = GengramLM(config)
    groups: dict[tuple[str, float], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or ".norm_" in name:
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        # Group by role (the name without layer and expert indices) and expected std.
        role = ".".join(part for part in name.split(".") if not part.isdigit())
        groups.setdefault((role, expected_std(name, param, scheme, std)), []).append(param.detach().flatten())
    roles = {role for role, _ in groups}
    assert {"embed.weight", "lm_head.weight", "layers.attn.o_proj.weight", "layers.ffn.down_proj.weight",
            "layers.ffn.moe.deepspeed_moe.gate.wg.weight", "layers.gengram.memory.weight"} <= roles
    assert any("deepspeed_experts.down_proj" in role for role in roles)
    for (role, want), params in groups.items():
        got = torch.cat(params).std().item()
        assert abs(got / want - 1) < 0.05, (role, got, want)


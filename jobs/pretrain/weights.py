"""A training run's weights in and out: expert renaming between the global layout of an exported
model and the experts one rank holds, the consolidated fp32 model on rank 0, its export, and
loading an exported model from any storage (model.exported defines the files).

Expert parallelism: with ep_size E, each rank holds num_experts / E experts under local indices
0..n-1; DeepSpeed puts consecutive ranks in one expert-parallel group, so rank r holds the global
experts [(r % E) * n, (r % E + 1) * n).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jobs.common.storage import join, open_url
from model import GengramLM, ModelConfig, exported

EXPERT_MARKER = ".deepspeed_experts."


def expert_index(name: str) -> tuple[str, int, str] | None:
    """'layers.0.ffn...deepspeed_experts.3.up_proj.weight' -> (prefix, 3, 'up_proj.weight')."""
    if EXPERT_MARKER not in name:
        return None
    head, tail = name.split(EXPERT_MARKER)
    index, rest = tail.split(".", 1)
    return head, int(index), rest


def experts_held(model_config: ModelConfig, ep_rank: int) -> range:
    """Global indices of the experts a rank of expert-parallel rank `ep_rank` holds."""
    if not model_config.is_moe:
        return range(0)
    per_rank = model_config.num_experts // model_config.ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def local_experts(state: Mapping[str, torch.Tensor], model_config: ModelConfig, rank: int) -> dict[str, torch.Tensor]:
    """A global state dict cut to the experts world rank `rank` holds, under local indices."""
    held = experts_held(model_config, rank % model_config.ep_size if model_config.is_moe else 0)
    local = {}
    for name, tensor in state.items():
        parsed = expert_index(name)
        if parsed is None:
            local[name] = tensor
        elif parsed[1] in held:
            head, index, rest = parsed
            local[f"{head}{EXPERT_MARKER}{index - held.start}.{rest}"] = tensor
    return local


def global_experts(state: Mapping[str, torch.Tensor], model_config: ModelConfig,
                   ep_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared parameters, experts under global indices) of one rank's state dict."""
    first = experts_held(model_config, ep_rank).start
    shared, experts = {}, {}
    for name, tensor in state.items():
        parsed = expert_index(name)
        if parsed is None:
            shared[name] = tensor
        else:
            head, index, rest = parsed
            experts[f"{head}{EXPERT_MARKER}{first + index}.{rest}"] = tensor
    return shared, experts


def consolidated_state_dict(engine, model_config: ModelConfig, rank: int, world: int) -> dict[str, torch.Tensor] | None:
    """The full fp32 model on rank 0 (None elsewhere), whatever ZeRO stage and expert split.

    DeepSpeed's `safe_get_full_fp32_param` returns the fp32 master weight however the optimizer
    partitions it (a collective: every rank calls it for every parameter); each rank's experts
    are renamed to global indices and gathered to rank 0.
    """
    from deepspeed.utils import groups, safe_get_full_fp32_param

    ep_size = model_config.ep_size if model_config.is_moe else 1
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep_size}") if ep_size > 1 else 0
    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param.data).detach().float().cpu().clone()
    shared, experts = global_experts(state, model_config, ep_rank)
    gathered: list[dict[str, torch.Tensor]] | None = [{} for _ in range(world)] if rank == 0 else None
    if world > 1:
        dist.gather_object(experts, gathered, dst=0)
    elif gathered is not None:
        gathered[0] = experts
    if rank != 0:
        return None
    for part in gathered:
        shared.update(part)
    return shared


def export_final_model(engine, model_config: ModelConfig, reference_ids: torch.Tensor, directory: Path,
                       rank: int, world: int) -> None:
    """Rank 0 writes the exported model (model.exported), with a reference batch and the engine's
    own logits on it, so that anyone can verify that a load reproduces the trained model."""
    state = consolidated_state_dict(engine, model_config, rank, world)
    engine.eval()
    with torch.no_grad(), engine.module.dropless_routing():  # the export is dropless (model.exported)
        logits = engine(reference_ids.to(engine.device), compute_loss=False).logits.float().cpu()
    engine.train()
    if rank == 0:
        exported.write(directory, state, model_config, {"input_ids": reference_ids.cpu(), "logits": logits})


def opener(model_dir: str, storage_options: Mapping[str, Any] | None = None) -> exported.OpenFile:
    """model.exported's open_file for an exported model at a local path or any fsspec URL."""
    return lambda name, mode: open_url(join(model_dir, name), mode, storage_options)


def load_state_dict(model_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    return exported.read_state_dict(opener(model_dir, storage_options))


def load_model(model_dir: str, storage_options: Mapping[str, Any] | None = None) -> GengramLM:
    return exported.load(opener(model_dir, storage_options))

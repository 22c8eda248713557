"""Frozen-model inference through Ray Data: embeddings of sequences, and log-likelihoods of variant windows.

`map_batches` with a callable class (`FrozenModel`): each actor of the pool builds the model once, in eval
mode with dropless routing, so a sequence's vector is the same alone, in any batch and on any actor.
Rows are sorted by length before batching (less padding); padding goes on the right with PAD, which a causal
model never attends to from a real position, and pooling reads only real positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
import torch.nn.functional as F

from model import GengramLM, ModelConfig
from model.vocab import COMPLEMENT, PAD, encode


@dataclass(frozen=True)
class EmbeddingRequest:
    """What every actor needs besides its model: which layers, how to pool, how to score variants."""

    layers: tuple[int, ...]  # 1..L; L is read after the final norm
    pooling: str
    reverse_complement: bool
    batch_size: int
    reduction: str = "sum"  # log-likelihood of a variant window: sum or mean over its predicted tokens


def layer_column(layer: int) -> str:
    return f"layer_{layer}"


def pool(hidden: torch.Tensor, real: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, S, H] -> [B, H] over each row's real (non-PAD) positions, which start at 0."""
    lengths = real.sum(1)
    rows = torch.arange(hidden.shape[0])
    if pooling == "mean":
        return (hidden * real[..., None]).sum(1) / lengths[:, None]
    if pooling == "max":
        return hidden.masked_fill(~real[..., None], float("-inf")).max(1).values
    if pooling == "last":
        return hidden[rows, lengths - 1]
    return hidden[rows, (lengths - 1) // 2]  # center


def padded(token_rows: list[np.ndarray]) -> torch.Tensor:
    width = max(len(row) for row in token_rows)
    batch = np.full((len(token_rows), width), PAD, dtype=np.int64)
    for i, row in enumerate(token_rows):
        batch[i, : len(row)] = row
    return torch.from_numpy(batch)


class FrozenModel:
    """A Ray Data callable class: batches of `sequence` -> pooled vectors per layer, or batches of
    `ref_sequence`/`alt_sequence` -> their log-likelihoods (and embeddings)."""

    def __init__(self, model_config: dict, weights: list, seed: int, request: EmbeddingRequest):
        config = ModelConfig.from_dict(model_config).dropless()
        torch.manual_seed(seed)  # random_init: the seed alone decides the weights
        self.model = GengramLM(config)
        if weights:  # the state dict, put in the object store once by the driver and shared by every actor
            self.model.load_state_dict(ray.get(weights[0]))
        self.model.eval().requires_grad_(False)
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.model.to(self.device)
        self.request = request
        self.context = config.max_seq_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "ref_sequence" in batch:
            return self.score_variants(batch)
        return {"id": batch["id"], "label": batch["label"], **self.embed(list(batch["sequence"]))}

    def forward(self, ids: torch.Tensor):
        with self.model.dropless_routing():
            return self.model(ids.to(self.device), compute_loss=False, keep_hidden=True)

    def embed(self, sequences: list[str]) -> dict[str, np.ndarray]:
        token_rows = [encode(s) for s in sequences]
        if self.request.reverse_complement:
            rc_rows = [COMPLEMENT[row[::-1]] for row in token_rows]
            forward, reverse = self.embed_tokens(token_rows), self.embed_tokens(rc_rows)
            return {key: (forward[key] + reverse[key]) / 2 for key in forward}
        return self.embed_tokens(token_rows)

    def embed_tokens(self, token_rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        # A row past the context is cut into context-length windows whose pooled vectors are averaged,
        # weighted by length (the driver has refused such rows unless embedding.long is `window`).
        pieces, owner, weight = [], [], []
        for i, row in enumerate(token_rows):
            for start in range(0, len(row), self.context):
                pieces.append(row[start : start + self.context])
                owner.append(i)
                weight.append(len(pieces[-1]))
        out = {layer_column(layer): [] for layer in self.request.layers}
        for start in range(0, len(pieces), self.request.batch_size):
            ids = padded(pieces[start : start + self.request.batch_size])
            real = (ids != PAD).to(self.device)
            hidden = self.forward(ids).hidden_states
            for layer in self.request.layers:
                h = self.model.norm(hidden[layer]) if layer == len(hidden) - 1 else hidden[layer]
                out[layer_column(layer)].append(pool(h.float(), real, self.request.pooling).cpu().numpy())
        owner_index, weights = np.asarray(owner), np.asarray(weight, dtype=np.float64)
        totals = np.bincount(owner_index, weights, minlength=len(token_rows))
        combined = {}
        for key, parts in out.items():
            vectors = np.concatenate(parts)
            if len(pieces) == len(token_rows):
                combined[key] = vectors.astype(np.float32)
                continue
            summed = np.zeros((len(token_rows), vectors.shape[1]))
            np.add.at(summed, owner_index, vectors * weights[:, None])
            combined[key] = (summed / totals[:, None]).astype(np.float32)
        return combined

    def log_likelihood(self, token_rows: list[np.ndarray]) -> np.ndarray:
        """Sum (or mean) over each window of log p(x_t | x_<t), t = 1 .. len - 1."""
        ids = padded(token_rows)
        with self.model.dropless_routing():
            logits = self.model(ids.to(self.device), compute_loss=False).logits.float()
        targets = ids[:, 1:].to(self.device)
        per_token = -F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        real = (targets != PAD).float()
        total = (per_token * real).sum(1)
        if self.request.reduction == "mean":
            total = total / real.sum(1).clamp(min=1)
        return total.cpu().numpy()

    def score_variants(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = [encode(s) for s in batch["ref_sequence"]]
        alt = [encode(s) for s in batch["alt_sequence"]]
        ref_ll, alt_ll = self.log_likelihood(ref), self.log_likelihood(alt)
        out = {"id": batch["id"], "label": batch["label"], "ref_ll": ref_ll, "alt_ll": alt_ll, "score": alt_ll - ref_ll}
        ref_vectors, alt_vectors = self.embed_tokens(ref), self.embed_tokens(alt)
        for key in ref_vectors:
            out[key] = np.concatenate([ref_vectors[key], alt_vectors[key]], axis=1)
        return out


def run_inference(
    rows: pa.Table,
    model_config: ModelConfig,
    weights: ray.ObjectRef | None,
    seed: int,
    request: EmbeddingRequest,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
) -> dict[str, np.ndarray]:
    """`rows` (id, label, and sequence or ref_sequence/alt_sequence) through a pool of `actors`; the
    outputs as columns in the order of `rows`."""
    length_column = "sequence" if "sequence" in rows.column_names else "ref_sequence"
    ordered = rows.take(np.argsort(pa.compute.utf8_length(rows[length_column]).to_numpy(), kind="stable"))
    # Blocks are what the pool hands out: one table would be one block for one actor. Four per actor keep
    # them all busy to the end; each a whole number of batches.
    per_block = -(-ordered.num_rows // (4 * actors))
    per_block = -(-per_block // request.batch_size) * request.batch_size
    blocks = [ordered.slice(start, per_block) for start in range(0, ordered.num_rows, per_block)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        FrozenModel,
        fn_constructor_kwargs={
            "model_config": model_config.to_dict(),
            "weights": [weights] if weights is not None else [],
            "seed": seed,
            "request": request,
        },
        batch_size=request.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    outputs = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    position = {identifier: i for i, identifier in enumerate(rows["id"].to_pylist())}
    back = np.argsort([position[identifier] for identifier in outputs["id"]])
    return {key: values[back] for key, values in outputs.items()}

"""jobs.convert against real Megatron code.

megatron-core (a test-only dependency) builds a tiny MoE GPTModel on CPU, fp32, local layer spec, and runs
it; Gengram, which megatron-core lacks, is added to its layers by forward hooks that compute the fork's
Gengram from the fork's tensor names (`fork_gengram` below, written from the fork's published math: one
table per k, windowed mean of the valid k-mers, RMSNorm'd dot gate with a signed square root, value plus
SiLU of a causal depthwise conv). The legacy `torch` layout is written here around Megatron's own
`state_dict_for_save_checkpoint()`, with a Megatron enum inside the pickled args as real checkpoints have.
All of it runs in a subprocess (this file run as a script): Megatron initialises torch.distributed and
needs torch.cuda shims, and must not leave them in the test process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_TIMEOUT = 240  # a Megatron child that dies can leave its parent waiting: never wait longer

# The release's tokenizer and Megatron's additions, by token: what Contract 1's tokens are called there.
RELEASE_IDS = {"<pad>": 0, "<unk>": 1, "C": 5, "G": 6, "T": 7, "A": 8, "N": 9, "<eod>": 12}
FORK_DNA_IDS = (8, 5, 6, 7, 9)  # --gengram-token-ids: A C G T N, read as digits 0..4

# The debug flavour's shape, so that a named flavour's check can pass as well as fail.
TINY = {
    "num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 256,
    "moe_ffn_hidden_size": 256, "num_experts": 4, "moe_router_topk": 2, "padded_vocab_size": 128,
    "gengram_layer_ids": [2, 3], "gengram_ngram_sizes": [1, 2, 3, 4, 5, 6], "gengram_embed_dim_per_ngram": 16,
    "gengram_window_size": 21, "gengram_short_conv_kernel_size": 4, "max_position_embeddings": 64,
}
ITERATION = 7
LAYOUTS = {"local-1-stage": ("local", 1), "te-2-stages": ("te", 2)}  # legacy `torch`: layer spec, stages


# --- the Megatron side (run in a subprocess) ------------------------------------------------------


def fork_gengram(t: dict[str, torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The fork's Gengram residual for hidden [s, b, h] and Megatron token ids [b, s], from its tensors
    (names relative to `gengram.`). A reference written position by position: slow and plain."""
    s, b, H = hidden.shape
    digit = torch.full((b, s), -1)
    for d, token in enumerate(FORK_DNA_IDS):
        digit[ids == token] = d
    window = TINY["gengram_window_size"]
    features = []
    for j, k in enumerate(TINY["gengram_ngram_sizes"]):
        table = t[f"embeddings.{j}.weight"]
        pooled = torch.zeros(b, s, table.shape[1])
        for p in range(s):
            rows = []  # every k-mer wholly inside the `window` tokens ending at p
            for end in range(max(k - 1, p - (window - k)), p + 1):
                kmer = digit[:, end - k + 1: end + 1]  # oldest first; the newest token is digit 0
                code = (kmer.clamp(min=0) * 5 ** torch.arange(k - 1, -1, -1)).sum(-1)
                rows.append((table[code], (kmer >= 0).all(-1)))
            if not rows:  # no k-mer ends here yet
                continue
            total = sum(row * valid[:, None] for row, valid in rows)
            count = sum(valid.float() for _, valid in rows).clamp(min=1)
            pooled[:, p] = total / count[:, None]
        features.append(pooled)
    m = torch.cat(features, -1).transpose(0, 1)  # [s, b, |K| D]
    key, value = m @ t["key_proj.weight"].T, m @ t["value_proj.weight"].T

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    g = (rms_norm(hidden, t["norm_q.weight"]) * rms_norm(key, t["norm_k.weight"])).sum(-1) / math.sqrt(H)
    gate = torch.sigmoid(g.sign() * g.abs().clamp(min=1e-6).sqrt())
    out = gate[..., None] * value
    conv = t["short_conv.conv.weight"]
    dilation = max(TINY["gengram_ngram_sizes"])
    x = F.pad(out.permute(1, 2, 0), ((conv.shape[-1] - 1) * dilation, 0))  # causal: pad the past only
    y = F.conv1d(x, conv, dilation=dilation, groups=H).permute(2, 0, 1)
    return out + F.silu(y)


def megatron_args(stages: int) -> argparse.Namespace:
    """The args a checkpoint of TINY pickles: the fork's command line, with Megatron objects among them."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        **TINY, normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
        group_query_attention=True, norm_epsilon=1e-5, init_method_std=0.05, seq_length=64, kv_channels=32,
        moe_aux_loss_coeff=1e-3, moe_z_loss_coeff=1e-3, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=stages, expert_model_parallel_size=1, params_dtype=torch.float32,
        attention_backend=AttnBackend.auto, gengram_enabled=True, gengram_token_ids=list(FORK_DNA_IDS),
        gengram_use_short_conv=True, gengram_short_conv_dilation=None, tokenizer_type="SentencePieceTokenizer",
    )


def transformer_engine_names(state: dict) -> dict:
    """Megatron's local-spec names as the transformer-engine spec with grouped experts spells them."""
    renamed = {}
    for name, tensor in state.items():
        name = name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        if ".local_experts." in name:
            head, rest = name.split(".local_experts.")
            expert, fc, kind = rest.split(".")
            name = f"{head}.{fc}.{kind}{expert}" if kind == "weight" else f"{head}.{fc}.{kind}"
        renamed[name] = tensor
    return renamed


def write_legacy(root: Path, state: dict, stages: int) -> None:
    """Megatron's legacy layout, pipeline stages numbering their layers from 0."""
    per_stage = TINY["num_layers"] // stages
    for stage in range(stages):
        part = {}
        for name, tensor in state.items():
            if name.startswith("decoder.layers."):
                layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
                if int(layer) // per_stage == stage:
                    part[f"decoder.layers.{int(layer) % per_stage}.{rest}"] = tensor
            elif stage == (0 if name.startswith("embedding.") else stages - 1):  # the final norm and output: last
                part[name] = tensor
        directory = root / f"iter_{ITERATION:07d}" / ("mp_rank_00" if stages == 1 else f"mp_rank_00_{stage:03d}")
        directory.mkdir(parents=True)
        saved = {"model": part, "args": megatron_args(stages), "checkpoint_version": 3.0, "iteration": ITERATION,
                 "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": numpy.random.get_state(),
                                "torch_rng_state": torch.get_rng_state()}]}  # as Megatron's get_rng_state()
        torch.save(saved, directory / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def run_megatron(out: Path, port: int) -> None:
    """Build, run and save the tiny model: out/<layout>/ checkpoints and out/reference.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None  # 0.16.1 names it without transformer-engine installed
    torch.cuda.current_device = lambda: torch.device("cpu")  # RoPE asks for the current device
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=TINY["num_layers"], hidden_size=TINY["hidden_size"],
        num_attention_heads=TINY["num_attention_heads"], num_query_groups=TINY["num_query_groups"],
        ffn_hidden_size=TINY["ffn_hidden_size"], moe_ffn_hidden_size=TINY["moe_ffn_hidden_size"],
        num_moe_experts=TINY["num_experts"], moe_router_topk=TINY["moe_router_topk"],
        moe_token_dispatcher_type="allgather", normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32, init_method_std=0.05,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=TINY["num_experts"], normalization="RMSNorm"),
                     vocab_size=TINY["padded_vocab_size"], max_sequence_length=TINY["max_position_embeddings"],
                     position_embedding_type="rope", share_embeddings_and_output_weights=False).eval()
    with torch.no_grad():  # norms away from 1 and a tilted router, so that a swapped tensor shows
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("router.weight"):
                param.normal_(0, 1.0)
    # Gengram in every layer, as the fork builds it, under the fork's module names (so that Megatron's own
    # state_dict and sharded_state_dict name its tensors as they name the fork's); only the configured
    # layers use theirs, through the hook below.
    ks, D, H = TINY["gengram_ngram_sizes"], TINY["gengram_embed_dim_per_ngram"], TINY["hidden_size"]
    gengrams = []
    for layer in model.decoder.layers:
        gengram = torch.nn.Module()
        gengram.embeddings = torch.nn.ModuleList(torch.nn.Embedding(5**k, D) for k in ks)
        gengram.key_proj = torch.nn.Linear(len(ks) * D, H, bias=False)
        gengram.value_proj = torch.nn.Linear(len(ks) * D, H, bias=False)
        gengram.norm_q, gengram.norm_k = torch.nn.RMSNorm(H, eps=1e-5), torch.nn.RMSNorm(H, eps=1e-5)
        gengram.short_conv = torch.nn.Module()
        gengram.short_conv.conv = torch.nn.Conv1d(H, H, TINY["gengram_short_conv_kernel_size"], groups=H, bias=False)
        with torch.no_grad():
            for name, param in gengram.named_parameters():
                if name.startswith("norm_"):
                    param.copy_(1 + 0.3 * torch.randn_like(param))
                elif not name.startswith("embeddings."):
                    param.normal_(0, 0.1)
        layer.gengram = gengram
        gengrams.append({name: param.detach() for name, param in gengram.named_parameters()})
    state = dict(model.state_dict_for_save_checkpoint())

    letters = "ACGTACGGTTNACGTCAGT<eod>TTACGNNACGT<pad><unk>"
    tokens = []
    while letters:
        token = next(name for name in RELEASE_IDS if letters.startswith(name))
        tokens.append(RELEASE_IDS[token])
        letters = letters[len(token):]
    ids = torch.tensor([tokens, tokens[::-1]])

    def add_gengram(layer, args, kwargs):
        if layer.layer_number in TINY["gengram_layer_ids"]:
            hidden = kwargs["hidden_states"]
            kwargs["hidden_states"] = hidden + fork_gengram(gengrams[layer.layer_number - 1], hidden, ids)
        return args, kwargs

    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(add_gengram, with_kwargs=True)
    S = ids.shape[1]
    causal_mask = ~torch.ones(S, S, dtype=torch.bool).tril()[None, None]  # True = masked out
    with torch.no_grad():
        logits = model(ids, torch.arange(S).expand_as(ids), causal_mask)
    torch.save({"megatron_ids": ids, "logits": logits}, out / "reference.pt")
    write_legacy(out / "local-1-stage", state, stages=1)
    write_legacy(out / "te-2-stages", transformer_engine_names(state), stages=2)

    # torch_dist, as Megatron-LM's training loop saves it: the sharded state dict with the args beside it.
    from megatron.core import dist_checkpointing

    torch.cuda.synchronize = lambda *args, **kwargs: None  # the writer synchronises before it saves
    directory = out / "torch-dist" / f"iter_{ITERATION:07d}"
    directory.mkdir(parents=True)
    sharded = model.sharded_state_dict()
    sharded["args"] = megatron_args(stages=1)
    dist_checkpointing.save(sharded, str(directory))
    (out / "torch-dist" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    dist.destroy_process_group()


# --- the tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron(tmp_path_factory) -> Path:
    """Megatron's checkpoints of one tiny model (legacy local spec in one stage, legacy transformer-engine
    names in two stages, torch_dist) and its logits on a batch."""
    pytest.importorskip("megatron.core")
    out = tmp_path_factory.mktemp("megatron")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, __file__, str(out), str(port)], cwd=ROOT, check=True, timeout=MEGATRON_TIMEOUT)
    return out


def convert(**settings):
    from jobs.common.config import build_config
    from jobs.convert import ConvertConfig, run

    return run(build_config(ConvertConfig, settings))


def contract_tokens() -> tuple[str, ...]:
    """Contract 1's ids by the release's token names; our spare id stands for UNK (never in DNA)."""
    from model import vocab

    return (*vocab.TOKENS, "<unk>")


def contract_ids(megatron_ids: torch.Tensor) -> torch.Tensor:
    """Megatron ids to Contract 1's, by token name."""
    table = torch.full((max(RELEASE_IDS.values()) + 1,), -1)
    for our_id, token in enumerate(contract_tokens()):
        table[RELEASE_IDS[token]] = our_id
    return table[megatron_ids]


def megatron_columns() -> list[int]:
    """The Megatron logit column of each of Contract 1's ids."""
    return [RELEASE_IDS[token] for token in contract_tokens()]


@pytest.mark.parametrize("layout", [*sorted(LAYOUTS), "torch-dist"])
def test_imported_model_reproduces_megatrons_logits(megatron, tmp_path, layout):
    from model import exported

    result = convert(checkpoint=str(megatron / layout), output=str(tmp_path / "model"))
    model = exported.load(exported.local(tmp_path / "model"))
    reference = torch.load(megatron / "reference.pt")
    with torch.no_grad():
        logits = model(contract_ids(reference["megatron_ids"]), compute_loss=False).logits
    expected = reference["logits"][..., megatron_columns()]
    difference = (logits - expected).abs().max().item()
    print(f"{layout}: max |logit difference| against Megatron {difference:.2e}")
    assert difference < 1e-5
    assert model.config.gengram_layers == tuple(TINY["gengram_layer_ids"])
    assert result.unused_gengram_layers == TINY["num_layers"] - len(TINY["gengram_layer_ids"])
    with_gengram = {int(name.split(".")[1]) + 1 for name in model.state_dict() if ".gengram." in name}
    assert with_gengram == set(TINY["gengram_layer_ids"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_reproduces_every_mapped_tensor_bit_for_bit(megatron, tmp_path, layout):
    spec, stages = LAYOUTS[layout]
    convert(checkpoint=str(megatron / layout), output=str(tmp_path / "model"))
    convert(direction="export", model=str(tmp_path / "model"), output=str(tmp_path / "megatron"),
            export={"layer_spec": "transformer_engine" if spec == "te" else "local",
                    "grouped_experts": spec == "te", "pipeline_stages": stages, "iteration": ITERATION})
    mapped_rows = sorted(RELEASE_IDS.values())
    per_stage = TINY["num_layers"] // stages
    compared = 0
    for stage, path in enumerate(sorted((megatron / layout).rglob("model_optim_rng.pt"))):
        relative = path.relative_to(megatron / layout)
        original = torch.load(path, weights_only=False)["model"]
        back = torch.load(tmp_path / "megatron" / relative, weights_only=False)
        assert back["checkpoint_version"] == 3.0 and back["iteration"] == ITERATION
        assert set(back["model"]) == set(original), relative
        for name, tensor in original.items():
            again = back["model"][name]
            if tensor is None:  # the _extra_state of Megatron's own linears
                assert again is None, name
                continue
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                tensor, again = tensor[mapped_rows], again[mapped_rows]
            if ".gengram." in name:
                global_layer = stage * per_stage + int(name.split(".")[2]) + 1
                if global_layer not in TINY["gengram_layer_ids"]:  # built by the fork, never used: zeros
                    assert not again.any(), name
                    continue
            assert again.dtype == tensor.dtype and torch.equal(tensor, again), f"{relative}: {name}"
            compared += 1
    assert compared > 0
    print(f"{layout}: {compared} mapped tensors equal bit for bit after the round trip")



def edit_stage(path: Path, edit) -> None:
    checkpoint = torch.load(path, weights_only=False)
    edit(checkpoint)
    torch.save(checkpoint, path)


def assert_nothing_written(tmp_path: Path, output: Path) -> None:
    assert not output.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_strict_loading_names_every_missing_unknown_and_misshaped_tensor(megatron, tmp_path):
    from jobs.convert.megatron import ConversionError

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(megatron / "local-1-stage", checkpoint)

    def damage(saved):
        model = saved["model"]
        del model["decoder.layers.1.mlp.router.weight"]
        model["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"] = torch.zeros(4, 128)
        model["decoder.layers.3.self_attention.linear_proj.weight"] = torch.zeros(128, 30)

    edit_stage(next(checkpoint.rglob("model_optim_rng.pt")), damage)
    with pytest.raises(ConversionError) as error:
        convert(checkpoint=str(checkpoint), output=str(tmp_path / "model"))
    message = str(error.value)
    assert "missing: decoder.layers.1.mlp.router.weight" in message
    assert "unknown: decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in message
    assert "mis-shaped: decoder.layers.3.self_attention.linear_proj.weight (128, 30) (expected (128, 128))" in message
    assert_nothing_written(tmp_path, tmp_path / "model")


def test_a_truncated_or_missing_file_fails_naming_it(megatron, tmp_path):
    from jobs.convert.megatron import ConversionError

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(megatron / "te-2-stages", checkpoint)
    stage = checkpoint / f"iter_{ITERATION:07d}" / "mp_rank_00_001"
    shard = stage / "model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConversionError, match=f"{shard}.*truncated"):
        convert(checkpoint=str(checkpoint), output=str(tmp_path / "model"))
    shutil.rmtree(stage)
    with pytest.raises(ConversionError, match=f"pipeline stage 1 is missing: {shard} not found"):
        convert(checkpoint=str(checkpoint), output=str(tmp_path / "model"))

    sharded = tmp_path / "torch-dist"
    shutil.copytree(megatron / "torch-dist", sharded)
    first, *rest = sorted(sharded.rglob("*.distcp"))
    first.write_bytes(first.read_bytes()[:100])
    for file in rest:
        file.unlink()
    with pytest.raises(ConversionError) as error:
        convert(checkpoint=str(sharded), output=str(tmp_path / "model"))
    assert f"{first} is truncated (100 bytes" in str(error.value)
    assert all(f"{file} is missing" in str(error.value) for file in rest) and rest
    assert_nothing_written(tmp_path, tmp_path / "model")


def test_the_args_and_the_flavour_are_checked_and_every_difference_named(megatron, tmp_path):
    from jobs.convert.megatron import ConversionError

    with pytest.raises(ConversionError) as error:
        convert(checkpoint=str(megatron / "local-1-stage"), output=str(tmp_path / "model"), flavour="gengram-10b")
    for difference in ("hidden_size: checkpoint 128, flavour 4096", "num_layers: checkpoint 4, flavour 12",
                       "gengram_layers: checkpoint (2, 3), flavour (3, 6, 10)"):
        assert difference in str(error.value)
    assert convert(checkpoint=str(megatron / "local-1-stage"), output=str(tmp_path / "debug"), flavour="debug")

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(megatron / "local-1-stage", checkpoint)

    def other_architecture(saved):
        saved["args"].normalization, saved["args"].add_bias_linear = "LayerNorm", True
        saved["args"].gengram_token_ids = [5, 6, 7, 8, 9]

    edit_stage(next(checkpoint.rglob("model_optim_rng.pt")), other_architecture)
    with pytest.raises(ConversionError) as error:
        convert(checkpoint=str(checkpoint), output=str(tmp_path / "model"))
    for setting in ("normalization='LayerNorm'", "add_bias_linear=True", "gengram_token_ids=[5, 6, 7, 8, 9]"):
        assert setting in str(error.value)
    assert_nothing_written(tmp_path, tmp_path / "model")


def test_the_unpickler_refuses_what_a_checkpoint_is_not_made_of(megatron, tmp_path):
    from jobs.convert.megatron import ConversionError

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(megatron / "local-1-stage", checkpoint)
    shard = next(checkpoint.rglob("model_optim_rng.pt"))
    edit_stage(shard, lambda saved: setattr(saved["args"], "log_dir", Path("/x")))  # a class no checkpoint holds
    with pytest.raises(ConversionError, match=r"pathlib\.PosixPath is neither a tensor, a plain value nor a Megatron"):
        convert(checkpoint=str(checkpoint), output=str(tmp_path / "model"))


def test_the_released_training_scripts_settings_are_flavour_gengram_10b():
    """The args of the release's Gengram_layer3-6-10_win21_pp2.sh (Megatron's defaults for what it leaves
    unset) describe the gengram-10b flavour, field by field."""
    from jobs.convert import megatron
    from model import flavour

    release = {
        "num_layers": 12, "hidden_size": 4096, "ffn_hidden_size": 10240, "num_attention_heads": 16,
        "group_query_attention": True, "num_query_groups": 8, "init_method_std": 0.01, "normalization": "RMSNorm",
        "position_embedding_type": "rope", "swiglu": True, "untie_embeddings_and_output_weights": True,
        "add_bias_linear": False, "rotary_base": 10000, "max_position_embeddings": 8192, "seq_length": 8192,
        "num_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 8192, "moe_aux_loss_coeff": 1e-3,
        "moe_z_loss_coeff": 1e-3, "pipeline_model_parallel_size": 2, "padded_vocab_size": 128,
        "gengram_enabled": True, "gengram_layer_ids": [3, 6, 10], "gengram_ngram_sizes": [1, 2, 3, 4, 5, 6],
        "gengram_embed_dim_per_ngram": 1024, "gengram_token_ids": [8, 5, 6, 7, 9], "gengram_use_short_conv": True,
        "gengram_short_conv_kernel_size": 4, "gengram_window_size": 21,
    }
    config = megatron.config_from_args(release)
    assert megatron.mismatches(config, flavour("gengram-10b")) == []
    # and what it does not say about the forward, it says as the fork computes it
    assert config.gengram.dilation == 6 and config.gengram.pooling == "mean" and config.norm_eps == 1e-5


def test_a_torch_dist_checkpoint_without_args_takes_its_flavour(megatron, tmp_path):
    from jobs.convert.megatron import ConversionError
    from model import exported

    sharded = tmp_path / "torch-dist"
    shutil.copytree(megatron / "torch-dist", sharded)
    torch.save({}, next(sharded.rglob("common.pt")))  # as megatron-core saves a state dict without args
    with pytest.raises(ConversionError, match="holds no Megatron args: name its flavour"):
        convert(checkpoint=str(sharded), output=str(tmp_path / "model"))
    convert(checkpoint=str(sharded), output=str(tmp_path / "model"), flavour="debug")
    convert(checkpoint=str(megatron / "torch-dist"), output=str(tmp_path / "with-args"))
    by_flavour = exported.read_state_dict(exported.local(tmp_path / "model"))
    by_args = exported.read_state_dict(exported.local(tmp_path / "with-args"))
    assert by_flavour.keys() == by_args.keys() and all(torch.equal(by_flavour[k], by_args[k]) for k in by_args)


def test_a_failed_export_writes_nothing(megatron, tmp_path):
    from jobs.convert.megatron import ConversionError

    convert(checkpoint=str(megatron / "local-1-stage"), output=str(tmp_path / "model"))
    with pytest.raises(ConversionError, match="4 layers do not split into 3 equal pipeline stages"):
        convert(direction="export", model=str(tmp_path / "model"), output=str(tmp_path / "megatron"),
                export={"pipeline_stages": 3})
    assert_nothing_written(tmp_path, tmp_path / "megatron")


def test_the_command_line_imports_without_megatron_importable(megatron, tmp_path):
    """The shipped config, with Megatron's package blocked: the pickled args' Megatron enum must not need it."""
    output = tmp_path / "model"
    command = ["--config", "jobs/configs/convert-gengram-10b.yaml", f"checkpoint={megatron / 'te-2-stages'}",
               f"output={output}", "flavour=null"]
    script = ("import runpy, sys; sys.modules['megatron'] = None; "  # any `import megatron...` now fails
              f"sys.argv = ['jobs.convert', *{command!r}]; runpy.run_module('jobs.convert', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported into" in done.stdout and "2 unused Gengram layers dropped" in done.stdout
    config = json.loads((output / "model_config.json").read_text())
    assert config["gengram_layers"] == TINY["gengram_layer_ids"] and config["num_experts"] == TINY["num_experts"]
    again = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and f"output {output} exists" in again.stderr


@pytest.mark.parametrize("layout", ["te-2-stages", "torch-dist"])
def test_import_reads_from_and_writes_to_any_fsspec_url(megatron, tmp_path, layout):
    """A checkpoint read from an fsspec URL (fsspec's in-memory store here) and the exported model
    published there, the model config last; the same model as a local conversion."""
    import fsspec

    from model import exported

    memory = fsspec.filesystem("memory")
    for path in (megatron / layout).rglob("*"):
        if path.is_file():
            memory.pipe(f"/checkpoint/{path.relative_to(megatron / layout)}", path.read_bytes())
    convert(checkpoint="memory://checkpoint", output="memory://model")
    convert(checkpoint=str(megatron / layout), output=str(tmp_path / "model"))

    def remote(name, mode):
        return fsspec.open(f"memory://model/{name}", mode)

    local = exported.read_state_dict(exported.local(tmp_path / "model"))
    assert exported.read_config(remote) == exported.read_config(exported.local(tmp_path / "model"))
    from_url = exported.read_state_dict(remote)
    assert from_url.keys() == local.keys() and all(torch.equal(from_url[k], local[k]) for k in local)
    memory.rm("/checkpoint", recursive=True)
    memory.rm("/model", recursive=True)


def registering(mlflow_server, name: str) -> dict:
    return {"register": name, "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "test-convert"}}


def converted_logits(directory: Path, megatron_ids: torch.Tensor) -> torch.Tensor:
    from model import exported

    with torch.no_grad():
        return exported.load(exported.local(directory))(contract_ids(megatron_ids), compute_loss=False).logits


@pytest.mark.services
def test_a_registered_import_resolves_in_evaluation_to_the_converted_weights(megatron, tmp_path, mlflow_server):
    """register=: a version in the registry over HTTP whose run says where it came from, which jobs.evaluate's
    model resolution reads back, through models:/ and through the exported directory, bit for bit."""
    from mlflow.tracking import MlflowClient

    from jobs.common.config import build_config
    from jobs.convert import summary
    from jobs.evaluate import EvaluateConfig
    from jobs.evaluate.models import resolve
    from model import exported

    name = f"converted-{tmp_path.name}"
    checkpoint, output = megatron / "te-2-stages", tmp_path / "model"
    result = convert(checkpoint=str(checkpoint), output=str(output), **registering(mlflow_server, name))
    assert result.registered_uri == f"models:/{name}/1"
    assert f"registered as models:/{name}/1 (MLflow run {result.mlflow_run_id})" in summary(result)
    conversion_run = MlflowClient(mlflow_server.tracking_uri).get_run(result.mlflow_run_id)
    assert conversion_run.info.status == "FINISHED"
    assert conversion_run.data.tags["gengram.source_checkpoint"] == str(checkpoint)
    assert conversion_run.data.tags["gengram.iteration"] == str(ITERATION)
    params = conversion_run.data.params
    assert params["result.tensors"] == str(result.tensors) and params["result.unused_gengram_layers"] == "2"
    assert params["register"] == name and params["model_resolved.num_experts"] == str(TINY["num_experts"])

    config = build_config(EvaluateConfig, {
        "models": [{"name": "registered", "uri": result.registered_uri}, {"name": "directory", "uri": str(output)}],
        "interpretability": {"analyses": ["rc_symmetry"]}, "model_cache": str(tmp_path / "cache"),
        "tracking": {"uri": mlflow_server.tracking_uri}})
    registered, directory = resolve(config, mlflow_server.tracking_uri)
    assert registered.identity == f"registered-{name}-v1" and registered.source_run_id == result.mlflow_run_id
    assert directory.identity.startswith("export-") and directory.directory == output
    assert registered.directory != output  # a downloaded copy, not the output read again

    converted = exported.read_state_dict(exported.local(output))
    reference = torch.load(megatron / "reference.pt")
    expected = converted_logits(output, reference["megatron_ids"])
    assert (expected - reference["logits"][..., megatron_columns()]).abs().max() < 1e-5
    for resolved in (registered, directory):
        assert resolved.config == exported.read_config(exported.local(output))
        state = exported.read_state_dict(exported.local(resolved.directory))
        assert state.keys() == converted.keys() and all(torch.equal(state[k], converted[k]) for k in converted)
        assert torch.equal(converted_logits(resolved.directory, reference["megatron_ids"]), expected)


@pytest.mark.ray
@pytest.mark.services
def test_jobs_evaluate_probes_a_registered_import_beside_a_kmer_reference(megatron, tmp_path, mlflow_server,
                                                                           ray_cluster):
    from jobs.common.config import build_config
    from jobs.evaluate import EvaluateConfig, read_results
    from jobs.evaluate import run as evaluate

    name = f"evaluated-{tmp_path.name}"
    result = convert(checkpoint=str(megatron / "torch-dist"), output=str(tmp_path / "model"),
                     **registering(mlflow_server, name))
    rng = random.Random(0)
    classes = {}
    for label, bases in (("at_rich", "AATTAATTCG"), ("gc_rich", "GGCCGGCCAT")):  # what a k-mer spectrum sees
        classes[label] = tmp_path / f"{label}.fa"
        classes[label].write_text("".join(f">{label}{i}\n{''.join(rng.choices(bases, k=48))}\n" for i in range(40)))
    config = build_config(EvaluateConfig, {
        "name": tmp_path.name, "output": str(tmp_path / "evaluation"), "model_cache": str(tmp_path / "cache"),
        "models": [{"name": "converted", "uri": result.registered_uri}, {"name": "kmer", "kind": "kmer"}],
        "tasks": [{"name": "gc", "source": {"type": "fasta", "classes": {k: str(v) for k, v in classes.items()}}}],
        "probes": {"kinds": ["logistic"], "bootstrap": 50},
        "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "test-convert"}})
    evaluate(config)
    results = read_results(config.output_url)
    assert {m["name"]: m["identity"] for m in results["models"]}["converted"] == f"registered-{name}-v1"
    aurocs = {(row["model"], row["layer"]): row["value"] for row in results["metrics"]
              if (row["split"], row["metric"]) == ("test", "auroc")}
    assert {layer for model, layer in aurocs if model == "converted"} == {TINY["num_layers"]}
    assert aurocs[("kmer", None)] >= 0.95


def test_register_fails_in_one_line_before_any_work_when_mlflow_is_unreachable(megatron, tmp_path):
    from jobs.common.tracking import TrackingUnavailable

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking store {dead} is not reachable"):
        convert(checkpoint=str(megatron / "local-1-stage"), output=str(tmp_path / "model"), register="never",
                tracking={"uri": dead, "preflight_timeout_s": 1})
    assert_nothing_written(tmp_path, tmp_path / "model")


def test_a_model_published_to_an_fsspec_url_is_registered_from_a_local_copy(megatron, tmp_path):
    """MLflow logs local files: an output on an object store (fsspec's in-memory one here) is fetched back."""
    import fsspec
    import mlflow

    from model import exported

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = convert(checkpoint=str(megatron / "local-1-stage"), output="memory://registered", register="remote",
                     tracking={"uri": store, "artifact_root": str(tmp_path / "artifacts")})
    try:
        logged = Path(mlflow.artifacts.download_artifacts(result.registered_uri, tracking_uri=store,
                                                          dst_path=str(tmp_path / "logged"))) / "artifacts"
        published = exported.read_state_dict(lambda name, mode: fsspec.open(f"memory://registered/{name}", mode))
    finally:
        fsspec.filesystem("memory").rm("/registered", recursive=True)
    state = exported.read_state_dict(exported.local(logged))
    assert state.keys() == published.keys() and all(torch.equal(state[k], published[k]) for k in published)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_the_converted_directory_is_what_pretraining_starts_from_with_model_init_from(megatron, tmp_path, ep_size):
    """What pretraining's driver (config checks) and each worker (load_state_dict + local_experts, then the
    model's own strict load_state_dict) do with model.init_from, without Ray: every rank holds the converted
    weights of its experts, and the ranks together hold the whole converted model."""
    from jobs.common.config import ConfigError, build_config
    from jobs.pretrain import PretrainConfig, validate
    from jobs.pretrain.job import check_init_from
    from jobs.pretrain.weights import global_experts, load_state_dict, local_experts
    from model import GengramLM, exported

    output = tmp_path / "model"
    convert(checkpoint=str(megatron / "local-1-stage"), output=str(output), flavour="debug")
    converted = exported.read_state_dict(exported.local(output))
    config = build_config(PretrainConfig, {
        "model": {"flavour": "debug", "init_from": os.path.relpath(output), "overrides": {"ep_size": ep_size}},
        "resources": {"num_workers": 2}})
    model_config = validate(config)
    check_init_from(config)
    assert config.model.init_from == str(output)  # made absolute for the workers
    rebuilt = {}
    for rank in range(config.resources.num_workers):
        model = GengramLM(model_config)
        state = load_state_dict(config.model.init_from, config.storage_options(config.model.init_from))
        model.load_state_dict(local_experts(state, model_config, rank))
        shared, experts = global_experts(model.state_dict(), model_config, rank % ep_size)
        assert len(experts) == len([k for k in converted if ".deepspeed_experts." in k]) // ep_size
        rebuilt |= shared | experts
    assert rebuilt.keys() == converted.keys()
    assert all(torch.equal(rebuilt[k], converted[k]) for k in converted)

    config.model.init_from = str(tmp_path)
    with pytest.raises(ConfigError, match=f"model.init_from={tmp_path} holds no model.pt"):
        check_init_from(config)


if __name__ == "__main__":  # the Megatron side: a spawn-mode child re-imports this file, so guard it
    run_megatron(Path(sys.argv[1]), int(sys.argv[2]))

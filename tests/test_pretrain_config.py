"""The pretraining config: every shipped config validates; bad ones fail naming their keys."""

import itertools
from pathlib import Path

import pytest

from jobs.common.config import ConfigError, load_config
from jobs.pretrain.config import PretrainConfig, deepspeed_config, lr_at, validate

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("pretrain-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    config = load_config(PretrainConfig, str(path))
    model = validate(config)
    ds = deepspeed_config(config)
    assert ds["train_batch_size"] == (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * config.resources.num_workers
    )
    assert model.has_gengram == ("baseline" not in config.model.flavour)


def test_paper_configs_are_present():
    names = {path.stem for path in CONFIGS}
    assert {"pretrain-quickstart", "pretrain-moe-1.2b", "pretrain-baseline-moe-1.2b", "pretrain-gengram-10b-8k",
            "pretrain-baseline-10b-8k", "pretrain-gengram-10b-32k", "pretrain-baseline-10b-32k"} <= names


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["train.global_batch_size=10", "train.micro_batch_size=4"], ["train.global_batch_size", "micro_batch_size"]),
        (["resources.num_workers=3", "model.overrides.ep_size=2", "train.global_batch_size=12",
          "train.micro_batch_size=4"], ["ep_size=2", "resources.num_workers=3"]),
        (["deepspeed.zero_stage=3"], ["deepspeed.zero_stage=3"]),
        (["model.overrides.gengram_layers=[9]"], ["gengram_layers"]),
        (["model.flavour=huge"], ["huge"]),
    ],
)
def test_cross_field_errors_name_the_keys(overrides, keys):
    config = load_config(PretrainConfig, None, overrides)
    with pytest.raises(ConfigError) as error:
        validate(config)
    for key in keys:
        assert key in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.max_stpes=3"], "train.max_stpes: unknown key"),
        (["train.max_steps=0"], "train.max_steps"),
        (["deepspeed.precision=fp8"], "deepspeed.precision"),
        (["run_name=has space"], "run_name"),
    ],
)
def test_schema_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(PretrainConfig, None, overrides)


def test_schedule_warms_up_decays_and_floors():
    train = load_config(PretrainConfig, None, ["train.max_steps=100", "train.lr=1e-4", "train.min_lr=1e-5"]).train
    lrs = [lr_at(step, train) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4 / 5)  # warmup: 5 steps
    assert max(lrs) == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[5:]))  # monotone decay after warmup
    assert lrs[80] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-5)  # floor after 80 %


def test_deepspeed_extra_merges_deeply():
    config = load_config(PretrainConfig, None, ["deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(config)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}

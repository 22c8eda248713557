"""An experiment as steps: each a job config, the steps it needs, and a key that addresses its output.

A step's key is the hash of its kind, its job config as the user's files and overrides resolve it (paths
the experiment chooses left out) and the keys of the steps it needs: change a variant and only its runs,
the sweep and what reads them get new keys. Its output lies under `<output>/<kind>/<name>-<key>`, and a
record `<output>/steps/<key>.json` written after it finished says it is done, so a finished step is
skipped and a re-run after a crash continues with the first unfinished one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from jobs import evaluate, pretrain, tokenize, tune
from jobs.common import storage
from jobs.common.config import (
    ConfigError,
    apply_override,
    build_config,
    config_hash,
    config_to_dict,
    flatten,
    read_yaml,
)
from jobs.experiment.config import GENOME_REFERENCE, ExperimentConfig
from jobs.tokenize import Recipe

StepKind = Literal["generate", "tokenize", "pretrain", "tune", "evaluate", "report"]
KEY_LENGTH = 12
GENERATED_GROUP = "generated"


@dataclass
class Step:
    kind: StepKind
    name: str  # e.g. pretrain/structured/gengram/s0
    key: str
    output: str
    needs: tuple[str, ...]  # names of steps
    job_config: BaseModel | None  # the config its job runs (generate and report have their own)
    cpus: float = 1
    tokens: int = 0  # tokens it trains on
    facts: dict[str, Any] = field(default_factory=dict)  # what the report needs to know of it


@dataclass
class Plan:
    config: ExperimentConfig
    root: str
    steps: dict[str, Step]

    def record_url(self, step: Step) -> str:
        return storage.join(self.root, "steps", f"{step.key}.json")

    def of_kind(self, kind: StepKind) -> list[Step]:
        return [step for step in self.steps.values() if step.kind == kind]

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps.values())


def _key(kind: str, content: Any, needs: list[Step]) -> str:
    return config_hash({"kind": kind, "content": content, "needs": sorted(s.key for s in needs)})[:KEY_LENGTH]


def _with(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        apply_override(data, f"{key}={_yaml(value)}")
    return data


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: the override parser reads it back as the same value


def _build(cls: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    return build_config(cls, data, source=where)


def make_plan(config: ExperimentConfig) -> Plan:
    """Every step of `config`, its job config validated; nothing runs and nothing is written."""
    root = storage.absolute(config.output_url)
    steps: dict[str, Step] = {}

    def add(step: Step) -> Step:
        steps[step.name] = step
        return step

    def place(kind: str, name: str, key: str) -> str:
        return storage.join(root, kind, f"{name.replace('/', '-')}-{key}")

    generated = {}
    for set_name, genome_set in config.genomes.items():
        recipes = [Recipe(name=g.name, contigs=tuple(g.contigs), seed=g.seed, structure=genome_set.structure)
                   for g in genome_set.genomes]
        name = f"generate/{set_name}"
        key = _key("generate", [config_to_dict(r) for r in recipes], [])
        generated[set_name] = add(Step("generate", name, key, place("genomes", set_name, key), (), None,
                                       facts={"recipes": recipes}))

    datasets = {}
    for data_name, spec in config.datasets.items():
        if spec.genomes is not None:
            source = generated[spec.genomes]
            inputs = {"inputs": [{"url": storage.join(source.output, f"{r.name}.fa.gz"), "assembly": r.name,
                                  "organism": f"{r.name} (generated, not real sequence)", "group": GENERATED_GROUP}
                                 for r in source.facts["recipes"]]}
            content, needs = {"group_shares": {GENERATED_GROUP: 1.0}, **spec.tokenize}, [source]
        else:  # real assemblies: the lists' contents are the input, wherever they lie
            inputs, needs = {"assemblies": spec.assemblies}, []
            content = {**spec.tokenize, "assembly_lists": [hashlib.sha256(storage.read_bytes(url)).hexdigest()
                                                           for url in spec.assemblies]}
        key = _key("tokenize", content, needs)
        output = place("datasets", data_name, key)
        content.pop("assembly_lists", None)
        job = _build(tokenize.TokenizeConfig, {**content, **inputs, "output": output}, f"datasets.{data_name}")
        datasets[data_name] = add(Step("tokenize", f"tokenize/{data_name}", key, output,
                                       tuple(s.name for s in needs), job))

    section = config.pretrain
    base = _with(read_yaml(section.config), section.overrides)
    tracking = {"tracking.experiment": config.tracking.experiment,
                "tracking.artifact_root": config.tracking.artifact_root,
                "tracking.uri": config.tracking.uri, "tracking.registered_model": None}
    runs: dict[tuple[str, str, int], Step] = {}
    for data_name in section.datasets:
        for variant, overrides in section.variants.items():
            for seed in section.seeds_of(data_name):
                content = _with(base, {**overrides, "train.seed": seed, "data.seed": seed})
                needs = [datasets[data_name]]
                key = _key("pretrain", {k: v for k, v in content.items() if k not in ("run_name", "tracking")}, needs)
                name = f"pretrain/{data_name}/{variant}/s{seed}"
                output = place("runs", name.removeprefix("pretrain/"), key)
                job = _build(pretrain.PretrainConfig, _with(content, {
                    **tracking, "run_name": f"{config.name}-{data_name}-{variant}-s{seed}",
                    "data.dataset": datasets[data_name].output, "checkpoint.storage": output}), name)
                pretrain.validate(job)
                train = job.train
                runs[data_name, variant, seed] = add(Step(
                    "pretrain", name, key, output, (datasets[data_name].name,), job, cpus=pretrain.required_cpus(job),
                    tokens=train.max_steps * train.global_batch_size * datasets[data_name].job_config.seq_len,
                    facts={"dataset": data_name, "variant": variant, "seed": seed}))

    if config.windows is not None:
        sweep = config.windows
        variant = _with(base, {**section.variants[sweep.variant], "train.seed": sweep.seed, "data.seed": sweep.seed})
        needs = [datasets[sweep.dataset]]
        key = _key("tune", {"base": variant, "values": sweep.values}, needs)
        name = f"tune/{sweep.dataset}/windows"
        output = place("tune", name.removeprefix("tune/"), key)
        like = runs[sweep.dataset, sweep.variant, section.seeds_of(sweep.dataset)[0]]
        steps_per_trial = like.job_config.train.max_steps
        job = _build(tune.TuneConfig, {
            "name": f"{config.name}-windows-{key}",
            "storage": output,
            "pretrain": {"config": section.config, "overrides": {
                **section.overrides, **section.variants[sweep.variant], **tracking,
                "train.seed": sweep.seed, "data.seed": sweep.seed, "data.dataset": datasets[sweep.dataset].output}},
            # Every trial runs the whole budget: a sweep at equal tokens, not a search that stops the worst.
            "trial": {"max_steps": steps_per_trial, "eval_every": like.job_config.train.eval_every,
                      "driver_cpus": 0.5, "overrides": {}},
            "space": {"window_size": [v if v is not None else "none" for v in sweep.values], "layers": None},
            "search": {"num_samples": len(sweep.values), "max_concurrent_trials": sweep.max_concurrent_trials,
                       "points_to_evaluate": [{"window_size": v if v is not None else "none"} for v in sweep.values],
                       "study_storage": f"sqlite:///{storage.join(output, 'optuna.db')}"},
            "asha": {"grace_period": steps_per_trial},
        }, "windows")
        add(Step("tune", name, key, output, (datasets[sweep.dataset].name,), job,
                 cpus=tune.required_cpus(tune.make_plan(job)), tokens=len(sweep.values) * like.tokens,
                 facts={"dataset": sweep.dataset}))

    if config.evaluate is not None:
        section_e = config.evaluate
        trained = [runs[section_e.dataset, variant, section_e.seed] for variant in section.variants]
        models = [{"name": step.facts["variant"], "uri": pretrain.final_model_url(step.job_config)} for step in trained]
        models += [{"name": "kmer", "kind": "kmer"},
                   {"name": "untrained", "kind": "random_init", "like": section.treatment}]
        base_e = {k: v for k, v in (read_yaml(section_e.base) if section_e.base else {}).items()
                  if k not in ("models", "name", "output", "tracking")}
        content = _with(base_e, flatten(section_e.config))
        key = _key("evaluate", content, trained)  # before genome references become paths under the root
        content = _genome_references(content, generated)
        output = place("evaluations", section_e.dataset, key)
        job = _build(evaluate.EvaluateConfig, {
            "name": f"{config.name}-{key}", "output": output, **content, "models": models,
            "tracking": {"uri": config.tracking.uri, "artifact_root": config.tracking.artifact_root,
                         "experiment": config.tracking.experiment}}, "evaluate")
        add(Step("evaluate", f"evaluate/{section_e.dataset}", key, output, tuple(s.name for s in trained), job,
                 cpus=job.resources.actors * job.resources.cpus_per_actor))

    needs = [s for s in steps.values() if s.kind in ("pretrain", "tune", "evaluate")]
    key = _key("report", {"pretrain": config_to_dict(section), "negative_control":
                          config.negative_control and config_to_dict(config.negative_control)}, needs)
    add(Step("report", "report", key, place("report", config.name, key), tuple(s.name for s in needs), None, cpus=0))
    return Plan(config, root, steps)


def _genome_references(data: Any, generated: dict[str, Step]) -> Any:
    """`genomes:<set>` -> that set's first FASTA, `genomes:<set>:gff3` -> its GFF3, anywhere in `data`."""
    if isinstance(data, dict):
        return {key: _genome_references(value, generated) for key, value in data.items()}
    if isinstance(data, list):
        return [_genome_references(value, generated) for value in data]
    if isinstance(data, str) and data.startswith(GENOME_REFERENCE):
        set_name, _, what = data.removeprefix(GENOME_REFERENCE).partition(":")
        if set_name not in generated or what not in ("", "gff3"):
            raise ConfigError(f"evaluate: {data!r} names no genome set (genomes:<set> or genomes:<set>:gff3)")
        step = generated[set_name]
        first = step.facts["recipes"][0].name
        return storage.join(step.output, f"{first}.gff3.gz" if what else f"{first}.fa.gz")
    return data


def estimated_tokens(plan: Plan) -> int:
    return sum(step.tokens for step in plan)


def describe(plan: Plan, done: set[str]) -> str:
    """The plan as people read it: one line a step, what is done and what will run."""
    lines = [f"experiment {plan.config.name}: {len(plan.steps)} steps in {plan.root}"]
    for step in plan:
        state = "done" if step.name in done else "to run"
        tokens = f"{_tokens(step.tokens)} tokens" if step.tokens else ""
        lines.append(f"  {state:<7} {step.name:<40} {step.key}  {tokens}")
    todo = sum(s.tokens for s in plan if s.name not in done)
    lines.append(f"  {len(done)} done, {len(plan.steps) - len(done)} to run, "
                 f"{_tokens(todo)} of {_tokens(estimated_tokens(plan))} training tokens still to train")
    return "\n".join(lines)


def _tokens(count: int) -> str:
    return f"{count / 1e9:,.1f} B" if count >= 1e9 else f"{count / 1e6:,.1f} M"


"""Convert the authors' Megatron checkpoints of Gengram into GengramLM's exported model, and back.

    python -m jobs.convert --config jobs/configs/convert-gengram-10b.yaml checkpoint=<dir or URL> output=<dir>
    python -m jobs.convert --config jobs/configs/convert-gengram-10b.yaml checkpoint=<dir or URL> register=<name>
    python -m jobs.convert --config jobs/configs/convert-gengram-10b.yaml direction=export model=<dir> output=<dir>
    ray job submit --working-dir . -- python -m jobs.convert --config <yaml> [key=value ...]

An import reads Megatron's legacy `torch` layout (iter_<n>/mp_rank_00[_<stage>]/model_optim_rng.pt, either
layer spec) or its `torch_dist` layout, from local disk or any fsspec URL, tensor by tensor, and writes
model.pt + model_config.json, which evaluation and model.init_from take; `register=<name>` also logs it to MLflow
(`tracking`) and registers it. An export writes a GengramLM back
in the legacy layout the authors' fork loads. Nothing is written unless
the whole checkpoint maps: every missing, unknown or mis-shaped tensor is named.
"""

import sys

from jobs.common import cli
from jobs.convert import ConvertConfig, run, summary

JOB = cli.Job("jobs.convert", __doc__, ConvertConfig, run, summary)

if __name__ == "__main__":
    sys.exit(cli.main(JOB))

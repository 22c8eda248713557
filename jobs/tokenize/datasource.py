"""Ray Data's side of reading: one read task per input, so each input is read and written by one task."""

from __future__ import annotations

import functools

from ray.data import Datasource, ReadTask, read_datasource
from ray.data.block import BlockMetadata

from jobs.tokenize.plan import WorkItem


class GenomeDatasource(Datasource):
    """One read task per input; `read(item)` streams that input and yields Arrow blocks."""

    def __init__(self, items: list[WorkItem], read: functools.partial, name: str):
        self.items, self.read, self.name = items, read, name

    def get_name(self) -> str:
        return self.name

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(self.read, item),
                     BlockMetadata(num_rows=None, size_bytes=None, input_files=[item.url], exec_stats=None))
            for item in self.items
        ]


def read_dataset(items: list[WorkItem], read: functools.partial, name: str):
    # As many output blocks as inputs: Ray Data then neither splits a read task's output nor
    # separates it from a following sink, so each input is read and written by one task. The
    # sink checks it: an input's rows must arrive in order, ending with its closing row.
    dataset = read_datasource(GenomeDatasource(items, read, name), override_num_blocks=len(items))
    # Both passes are one fused operator (read -> count, or read -> write). Ray Data's per-operator
    # reservation holds back half the cluster's CPUs for operators this plan does not have: with
    # it, two inputs on two CPUs ran one at a time (benchmarks/tokenize_throughput.py: 1.26x, 1.95x without).
    dataset.context.op_resource_reservation_enabled = False
    return dataset

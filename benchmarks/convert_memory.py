"""Memory and time of `python -m jobs.convert` on a checkpoint of the gengram-10b key layout.

    .venv/bin/python benchmarks/convert_memory.py [--scale 8] [--keep DIR]

Builds GengramLM in the gengram-10b layout (12 layers, 8 experts, Gengram at 3, 6 and 10 with k = 1..6)
with hidden and FFN widths divided by --scale (1 is the real 10B: 42 GB of fp32), exports it into the
release's layout (legacy `torch`, transformer-engine names, grouped experts, two pipeline stages, bf16,
Gengram tensors in every layer as the fork writes them), then imports it back, each conversion in a
process of its own. A sampler reads the process's /proc status every 20 ms: the peak resident memory
(VmHWM, which counts the memory-mapped checkpoint pages it touched) and the peak anonymous memory
(RssAnon: what the conversion itself holds; mapped checkpoint pages are the kernel's to drop).
Printed beside the size of one fp32 copy of the model, and beside a process that only imports the job
(the interpreter and torch): a conversion that streams holds about one copy above that.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from model import GengramLM, exported, flavour

ROOT = Path(__file__).resolve().parents[1]


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measured(command: list[str]) -> dict[str, float]:
    """Run a command; its wall time, peak VmHWM and peak RssAnon (MB), sampled every 20 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}

    def sample() -> None:
        while process.poll() is None:
            try:
                for field in peaks:
                    peaks[field] = max(peaks[field], status_kb(process.pid, field))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peaks["VmHWM"] / 1024,
            "peak_anon_mb": peaks["RssAnon"] / 1024, "summary": stdout.strip().splitlines()[-1]}


def directory_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=8, help="divide hidden and FFN widths by this (1: the real 10B)")
    parser.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary directory)")
    options = parser.parse_args()
    ten_b = flavour("gengram-10b")
    config = ten_b.replace(
        hidden_size=ten_b.hidden_size // options.scale, ffn_hidden_size=ten_b.ffn_hidden_size // options.scale,
        moe_ffn_hidden_size=ten_b.moe_ffn_hidden_size // options.scale,
        gengram={"embed_dim_per_ngram": ten_b.gengram.embed_dim_per_ngram // options.scale},
    )
    with tempfile.TemporaryDirectory() as scratch:
        work = options.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = GengramLM(config)
        parameters = sum(p.numel() for p in model.parameters())
        exported.write(work / "source-model", model.state_dict(), config)
        del model
        convert = [sys.executable, "-m", "jobs.convert", "--config", "jobs/configs/convert-gengram-10b.yaml",
                   "flavour=null", "force=true"]
        baseline = measured([sys.executable, "-c", "import jobs.convert.job; print('imported')"])
        export = measured([*convert, "direction=export", f"model={work / 'source-model'}",
                           f"output={work / 'megatron'}", "export.dtype=bfloat16"])
        imported = measured([*convert, f"checkpoint={work / 'megatron'}", f"output={work / 'imported'}"])
        source = exported.read_state_dict(exported.local(work / "source-model"))
        back = exported.read_state_dict(exported.local(work / "imported"))
        same = source.keys() == back.keys() and all(torch.equal(source[k].bfloat16().float(), back[k]) for k in source)
        fp32_mb = parameters * 4 / 2**20
        print(f"gengram-10b key layout at 1/{options.scale} width: hidden {config.hidden_size}, "
              f"{parameters / 1e6:.1f} M parameters, one fp32 copy {fp32_mb:.0f} MB")
        print(f"{'step':<8}{'input MB':>10}{'output MB':>11}{'seconds':>9}{'peak RSS MB':>13}{'peak anon MB':>14}"
              f"{'anon / fp32 copy':>18}")
        print(f"{'imports':<8}{'':>10}{'':>11}{baseline['seconds']:>9.1f}{baseline['peak_rss_mb']:>13.0f}"
              f"{baseline['peak_anon_mb']:>14.0f}")
        for step, row, source, target in (("export", export, "source-model", "megatron"),
                                          ("import", imported, "megatron", "imported")):
            print(f"{step:<8}{directory_mb(work / source):>10.0f}{directory_mb(work / target):>11.0f}"
                  f"{row['seconds']:>9.1f}{row['peak_rss_mb']:>13.0f}{row['peak_anon_mb']:>14.0f}"
                  f"{row['peak_anon_mb'] / fp32_mb:>18.2f}")
        print(f"import summary: {imported['summary']}")
        print(f"export (bf16) then import reproduces every tensor of the source rounded to bf16: {same}")


if __name__ == "__main__":
    main()

"""Performance benchmarks (pytest-benchmark). Run: .venv/bin/python -m pytest benchmarks -p no:cacheprovider

Every benchmark reports a ratio measured in the same run against a plain PyTorch loop on the same
work: absolute times on a shared machine are noise.
"""

import os

os.environ.setdefault(
    "HARNESS_PLUGINS", "timm,heads,strategies,uda,dg,datasets,dg_datasets,validators,metrics"
)

# On a machine shared with other torch jobs, intra-op threads wait on each other at every kernel
# and small kernels slow down tens of times; HARNESS_BENCH_THREADS=1 keeps figures steady there.
if os.environ.get("HARNESS_BENCH_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["HARNESS_BENCH_THREADS"]))

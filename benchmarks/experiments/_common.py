"""Shared set-up of the experiment scripts: ``benchmarks/`` on the path, one thread,
freed memory retained (as ``bench_colora.py --malloc retain``), and interleaved timing
that keeps every repeat so that ratios can be taken per repeat."""
import os
import statistics
import sys
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))                 # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the checkout

import torch  # noqa: E402

import bench_colora  # noqa: E402


def setup(retain: bool = True, threads: int = 1) -> str:
    torch.set_num_threads(threads)
    kept = retain and bench_colora.retain_freed_memory()
    return f'{threads} thread(s), malloc {"retain" if kept else "default"}'


def interleaved_runs(fns: Dict[str, Callable], repeats: int,
                     warmup: int = 2) -> Dict[str, List[float]]:
    """Every callable once per repeat, in turn, on the CPU; all the times (seconds)."""
    return bench_colora.interleaved_times(fns, 'cpu', repeats, warmup)


def median_ratio(a: List[float], b: List[float]) -> float:
    """Median over repeats of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


def adapted_convnext(method: str, arch: str, trained_looking: bool = False):
    """``CoLoRAConvNeXt`` (all four stages out, layer scale 1.0 as the dense-prediction
    configs and table 1 build it: mmpretrain's default 1e-6 would hide the blocks'
    branches, and any error in them, from a comparison of outputs) with table 1's
    adapter for ``method``, seeded, its adapters reset as after loading weights;
    ``trained_looking`` fills every adapter parameter with N(0, 0.02), so that
    ``B != 0``."""
    from colora_mm.adapters import reset_adapters_from_weights
    torch.manual_seed(0)
    model = bench_colora.registry().build(dict(
        type='CoLoRAConvNeXt', arch=arch, out_indices=(0, 1, 2, 3),
        layer_scale_init_value=1.0, adapter=bench_colora.adapter_of(method)))
    reset_adapters_from_weights(model)
    if trained_looking:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if 'adapter_' in name:
                    p.normal_(0, 0.02)
    return model

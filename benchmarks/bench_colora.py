"""CoLoRA speed and memory, side by side in one run, as ratios.

    python benchmarks/bench_colora.py                        # CPU, every table
    python benchmarks/bench_colora.py --only filter deltas   # some tables
    python benchmarks/bench_colora.py --device cuda --amp    # on a GPU, fp16 autocast
    python benchmarks/bench_colora.py --only paper --amp     # CPU, bf16 autocast
    python benchmarks/bench_colora.py --only train --profile lora colora   # + profiles

Tables:

1. ``train``: one training step (data preprocessing, forward, loss, backward, AdamW
   update) of an mmseg UperNet on ``CoLoRAConvNeXt`` with full fine-tuning, the
   ``limit`` (no adapter, biases and norms only: ``method='bitfit'``, the cheapest any
   adapter method on this backbone can be), LoRA, Hugging Face peft's LoRA on the same
   layers with the same ranks (``peft-lora``; skipped when peft is not installed,
   ``pip install peft``; its output is checked against ours before timing), HiRA and
   CoLoRA; time (median of ``--repeats`` steps after warm-up) and peak memory. On
   CPU each method's memory is measured in a fresh subprocess as the growth of the
   process's peak resident set over the training steps (Linux: the peak mark
   ``VmHWM`` is reset through ``/proc/self/clear_refs`` after the model and its inputs
   are built, and read after the steps), i.e. what training adds on top of the built
   model (activations, gradients, optimiser state); on CUDA as
   ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before.
   Where glibc's heap places the blocks moves the peak RSS of fresh processes by tens
   of MiB (address randomisation, the hash seed); ``--memory-layouts N`` reads the
   median over N fixed layouts instead, the same in every run from the same
   environment. Beside it, counted from the tensors over the plain frozen model (every
   tensor the method adds: adapter parameters and buffers such as CoLoRA's partner
   offsets, gradients, optimizer state): ``live``, the peak during a step (CUDA's
   ``max_memory_allocated`` less the frozen model; on the CPU torch.profiler's memory
   timeline), and ``kept``, what one step saves for backward plus what stays between
   steps. A memory worker that fails marks its row's memory cells failed; the table's
   timings are still printed.
2. ``filter``: the range filter's separable path against its 2-D path (and the naive
   double loop of Eq. 7 on the smallest map), forward and forward + backward, on the
   compressed maps the spatial branch of a ConvNeXt-T sees at 512x512.
3. ``merge``: inference of the merged model against the plain backbone, alternating
   the two models run by run: ResNet-50 with ``use_filter=False`` (folds completely),
   ResNet-50 and ConvNeXt-T with the filter (the spatial branch stays). ConvNeXt is
   built with layer scale 1.0, as the dense-prediction configs build it, and every
   merged model must match the unmerged one to 1e-4 of the output scale.
   Below it: which training path (activation / weight) the pointwise layers took.
1b. ``paper``: training memory at the paper's size, UperNet (512 channels) +
   ConvNeXt-B, 512x512, batch 2, one step per method in a fresh process.
2. ``filter``: as below; 2b. ``spatial``: the spatial branch's 3x3 ``r -> C``
   up-projection with ``groups=r``, forward + backward: the grouped convolution against
   the package's CPU kernel (``colora_mm/adapters/up3x3.py``, on the CPU) and exact
   alternatives (unfolded taps times per-group weights, a dense block-diagonal kernel,
   repeated channels + depthwise, channels-last). The target reads the formulation the
   package selects on this device (``COLORA_MM_UP3X3``, the device, the dtype); the
   others are shown for information.
4. ``deltas``: the per-step cost of forming every weight update of the ConvNeXt-T
   backbone (each adapter's ``delta_weight``, forward and backward: the weight path),
   per method, and as a share of the training step of table 1.

Each table runs on its own: one that fails is reported and the next runs; ``--json`` is
written after every table, and the exit status is 1 when any table failed.

Ratios are taken within one run. Timings are medians (``--repeats``) after warm-up;
use ``--threads`` to pin the thread count (``torch.get_num_threads()`` otherwise).
On the CPU the timed process keeps the memory it frees (``--malloc retain``, see
:func:`retain_freed_memory`); ``--malloc default`` times with glibc as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ('full', 'limit', 'lora', 'peft-lora', 'hira', 'colora')
#: Extra rows of table 1 that attribute the cost: CoLoRA without the range filter, the
#: correlated pairs alone (no spatial branch), and LoRA / CoLoRA forced onto the weight
#: path (every update formed as ``W + dW``) or the activation path.
#: CoLoRA as the paper-reproduction configs set it (gamma 16, share 0.5, filter on,
#: spatial rank C // 32).
COLORA = dict(method='colora', gamma=16, spatial_gamma=32)
BREAKDOWN = {'colora-nofilter': dict(COLORA, use_filter=False),
             'colora-pairs': dict(COLORA, spatial=False),
             'lora-weight': dict(method='lora', train_path='weight'),
             'colora-weight': dict(COLORA, train_path='weight')}
#: Rows run only where ``--methods`` names them: CoLoRA with ``partner_policy='frozen'``
#: (the partners are the base weights themselves: no partner offsets are kept from one
#: step to the next, and the pairs' backward reads none).
OPTIONAL = {'colora-frozen': dict(COLORA, partner_policy='frozen')}
#: Rows that are the same backbone without adapters (peft's LoRA is injected later).
ALIASES = {'limit': dict(method='bitfit'), 'peft-lora': dict(method='bitfit'),
           'colora': COLORA}
#: Methods of the memory table at the paper's size.
PAPER_METHODS = ('full', 'limit', 'lora', 'peft-lora', 'colora')


def adapter_of(name: str) -> dict:
    return dict(BREAKDOWN.get(name) or OPTIONAL.get(name) or ALIASES.get(name)
                or dict(method=name))


def known_rows() -> List[str]:
    """Every row name ``--methods`` takes: the tables' rows and the package's methods."""
    from colora_mm.adapters.inject import METHODS as SPEC_METHODS
    rows = list(METHODS) + list(BREAKDOWN) + list(OPTIONAL)
    return rows + [m for m in SPEC_METHODS if m not in rows]


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def pointwise_ranks(model: nn.Module, gamma: int = 20) -> Dict[str, int]:
    """The backbone's pointwise layers and the rank our LoRA gives each,
    ``min(in, out) // gamma``."""
    ranks = {}
    for name, m in model.named_modules():
        if name.startswith('backbone.') and name.endswith(
                ('pointwise_conv1', 'pointwise_conv2')) and isinstance(m, nn.Linear):
            ranks[name] = min(m.in_features, m.out_features) // gamma
    return ranks


def _tail(name: str) -> str:
    import re
    return re.escape(name.split('.', 1)[1])


def inject_peft_lora(model: nn.Module, gamma: int = 20, scaling: float = 2.0) -> None:
    """Hugging Face peft's LoRA on the same layers, ranks and ``alpha / r`` as ours; the
    trainable set stays the package's (biases, norms, heads) plus peft's factors."""
    from peft import LoraConfig, inject_adapter_in_model
    ranks = pointwise_ranks(model, gamma)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = LoraConfig(r=min(ranks.values()), lora_alpha=scaling * min(ranks.values()),
                     target_modules=list(ranks), lora_dropout=0.0, bias='none',
                     # peft matches a pattern against the tail of a module's name
                     rank_pattern={_tail(k): v for k, v in ranks.items()},
                     alpha_pattern={_tail(k): scaling * v for k, v in ranks.items()})
    inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_('lora_' in n or n.replace('.base_layer', '') in trainable)


@torch.no_grad()
def check_peft_against_ours(args) -> float:
    """Our LoRA and peft's with the same weights and factors (B != 0): the largest
    difference of the backbone outputs. Raises when they disagree by more than 1e-5 of
    the output scale."""
    torch.manual_seed(0)
    ours = registry().build(upernet_cfg('lora', args.arch, 64, 16)).eval()
    theirs = registry().build(upernet_cfg('limit', args.arch, 64, 16)).eval()
    inject_peft_lora(theirs)
    for name, p in ours.named_parameters():
        if 'adapter_' in name:
            p.normal_(0, 0.02)
    sd = ours.state_dict()
    mapped = {}
    for name in theirs.state_dict():
        key = (name.replace('.base_layer', '')
               .replace('.lora_A.default.weight', '.adapter_branch.A')
               .replace('.lora_B.default.weight', '.adapter_branch.B'))
        mapped[name] = sd[key]
    theirs.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 3, 64, 64)
    mine, peft_out = ours.backbone(x), theirs.backbone(x)
    diff = max((a - b).abs().max().item() for a, b in zip(mine, peft_out))
    rel = relative_error(peft_out, mine)
    if not rel <= 1e-5:
        raise AssertionError(f'peft LoRA differs from ours by {diff:.2e} ({rel:.1e} of '
                             'the output scale)')
    return diff


# ---------------------------------------------------------------------- helpers
def exact_fp32():
    """fp32 without TF32 for the equality checks (the timings keep PyTorch's defaults)."""
    from colora_mm.adapters.base import exact_fp32 as context
    return context()


def relative_error(a, b) -> float:
    """``max |a - b| / max |b|`` of one tensor, or the largest such ratio over matching
    sequences of them (each output against its own scale): an error measured against the
    output's scale, so that a check's tolerance means the same whatever the scale."""
    if torch.is_tensor(a):
        a, b = [a], [b]
    worst = 0.0
    for x, y in zip(a, b):
        diff, scale = (x - y).abs().max().item(), y.abs().max().item()
        worst = max(worst, diff / scale if scale else diff)
    return worst


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def timeit(fn: Callable, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def retain_freed_memory() -> bool:
    """Make glibc keep what the process frees (``--malloc retain``, the CPU default):
    no block is served by its own ``mmap`` (``M_MMAP_MAX`` 0) and the heap is never
    trimmed (``M_TRIM_THRESHOLD`` at its maximum). With glibc's defaults the tensors of
    one step are returned to the kernel and faulted in again the next step (about
    190k minor page faults per step of table 1, 10-15% of its time, varying from run to
    run); kept, the CPU behaves as PyTorch's CUDA caching allocator does, and as
    jemalloc or tcmalloc would. Returns False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def fix_mmap_threshold(nbytes: int) -> bool:
    """``--memory-mmap-threshold``: every block of ``nbytes`` or more gets its own
    ``mmap`` and goes back to the kernel when freed (glibc's ``M_MMAP_THRESHOLD``; set
    explicitly, it also stops glibc from raising the threshold by itself). With glibc's
    defaults the threshold starts at 128 KiB and rises to the size of each larger block
    freed, up to 32 MiB: from then on every tensor below that size comes from the heap,
    where a freed block between two live ones stays resident (peak RSS = live tensors +
    the heap's holes). Returns False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, int(nbytes)))


#: Allocators that replace glibc's malloc when preloaded (``LD_PRELOAD``), by the name
#: their library starts with after ``lib``.
PRELOADABLE_ALLOCATORS = ('jemalloc', 'tcmalloc', 'mimalloc')


def preloaded_allocator(maps: Optional[str] = None) -> Optional[str]:
    """The allocator preloaded in place of glibc's malloc
    (``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python ...``), read from
    the files this process maps (``/proc/self/maps``, or the text ``maps``); None when
    malloc is glibc's own. The memory workers inherit the preload, so their peak RSS is
    that allocator's."""
    if maps is None:
        try:
            with open('/proc/self/maps') as f:
                maps = f.read()
        except OSError:
            return None
    for line in maps.splitlines():
        fields = line.split()
        name = os.path.basename(fields[5]) if len(fields) >= 6 else ''
        for allocator in PRELOADABLE_ALLOCATORS:
            if name.startswith(f'lib{allocator}'):
                return allocator
    return None


def malloc_policy(args) -> str:
    """How the memory workers' C library allocates, for the table headers."""
    allocator = preloaded_allocator()
    if allocator:
        return f"{allocator} preloaded in place of glibc's malloc"
    if args.memory_mmap_threshold:
        return f'glibc mmap threshold fixed at {args.memory_mmap_threshold / 2 ** 20:g} MiB'
    return "glibc's defaults"


def rss_label(args) -> str:
    """The name of the first memory measure in the target lines."""
    if args.device == 'cuda':
        return 'max_memory_allocated'
    allocator = preloaded_allocator()
    if allocator:
        return f'peak RSS, {allocator}'
    if args.memory_mmap_threshold:
        return f'peak RSS, mmap threshold {args.memory_mmap_threshold / 2 ** 20:g} MiB'
    return 'peak RSS'


def heap_state() -> dict:
    """glibc's heap after the steps (``mallinfo2``): its size, how much of it is free
    but resident (holes between live blocks), and the bytes in blocks mapped on their
    own; empty where unavailable or where a preloaded allocator replaces glibc's malloc
    (glibc's heap is then unused)."""
    import ctypes
    if preloaded_allocator():
        return {}

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
            'uordblks', 'fordblks', 'keepcost')]
    try:
        fn = ctypes.CDLL('libc.so.6').mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = MallInfo2
    info = fn()
    return dict(heap=info.arena, heap_free=info.fordblks, mapped=info.hblkhd)


def minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(fns: Dict[str, Callable], device: str, repeats: int,
                warmup: int = 2) -> Dict[str, float]:
    """Median times of several callables run in turn (A B A B ...), so that a change
    in machine load hits all of them alike."""
    times = interleaved_times(fns, device, repeats, warmup)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_times(fns: Dict[str, Callable], device: str, repeats: int,
                      warmup: int = 2) -> Dict[str, List[float]]:
    """Every time (seconds) of several callables run in turn, one list per callable."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def machine(device: str) -> str:
    if device == 'cuda':
        return f'{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'


def table(title: str, header: List[str], rows: List[List[str]]) -> None:
    print(f'\n{title}')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


def registry():
    import colora_mm.models  # noqa: F401  (registers CoLoRAConvNeXt / CoLoRAResNet)
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    return MODELS


# ---------------------------------------------------------------------- 1. train step
def upernet_cfg(method: str, arch: str, size: int, channels: int) -> dict:
    """mmseg's UperNet-ConvNeXt (upernet_convnext.py) with CoLoRAConvNeXt, BN instead of
    SyncBN, ``channels`` in the heads, 150 classes, no pretrained weights."""
    dims = dict(atto=40, femto=48, pico=64, nano=80, tiny=96, small=96, base=128)[arch]
    in_channels = [dims, dims * 2, dims * 4, dims * 8]
    norm_cfg = dict(type='BN', requires_grad=True)
    adapter = adapter_of(method)
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(size, size)),
        backbone=dict(type='CoLoRAConvNeXt', arch=arch, out_indices=[0, 1, 2, 3],
                      drop_path_rate=0.0, layer_scale_init_value=1.0,
                      gap_before_final_norm=False, adapter=adapter),
        decode_head=dict(type='UPerHead', in_channels=in_channels, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=channels, dropout_ratio=0.1,
                         num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                          loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=in_channels[2], in_index=2,
                            channels=channels // 2, num_convs=1, concat_input=False,
                            dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                            align_corners=False,
                            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                             loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


def make_batch(batch: int, size: int, seed: int = 0) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size), generator=g))
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                            pad_shape=(size, size)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def build_trainer(method: str, args) -> tuple:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from colora_mm.adapters import reset_adapters_from_weights
    torch.manual_seed(0)
    model = registry().build(upernet_cfg(method, args.arch, args.size, args.head_channels))
    reset_adapters_from_weights(model)          # what init_weights() does after loading
    if method == 'peft-lora':
        inject_peft_lora(model)
    model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    if args.amp and args.device == 'cuda':
        wrapper = AmpOptimWrapper(optimizer=optimizer, loss_scale='dynamic')
    elif args.amp:
        wrapper = cpu_autocast_wrapper(optimizer)
    else:
        wrapper = OptimWrapper(optimizer=optimizer)
    data = make_batch(args.batch, args.size)
    step = lambda: model.train_step(data, wrapper)  # noqa: E731
    step.optimizer = optimizer
    trainable = sum(p.numel() for p in params)
    return model, step, trainable


def amp_label(args) -> str:
    """The training precision a table ran in."""
    if not args.amp:
        return 'fp32'
    return 'AMP fp16' if args.device == 'cuda' else 'AMP bf16 (CPU autocast)'


def cpu_autocast_wrapper(optimizer: torch.optim.Optimizer):
    """mmengine's ``OptimWrapper`` with the forward pass and the losses under the CPU's
    bfloat16 autocast: what ``AmpOptimWrapper`` does on a GPU (mmengine allows it on
    GPUs only), without loss scaling (bfloat16 has float32's range). On the CPU it
    makes the memory tables count what a GPU step under autocast keeps: the same
    low-precision copies, in a dtype of the same size."""
    from mmengine.optim import OptimWrapper

    class CPUAutocastOptimWrapper(OptimWrapper):

        @contextlib.contextmanager
        def optim_context(self, model: nn.Module):
            with super().optim_context(model), \
                    torch.autocast('cpu', dtype=torch.bfloat16):
                yield

    return CPUAutocastOptimWrapper(optimizer=optimizer)


def _proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field}')


def memory_worker(method: str, args) -> None:
    """Run in a fresh process: peak memory that training steps add."""
    if args.device == 'cpu':
        # glibc keeps freed blocks of the build in its arenas; without this the
        # built model's temporaries would count as training memory.
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        if args.memory_mmap_threshold and not fix_mmap_threshold(args.memory_mmap_threshold):
            raise SystemExit('error: --memory-mmap-threshold: this C library has no '
                             'mallopt; leave the option out (glibc\'s defaults).')
    model, step, trainable = build_trainer(method, args)
    if args.device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        at_start = tensor_snapshot(model, step.optimizer)
        for _ in range(args.memory_steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out = dict(delta=peak - before, peak=peak, kind='torch.cuda.max_memory_allocated growth (the steps\' peak after a '
                                     'reset, less what was allocated before them)')
    else:
        # Reset the kernel's peak-RSS mark (VmHWM) so that only the training steps
        # count: building the model can peak higher than training a small one.
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        before = _proc_status_kib('VmRSS') * 1024
        for _ in range(args.memory_steps):
            step()
        peak = _proc_status_kib('VmHWM') * 1024
        out = dict(delta=peak - before, peak=peak,
                   kind=f'peak RSS growth (VmHWM after reset, Linux; {malloc_policy(args)})')
        out.update(heap_state())
    out.update(autograd_memory(model, step))
    if args.device == 'cpu':
        at_start = tensor_snapshot(model, step.optimizer)
        growth = live_growth(step)
    else:
        growth = out['delta']
    after = tensor_snapshot(model, step.optimizer)
    # named last: building the plain model earlier would change the heap the peak RSS
    # is read from
    frozen = plain_tensor_names(args)
    start, end = added_memory(at_start, frozen), added_memory(after, frozen)
    grads = sum(p.numel() * p.element_size() for p in model.parameters()
                if p.requires_grad)
    # live: the step's peak over what was live before it, plus what the method held
    # before it beyond the plain frozen model (its tensors, any gradients, the optimizer
    # state): the peak over the frozen model, as CUDA's max_memory_allocated would read
    # it less the frozen model's bytes
    out['live'] = int(growth + start['adapter'] + start['grads'] + start['optimizer'])
    # kept: what one step saves for backward, and what the method holds from one step to
    # the next (its own tensors, the gradients, the optimizer state)
    out.update(state=grads + end['optimizer'], adapter=end['adapter'],
               offsets=end['offsets'], optimizer=end['optimizer'])
    out['kept'] = out['saved'] + out['state'] + out['adapter']
    out['precision'] = amp_label(args)
    print('MEMORY ' + json.dumps(out))


def tensor_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Where the model's parameters and buffers, their gradients and the optimizer's
    state are now, as ``(storage address, storage bytes)``, the first two by name (the
    tensors themselves are not held: a snapshot keeps nothing alive)."""
    def where(t: torch.Tensor) -> Tuple[int, int]:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()

    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False))
    return dict(
        tensors=[(name, *where(t)) for name, t in named],
        grads=[where(p.grad) for p in model.parameters() if p.grad is not None],
        optimizer=[where(t) for s in optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t)])


def plain_tensor_names(args) -> set:
    """The parameter and buffer names of the plain frozen model of table 1 (the same
    UperNet, its backbone without adapters)."""
    torch.manual_seed(0)
    plain = registry().build(upernet_cfg('full', args.arch, args.size, args.head_channels))
    return {name for name, _ in list(plain.named_parameters()) + list(plain.named_buffers())}


def added_memory(snapshot: dict, frozen: set) -> dict:
    """Bytes of the distinct storages a method holds beyond the plain frozen model, from
    a :func:`tensor_snapshot`: ``adapter``, its parameters and buffers whose names the
    plain model lacks (adapter factors, CoLoRA's partner offsets, PiSSA's flags; peft's
    wrapped layers' ``base_layer`` is the frozen layer); ``offsets``, the partner
    offsets among them; ``grads``; ``optimizer``, the optimizer's state."""
    from colora_mm.adapters.colora_pair import OFFSET_NAMES
    offset_names = {n for pair in OFFSET_NAMES for n in pair}
    plain = {ptr for name, ptr, _ in snapshot['tensors']
             if name.replace('.base_layer', '') in frozen}
    adapter: Dict[int, int] = {}
    offsets: Dict[int, int] = {}
    for name, ptr, nbytes in snapshot['tensors']:
        if name.replace('.base_layer', '') in frozen or ptr in plain or not nbytes:
            continue
        adapter[ptr] = nbytes
        if name.rsplit('.', 1)[-1] in offset_names:
            offsets[ptr] = nbytes
    grads = {ptr: n for ptr, n in snapshot['grads'] if ptr not in plain and ptr not in adapter}
    state = {ptr: n for ptr, n in snapshot['optimizer']
             if ptr not in plain and ptr not in adapter}
    return dict(adapter=sum(adapter.values()), offsets=sum(offsets.values()),
                grads=sum(grads.values()), optimizer=sum(state.values()))


def live_growth(step: Callable) -> int:
    """The CPU counterpart of CUDA's ``max_memory_allocated`` growth in one training
    step: the peak of the bytes held by live tensors during the step (torch.profiler's
    memory timeline) less those live before it."""
    import tempfile
    import warnings
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        path = os.path.join(tmp, 'timeline.json')
        prof.export_memory_timeline(path, device='cpu')
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(s) for s in sizes]
    return int(max(totals) - totals[0])


def autograd_memory(model: nn.Module, step: Callable) -> dict:
    """``saved``: the bytes of the distinct storages autograd saves for backward in one
    training step, counted from the tensors rather than the allocator; parameters and
    buffers (before or after the step: CoLoRA's new partner offsets are formed in the
    step) are left out, as they are counted on their own."""
    def storages() -> set:
        return {t.untyped_storage().data_ptr() for t in
                list(model.parameters()) + list(model.buffers())}

    fixed = storages()
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in fixed:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    fixed = storages()
    return dict(saved=sum(n for ptr, n in seen.items() if ptr not in fixed))


@functools.lru_cache(maxsize=None)
def layout_off_prefix() -> Tuple[str, ...]:
    """The command prefix that starts a process with address-space randomisation off
    (util-linux's ``setarch -R``), or () where that is refused or missing (asked once
    per process)."""
    prefix = ('setarch', platform.machine(), '-R')
    try:
        ok = subprocess.run([*prefix, 'true'], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return prefix if ok else ()


def measure_memory(method: str, args) -> dict:
    """One memory worker for ``method`` in a fresh process; with ``--memory-layouts
    N``, N of them, each with address randomisation off and ``PYTHONHASHSEED`` 0..N-1
    (a fixed heap layout each, the same in every run from the same command line and
    environment variables, whose size moves the stack and with it the layout), and the
    median of their peak RSS growth as the row's (``deltas``: each one's)."""
    if not getattr(args, 'memory_layouts', 0):
        return memory_worker_run(method, args)
    runs = [memory_worker_run(method, args, seed) for seed in range(args.memory_layouts)]
    deltas = [r['delta'] for r in runs]
    median = statistics.median(deltas)
    out = dict(min(runs, key=lambda r: abs(r['delta'] - median)))
    out.update(delta=median, deltas=deltas,
               kind=f'{out["kind"]}, median of {len(runs)} fixed heap layouts '
                    f'(address randomisation off, PYTHONHASHSEED 0-{len(runs) - 1})')
    return out


def print_layouts(memory: Dict[str, dict]) -> None:
    """Each fixed layout's peak RSS growth per row, and CoLoRA's saving in each (the
    rows' values of the same seed), beside the medians the table reads."""
    if not memory or not all('deltas' in v for v in memory.values()):
        return
    print('(peak RSS growth per fixed heap layout, PYTHONHASHSEED 0, 1, ..., MiB: '
          + '; '.join(f'{m} ' + ', '.join(f'{d / 2 ** 20:.0f}' for d in v['deltas'])
                      for m, v in memory.items()) + ')')
    if all(m in memory for m in ('full', 'limit', 'colora')):
        per_seed = [(f - c) / (f - lim) for f, lim, c in zip(
            memory['full']['deltas'], memory['limit']['deltas'], memory['colora']['deltas'])]
        print('(CoLoRA\'s saving / the limit\'s per layout: '
              + ', '.join(f'{x:.3f}' for x in per_seed) + ')')


def memory_worker_run(method: str, args, seed: Optional[int] = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', method,
           '--device', args.device, '--arch', args.arch, '--size', str(args.size),
           '--batch', str(args.batch), '--head-channels', str(args.head_channels),
           '--memory-steps', str(args.memory_steps)]
    if args.memory_mmap_threshold:
        cmd += ['--memory-mmap-threshold', str(args.memory_mmap_threshold)]
    if args.amp:
        cmd.append('--amp')
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    env = None
    if seed is not None:
        prefix = layout_off_prefix()
        if not prefix:
            raise RuntimeError('a fixed heap layout needs `setarch -R` (address '
                               'randomisation off), which this system refuses or lacks')
        cmd = [*prefix, *cmd]
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith('MEMORY '):
            return json.loads(line[len('MEMORY '):])
    raise MemoryWorkerError(method, res.returncode, res.stderr)


class MemoryWorkerError(RuntimeError):
    """A memory worker that ended without its numbers; ``reason`` is one line (the
    error's last line, or the signal that ended the process)."""

    def __init__(self, method: str, returncode: int, stderr: str):
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        if returncode < 0:
            import signal
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f'signal {-returncode}'
            reason = f'killed by {name}' + (' (out of memory?)' if name == 'SIGKILL' else '')
        else:
            reason = lines[-1] if lines else f'exit status {returncode}, no output'
        self.method, self.reason = method, reason[:300]
        super().__init__(f'memory worker for {method} failed ({self.reason}):\n'
                         f'{stderr[-3000:]}')


def measure_rows(names: List[str], args) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """Each row's memory worker: the rows measured, and ``{row: reason}`` for those
    whose worker failed (reported, the others still measured)."""
    memory, failed = {}, {}
    for m in names:
        try:
            memory[m] = measure_memory(m, args)
        except MemoryWorkerError as err:
            failed[m] = err.reason
            print(f'(memory worker for {m} failed: {err.reason})', file=sys.stderr)
            sys.stderr.write(str(err)[-3000:] + '\n')
    return memory, failed


def available(names: List[str]) -> List[str]:
    if 'peft-lora' in names and not have_peft():
        print('\n(peft is not installed: the peft-lora rows are skipped; '
              '`pip install peft` adds them)')
        names = [n for n in names if n != 'peft-lora']
    return names


def path_summary(model: nn.Module) -> str:
    """Which path the pointwise layers took in the last step, per stage."""
    from colora_mm.adapters import iter_adapted_layers
    stages: Dict[str, Dict[str, int]] = {}
    for name, layer in iter_adapted_layers(model):
        if layer.last_path is None:
            continue
        stage = name.split('stages.', 1)[1].split('.', 1)[0] if 'stages.' in name else '-'
        count = stages.setdefault(stage, {})
        count[layer.last_path] = count.get(layer.last_path, 0) + 1
    return ', '.join(f'stage {s}: ' + ' + '.join(f'{n} {p}' for p, n in sorted(c.items()))
                     for s, c in sorted(stages.items()))


def bench_train(args, results: dict) -> None:
    names = args.methods or list(METHODS) + ([] if args.no_breakdown else list(BREAKDOWN))
    names = available(names)
    missing = [m for m in ('full', 'limit', 'lora') if m not in names]
    if missing:
        raise SystemExit(f'error: table 1 needs the rows {missing} (its ratios); add them '
                         'to --methods.')
    if 'peft-lora' in names:
        diff = check_peft_against_ours(args)
        print(f'\npeft LoRA against ours, same weights and factors: max |diff| of the '
              f'backbone outputs {diff:.1e}')
        results['peft_check_max_abs_diff'] = diff
    steps, trainables, paths = {}, {}, {}
    models = {}
    for method in names:
        models[method], steps[method], trainables[method] = build_trainer(method, args)
    faults = minor_faults()
    rounds = interleaved_times(steps, args.device, args.repeats, warmup=1)
    times = {k: statistics.median(v) for k, v in rounds.items()}
    faults = (minor_faults() - faults) / ((args.repeats + 1) * len(steps))
    for method in names:
        paths[method] = path_summary(models[method])
    results['train_step_s'] = times
    results['train_minor_faults_per_step'] = faults
    results['train_paths'] = paths
    del steps, models
    memory, failed = measure_rows(names, args)
    results['train_memory'] = memory
    if failed:
        results['train_memory_failed'] = failed
    full_t, lora_t, limit_t = times['full'], times['lora'], times['limit']
    rows = []
    for m in names:
        rows.append([m, f'{trainables[m] / 1e6:.2f}M', f'{times[m] * 1e3:.0f}',
                     f'{times[m] / full_t:.2f}', f'{times[m] / limit_t:.2f}',
                     f'{times[m] / lora_t:.2f}'] + memory_cells(memory, failed, m))
    kind = next(iter(memory.values()))['kind'] if memory else 'no memory worker finished'
    table(f'1. Training step, UperNet + CoLoRAConvNeXt-{args.arch} (head channels '
          f'{args.head_channels}), batch {args.batch} x {args.size}x{args.size}, '
          f'{amp_label(args)}; memory: {kind}, '
          'fresh process per method; saving = (full - method) / (full - limit)',
          ['method', 'trainable', 'step ms', 'vs full', 'vs limit', 'vs LoRA',
           'train mem MiB', 'mem vs full', 'saving vs limit', 'live MiB',
           'live saving vs limit', 'kept MiB', 'kept saving vs limit'], rows)
    print(memory_note(args))
    print_failed_workers(failed)
    print_adapter_state(memory)
    if args.device == 'cpu':
        print(f'(timed steps: {faults:.0f} minor page faults per step, '
              f'malloc {args.malloc})')
        print_heap_holes(memory)
        print_layouts(memory)
    print('\nTraining path of the pointwise layers in the timed steps:')
    for m in names:
        if paths[m]:
            print(f'  {m}: {paths[m]}')
    checks = [('LoRA step / limit step', lora_t / limit_t, '<=', 1.10)]
    if 'colora' in names:
        checks += [('CoLoRA step / limit step', times['colora'] / limit_t, '<=', 1.20),
                   ('CoLoRA step / LoRA step', times['colora'] / lora_t, '<=', 1.10),
                   (f'CoLoRA memory saving / limit saving ({rss_label(args)})',
                    saving(memory, 'delta', 'colora'), '>=', 0.90),
                   ('CoLoRA memory saving / limit saving (peak live tensors)',
                    saving(memory, 'live', 'colora'), '>=', 0.90),
                   ('CoLoRA memory saving / limit saving (kept tensors)',
                    saving(memory, 'kept', 'colora'), '>=', 0.90)]
    if 'peft-lora' in names:
        checks += [('our LoRA / peft LoRA, step time', lora_t / times['peft-lora'], '<=',
                    1.00),
                   (f'our LoRA / peft LoRA, training memory ({rss_label(args)})',
                    ratio(memory, 'delta', 'lora', 'peft-lora'), '<=', 1.00),
                   ('our LoRA / peft LoRA, training memory (peak live tensors)',
                    ratio(memory, 'live', 'lora', 'peft-lora'), '<=', 1.00),
                   ('our LoRA / peft LoRA, training memory (kept tensors)',
                    ratio(memory, 'kept', 'lora', 'peft-lora'), '<=', 1.00)]
    results['train_targets'] = report_targets(checks)
    results['train_round_ratios'] = report_round_ratios(rounds)
    if failed:
        raise RuntimeError('table 1: the memory workers of ' + ', '.join(failed)
                           + ' failed (the timings above are complete)')


def ratio(memory: Dict[str, dict], key: str, a: str, b: str) -> Optional[float]:
    """``memory[a][key] / memory[b][key]``; None where either row was not measured."""
    if a not in memory or b not in memory:
        return None
    return memory[a][key] / memory[b][key] if memory[b][key] else float('nan')


def saving(memory: Dict[str, dict], key: str, m: str) -> Optional[float]:
    """``(full - m) / (full - limit)`` of ``memory[.][key]``; None where a row it needs
    was not measured."""
    if any(r not in memory for r in ('full', 'limit', m)):
        return None
    span = memory['full'][key] - memory['limit'][key]
    return (memory['full'][key] - memory[m][key]) / span if span else float('nan')


def memory_cells(memory: Dict[str, dict], failed: Dict[str, str], m: str) -> List[str]:
    """A row's memory columns: train mem MiB, vs full, saving vs limit, live MiB, its
    saving, kept MiB, its saving; 'failed' where the row's worker failed, '-' for a ratio
    whose other row's did."""
    if m not in memory:
        return ['failed'] * 7

    def fmt(x):
        return '-' if x is None else f'{x:.2f}'
    v = memory[m]
    return [f'{v["delta"] / 2 ** 20:.0f}', fmt(ratio(memory, 'delta', m, 'full')),
            fmt(saving(memory, 'delta', m)), f'{v["live"] / 2 ** 20:.0f}',
            fmt(saving(memory, 'live', m)), f'{v["kept"] / 2 ** 20:.0f}',
            fmt(saving(memory, 'kept', m))]


def memory_note(args) -> str:
    """What the memory columns of tables 1 and 1b measure, on this device."""
    if args.device == 'cuda':
        train = ('train mem = torch.cuda.max_memory_allocated over the steps (peak after '
                 'a reset) less what was allocated before them (the built model and its '
                 'adapters)')
        live = ('live = the same peak less the plain frozen model\'s bytes (train mem + '
                'the adapter tensors that existed before the steps)')
    else:
        train = 'train mem = the allocator\'s view, the peak RSS growth over the steps'
        live = ('live = peak bytes of live tensors during a step (torch.profiler\'s '
                'memory timeline) over the plain frozen model: the step\'s growth + what '
                'the method held before it (adapter parameters and buffers, optimizer '
                'state), the CPU counterpart of CUDA\'s max_memory_allocated')
    return (f'({train}; {live}; kept = tensors autograd saves for backward in one step '
            '+ gradients of the trainable parameters + the optimizer state + the adapter '
            'parameters and buffers (CoLoRA\'s partner offsets, PiSSA\'s flags), counted '
            'from the tensors; every method is counted over the same plain frozen model)')


def print_failed_workers(failed: Dict[str, str]) -> None:
    if failed:
        print('(memory columns failed: ' + '; '.join(f'{m}: {reason}' for m, reason
                                                      in failed.items()) + ')')


def print_adapter_state(memory: Dict[str, dict]) -> None:
    """The tensors each method holds beyond the plain frozen model between steps."""
    parts = []
    for m, v in memory.items():
        if 'adapter' in v:
            part = (f'{m} {v["adapter"] / 2 ** 20:.2f} + optimizer '
                    f'{v["optimizer"] / 2 ** 20:.2f}')
            if v.get('offsets'):
                part += f' (partner offsets {v["offsets"] / 2 ** 20:.2f})'
            parts.append(part)
    if parts:
        print('(held beyond the frozen model after the steps, MiB, adapter parameters and '
              'buffers + optimizer state: ' + '; '.join(parts) + ')')


def report_round_ratios(rounds: Dict[str, List[float]]) -> dict:
    """The step-time ratios of the targets round by round (the methods ran in turn in
    every round): their spread shows how far this run's machine noise reaches, beside
    the ratio of the medians that the targets read."""
    pairs = [('colora', 'lora'), ('colora', 'limit'), ('lora', 'limit'),
             ('lora', 'peft-lora')]
    out = {}
    lines = []
    for a, b in pairs:
        if a in rounds and b in rounds:
            ratios = sorted(x / y for x, y in zip(rounds[a], rounds[b]))
            out[f'{a}/{b}'] = ratios
            lines.append(f'{a} / {b} {ratios[0]:.3f}-{ratios[-1]:.3f} '
                         f'(median {statistics.median(ratios):.3f})')
    if lines:
        print(f'Step-time ratios round by round ({len(next(iter(rounds.values())))} '
              'rounds; the targets read the ratio of the medians): ' + '; '.join(lines))
    return out


def print_heap_holes(memory: Dict[str, dict]) -> None:
    """The memory workers' glibc heap after their steps: its size and the part of it
    that is free but resident (what the peak RSS holds beyond the live tensors)."""
    if memory and all('heap' in v for v in memory.values()):
        print('(memory workers, glibc heap after the steps, MiB size / free inside: '
              + ', '.join(f'{m} {v["heap"] / 2 ** 20:.0f} / {v["heap_free"] / 2 ** 20:.0f}'
                          for m, v in memory.items()) + ')')


def report_targets(checks) -> list:
    """Print each target and whether it is met; a value of None was not measured (a
    memory worker failed): printed so, and neither met nor missed."""
    print('\nTargets:')
    out = []
    for name, value, op, target in checks:
        if value is None:
            print(f'  {name}: not measured (target {op} {target:.2f})')
            out.append(dict(measure=name, value=None, target=f'{op} {target}', met=None))
            continue
        met = value <= target if op == '<=' else value >= target
        print(f'  {name}: {value:.3f} (target {op} {target:.2f}) '
              f'{"met" if met else "MISSED"}')
        out.append(dict(measure=name, value=value, target=f'{op} {target}', met=met))
    return out


def bench_paper(args, results: dict) -> None:
    """Training memory at the paper's size, one step per method in a fresh process."""
    paper = copy.copy(args)
    paper.arch, paper.size, paper.batch = 'base', 512, 2
    paper.head_channels, paper.memory_steps = 512, 1
    names = available([m for m in (args.methods or PAPER_METHODS) if m in PAPER_METHODS
                       or m in BREAKDOWN or m in OPTIONAL])
    for m in ('full', 'limit', 'colora'):
        if m not in names:
            raise SystemExit(f'error: table 1b needs the row {m!r}; add it to --methods.')
    memory, failed = measure_rows(names, paper)
    results['paper_memory'] = memory
    if failed:
        results['paper_memory_failed'] = failed
    rows = [[m] + memory_cells(memory, failed, m)[:7] for m in names]
    kind = next(iter(memory.values()))['kind'] if memory else 'no memory worker finished'
    # The one step is the first: AdamW creates its moments in it after the step's
    # activations are freed, so the peak of the allocator's column holds no moments.
    table('1b. Training memory at the paper\'s size: UperNet (512 channels) + '
          f'ConvNeXt-B, batch 2 x 512x512, one step, {amp_label(args)}; {kind}',
          ['method', 'train mem MiB, step 1', 'mem vs full', 'saving vs limit',
           'live MiB', 'live saving vs limit', 'kept MiB', 'kept saving vs limit'], rows)
    later = ('a later step of the same process (the optimizer state exists then)'
             if args.device == 'cpu' else 'step 1, as train mem')
    print('(one step per process: train mem is the peak of step 1, the step in which '
          'AdamW creates its moments, after that step\'s activations are freed, so that '
          'peak holds no moments (later steps\' would); live is read in '
          f'{later}; kept counts the moments)')
    print(memory_note(args))
    print_failed_workers(failed)
    print_adapter_state(memory)
    if args.device == 'cpu':
        print_heap_holes(memory)
        print_layouts(memory)
    results['paper_targets'] = report_targets([
        (f'CoLoRA memory saving / limit saving (ConvNeXt-B 512x512, {rss_label(args)}, '
         'step 1)', saving(memory, 'delta', 'colora'), '>=', 0.90),
        ('CoLoRA memory saving / limit saving (ConvNeXt-B 512x512, peak live tensors)',
         saving(memory, 'live', 'colora'), '>=', 0.90),
        ('CoLoRA memory saving / limit saving (ConvNeXt-B 512x512, kept tensors)',
         saving(memory, 'kept', 'colora'), '>=', 0.90)])
    if failed:
        raise RuntimeError('table 1b: the memory workers of ' + ', '.join(failed)
                           + ' failed')


def bench_profile(args, results: dict) -> None:
    """torch.profiler tables of one training step per method (self time per op)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if args.device == 'cuda' else [])
    sort = 'self_cuda_time_total' if args.device == 'cuda' else 'self_cpu_time_total'
    for method in args.profile:
        model, step, _ = build_trainer(method, args)
        step()
        step()
        sync(args.device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            step()
            sync(args.device)
        wall = time.perf_counter() - t0
        averages = prof.key_averages()
        print(f'\nProfile of one training step, {method} (top ops by self time)')
        print(averages.table(sort_by=sort, row_limit=args.profile_rows))
        if args.device == 'cuda':
            # a step whose kernels keep the GPU busy for much less than its wall time is
            # bound by launching them (the CPU's time per op), not by the GPU
            kernels = [e for e in averages
                       if getattr(e, 'device_type', None) == torch.autograd.DeviceType.CUDA]
            busy = sum(getattr(e, 'self_device_time_total', 0) for e in kernels) / 1e3
            print(f'{method}: profiled step {wall * 1e3:.0f} ms wall; '
                  f'{sum(e.count for e in kernels)} CUDA kernel launches, '
                  f'{busy:.0f} ms of kernel time')
        del model, step


# ---------------------------------------------------------------------- 2. filter
def naive_filter(z, window=11, sigma=1.0, eps=1e-5):
    """Eq. 7 by a loop over pixels (channels vectorised)."""
    n, c, h, w = z.shape
    k = window // 2
    x = torch.arange(window, dtype=z.dtype, device=z.device) - k
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    ks = torch.outer(g, g)
    gamma = math.pi / (2 * (z.flatten(2).amax(-1) - z.flatten(2).amin(-1)).clamp_min(1e-5))
    zp = F.pad(z, (k, k, k, k), mode='reflect')
    out = torch.empty_like(z)
    for i in range(h):
        for j in range(w):
            patch = zp[:, :, i:i + window, j:j + window]
            centre = z[:, :, i, j]
            kr = torch.cos(gamma[..., None, None] * (centre[..., None, None] - patch))
            wgt = ks * kr
            out[:, :, i, j] = (wgt * patch).sum((-1, -2)) / (wgt.sum((-1, -2)) + eps)
    return out


def bench_filter(args, results: dict) -> None:
    from colora_mm.adapters import RangeKernelFilter
    dev = args.device
    # ConvNeXt-T at 512x512, batch 2: stage i has C = 96 * 2^i channels at 128 / 2^i
    # pixels; the branch compresses to r = C // 16. Plus one detection-sized map.
    shapes = [(2, 6, 128, 128), (2, 12, 64, 64), (2, 24, 32, 32), (2, 48, 16, 16),
              (2, 6, 200, 336)]
    sep = RangeKernelFilter(separable=True).to(dev)
    dense = RangeKernelFilter(separable=False).to(dev)
    rows, out = [], []
    for shape in shapes:
        z = torch.randn(*shape, device=dev)
        zg = z.clone().requires_grad_(True)
        with torch.no_grad():
            fwd = interleaved({'sep': lambda: sep(z), '2d': lambda: dense(z)}, dev,
                              args.repeats)
        both = interleaved({'sep': lambda: sep(zg).sum().backward(),
                            '2d': lambda: dense(zg).sum().backward()}, dev, args.repeats)
        naive = float('nan')
        if shape == (2, 48, 16, 16):
            with torch.no_grad():
                naive = timeit(lambda: naive_filter(z), dev, 1, warmup=0)
        out.append(dict(shape=shape, fwd=fwd, fwd_bwd=both, naive=naive))
        rows.append([str(shape), f'{fwd["sep"] * 1e3:.2f}', f'{fwd["2d"] * 1e3:.2f}',
                     f'{fwd["2d"] / fwd["sep"]:.1f}x', f'{both["sep"] * 1e3:.2f}',
                     f'{both["2d"] * 1e3:.2f}', f'{both["2d"] / both["sep"]:.1f}x',
                     f'{naive * 1e3:.0f}' if naive == naive else '-'])
    results['filter'] = out
    table('2. Range filter (Eq. 11), median ms; naive = double loop of Eq. 7',
          ['input (N, r, H, W)', 'sep fwd', '2-D fwd', '2-D / sep', 'sep fwd+bwd',
           '2-D fwd+bwd', '2-D / sep', 'naive fwd'], rows)


# ---------------------------------------------------------------------- 2b. spatial
# Exact alternatives to the depthwise style's up-projection, ``conv2d(z, w, groups=r)``
# with one input channel per group (``z (N, r, H, W)``, ``w (C, 1, 3, 3)``), measured
# against it: on the CPU the package's C++ kernel first, then formulations in PyTorch.
def _pairs(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


class _GroupedUpConv(torch.autograd.Function):
    """Forward and backward of a one-channel-per-group convolution as unfolded taps
    times per-group weights; backward unfolds ``z`` again rather than keeping the
    ``k*k`` times larger unfolded copy."""

    @staticmethod
    def forward(ctx, z, weight, stride, padding):
        n, r, h, w = z.shape
        c, _, kh, kw = weight.shape
        out_hw = [(size + 2 * p - k) // s + 1 for size, p, k, s in
                  zip((h, w), padding, (kh, kw), stride)]
        cols = F.unfold(z, (kh, kw), padding=padding, stride=stride)
        cols = cols.view(n, r, kh * kw, out_hw[0] * out_hw[1])
        out = torch.matmul(weight.view(r, c // r, kh * kw), cols)      # (N, r, C/r, L)
        ctx.save_for_backward(z, weight)
        ctx.stride, ctx.padding = stride, padding
        return out.view(n, c, *out_hw)

    @staticmethod
    def backward(ctx, grad):
        z, weight = ctx.saved_tensors
        n, r, h, w = z.shape
        c, _, kh, kw = weight.shape
        g = grad.reshape(n, r, c // r, -1)
        grad_z = grad_w = None
        if ctx.needs_input_grad[1]:
            cols = F.unfold(z, (kh, kw), padding=ctx.padding, stride=ctx.stride)
            cols = cols.view(n, r, kh * kw, -1)
            grad_w = (g @ cols.transpose(-1, -2)).sum(0).view_as(weight)
        if ctx.needs_input_grad[0]:
            grad_cols = weight.view(r, c // r, kh * kw).transpose(-1, -2) @ g
            grad_z = F.fold(grad_cols.reshape(n, r * kh * kw, -1), (h, w), (kh, kw),
                            padding=ctx.padding, stride=ctx.stride)
        return grad_z, grad_w, None, None


def grouped_up_conv(z: torch.Tensor, weight: torch.Tensor, stride=1,
                    padding=1) -> torch.Tensor:
    """``conv2d(z, weight, groups=r)`` for ``z (N, r, H, W)`` and ``weight (C, 1, k, k)``
    (one input channel per group): each channel's ``k*k`` taps (``unfold``) times its
    group's ``(C/r x k*k)`` weights, as one broadcast batched matmul. Exact (the same sums
    in another order); used on the CPU. Keeps only ``z`` and the weight for backward."""
    return _GroupedUpConv.apply(z, weight, _pairs(stride), _pairs(padding))


def up_dense(z, w, stride=1, padding=1):
    """A dense conv whose ``(C, r)`` kernel is block-diagonal (r x the MACs)."""
    c, r = w.shape[0], z.shape[1]
    mask = torch.eye(r, dtype=w.dtype, device=w.device).repeat_interleave(c // r, 0)
    return F.conv2d(z, mask[:, :, None, None] * w, None, stride, padding)


def up_repeat_depthwise(z, w, stride=1, padding=1):
    """Each channel repeated C/r times, then a depthwise conv."""
    c, r = w.shape[0], z.shape[1]
    return F.conv2d(z.repeat_interleave(c // r, 1), w, None, stride, padding, 1, c)


def up_channels_last(z, w, stride=1, padding=1):
    return F.conv2d(z.contiguous(memory_format=torch.channels_last),
                    w.contiguous(memory_format=torch.channels_last), None, stride,
                    padding, 1, z.shape[1])


#: The package's CPU formulation (colora_mm/adapters/up3x3.py), a column on the CPU.
PACKAGE_KERNEL = 'C++ kernel (CPU default)'

UP_CANDIDATES = {'unfold-matmul': grouped_up_conv, 'dense block-diagonal': up_dense,
                 'repeat + depthwise': up_repeat_depthwise,
                 'channels-last grouped': up_channels_last}


def bench_spatial(args, results: dict) -> None:
    """The up-projection (3x3, ``r -> C``, ``groups=r``) forward + backward at the
    shapes of CoLoRAConvNeXt's spatial branches: the grouped convolution (what
    ``nn.Conv2d`` runs), against the package's CPU kernel and each exact alternative
    (checked equal first)."""
    dev = args.device
    rows, out = [], []
    from mmpretrain.models.backbones.convnext import ConvNeXt
    if args.arch not in ConvNeXt.arch_settings:
        raise SystemExit(f'--arch {args.arch}: not one of mmpretrain\'s ConvNeXt archs '
                         f'({", ".join(ConvNeXt.arch_settings)})')
    dims = ConvNeXt.arch_settings[args.arch]['channels'][0]
    from colora_mm.adapters import up3x3
    candidates = dict(UP_CANDIDATES)
    kernel = up3x3.load_kernel() if dev == 'cpu' else None
    if kernel is not None:
        # the kernel itself, whatever COLORA_MM_UP3X3 selects (the verdict reads the
        # selection)
        candidates = {PACKAGE_KERNEL: lambda z, w: up3x3._apply_kernel(kernel, z, w),
                      **candidates}
    elif dev == 'cpu':
        print(f'(the C++ kernel could not be built: {up3x3._state.get("error")})')
    totals = {name: 0.0 for name in ['grouped conv'] + list(candidates)}
    selected_total, selections = 0.0, set()
    for stage in range(4):
        c, hw = dims * 2 ** stage, args.size // (4 * 2 ** stage)
        for divisor in (16, 32):
            r = c // divisor
            z = torch.randn(args.batch, r, hw, hw, device=dev, requires_grad=True)
            w = (torch.randn(c, 1, 3, 3, device=dev) * 0.02).requires_grad_()
            g = torch.randn(args.batch, c, hw, hw, device=dev)
            fns = {'grouped conv': lambda: F.conv2d(z, w, None, 1, 1, 1, r)}
            with exact_fp32():
                ref = F.conv2d(z, w, None, 1, 1, 1, r)
                for name, fn in candidates.items():
                    err = relative_error(fn(z, w), ref)
                    if err > 1e-5:
                        raise AssertionError(f'{name} differs from the grouped conv by '
                                             f'{err:.1e} (relative to its largest output) '
                                             f'at (N, r, H, W) = {tuple(z.shape)}')
            for name, fn in candidates.items():
                fns[name] = (lambda f: lambda: f(z, w))(fn)
            # backward from the output gradient itself: no extra output-sized ops
            runs = {k: (lambda f: lambda: torch.autograd.grad(f(), (z, w), g))(f)
                    for k, f in fns.items()}
            t = interleaved(runs, dev, args.repeats * 2)
            for k in t:
                totals[k] += t[k]
            chosen = package_selection(z, w)
            selections.add(chosen)
            selected_total += t[chosen]
            out.append(dict(stage=stage, r=r, c=c, hw=hw, times=t, selected=chosen))
            rows.append([f'{stage} (C={c}, {hw}x{hw})', str(r),
                         f'{t["grouped conv"] * 1e3:.2f}'] +
                        [f'{t[k] / t["grouped conv"]:.2f}' for k in candidates])
    rows.append(['all', '-', f'{totals["grouped conv"] * 1e3:.2f}'] +
                [f'{totals[k] / totals["grouped conv"]:.2f}' for k in candidates])
    results['spatial'] = out
    table(f'2b. Spatial up-projection (3x3, r -> C, groups=r) of CoLoRAConvNeXt-{args.arch},'
          f' batch {args.batch} at {args.size}x{args.size}, forward + backward: the grouped '
          'conv (median ms) and each exact alternative (time / grouped conv)',
          ['stage', 'r', 'grouped conv ms'] + list(candidates), rows)
    best = min(candidates, key=lambda k: totals[k])
    chosen = ' / '.join(sorted(selections))
    print(f'(the package runs here: {chosen} ({up3x3.ENV_CHOICE}={up3x3.choice()}, '
          f'{dev}, float32); the other formulations, all shapes, time / grouped conv, '
          'for information: '
          + ', '.join(f'{k} {totals[k] / totals["grouped conv"]:.2f}'
                      for k in candidates if k not in selections)
          + f'; fastest: {best})')
    results['spatial_selected'] = chosen
    results['spatial_targets'] = report_targets([
        (f'spatial up-projection fwd+bwd, the package\'s formulation here ({chosen}) / '
         'grouped conv', selected_total / totals['grouped conv'], '<=', 0.5)])


def package_selection(z: torch.Tensor, w: torch.Tensor) -> str:
    """The formulation ``colora_mm.adapters.up3x3`` runs for this up-projection here:
    the C++ kernel where ``COLORA_MM_UP3X3`` is ``auto``, it applies (CPU, float32, no
    autocast) and it was built; the grouped convolution otherwise."""
    from colora_mm.adapters import up3x3
    if up3x3.choice() == 'auto' and up3x3.kernel_applies(z, w) \
            and up3x3.load_kernel() is not None:
        return PACKAGE_KERNEL
    return 'grouped conv'


# ---------------------------------------------------------------------- 3. merge
#: ConvNeXt-T as the dense-prediction configs build it (configs/_base_/
#: upernet_convnext-b_ade20k.py): layer scale 1.0. With mmpretrain's default (1e-6) every
#: block's branch, adapters and any error in their merge included, is scaled by 1e-6
#: before it reaches the output, so no comparison of outputs can see it.
CONVNEXT_T = dict(type='CoLoRAConvNeXt', arch='tiny', out_indices=(0, 1, 2, 3),
                  layer_scale_init_value=1.0)
#: Largest ``max |merged - unmerged| / max |unmerged|`` per output that table 3 accepts
#: (float32 rounding of the folded weights is about 1e-6).
MERGE_TOLERANCE = 1e-4


def bench_merge(args, results: dict) -> None:
    from colora_mm.adapters import merge_adapters, reset_adapters_from_weights
    models = registry()
    dev = args.device
    size = args.merge_size
    cases = [
        ('ResNet-50, use_filter=False', dict(type='CoLoRAResNet', depth=50),
         dict(use_filter=False)),
        ('ResNet-50, filter on', dict(type='CoLoRAResNet', depth=50), dict()),
        ('ConvNeXt-T, filter on', CONVNEXT_T, dict()),
        ('ConvNeXt-T, filter on, spatial rank C // 32 (the paper\'s)', CONVNEXT_T,
         dict(spatial_gamma=32)),
    ]
    x = torch.randn(args.merge_batch, 3, size, size, device=dev)
    rows, out = [], []
    plain_cache = {}
    for name, cfg, extra in cases:
        torch.manual_seed(0)
        adapted = models.build(dict(cfg, adapter=dict(method='colora', **extra)))
        reset_adapters_from_weights(adapted)
        with torch.no_grad():                   # a trained-looking, non-zero update
            for pname, p in adapted.named_parameters():
                if 'adapter_' in pname:
                    p.normal_(0, 0.02)
        adapted.to(dev).eval()
        key = cfg['type'] + str(cfg.get('arch', cfg.get('depth')))
        if key not in plain_cache:
            torch.manual_seed(0)
            plain = models.build(dict(cfg, adapter=dict(method='full')))
            plain.to(dev).eval()
            plain_cache[key] = plain
        plain = plain_cache[key]
        merged = copy.deepcopy(adapted)
        unfolded = merge_adapters(merged)
        with torch.no_grad():
            with exact_fp32():
                reference, folded = adapted(x), merged(x)
                diff = max((a - b).abs().max().item() for a, b in zip(reference, folded))
                rel = relative_error(folded, reference)
            if not rel <= MERGE_TOLERANCE:
                raise AssertionError(
                    f'{name}: the merged model differs from the unmerged one by {rel:.1e} '
                    f'of the output scale (max |diff| {diff:.1e}; tolerance '
                    f'{MERGE_TOLERANCE:.0e})')
            # Each forward pass in an autocast region of its own, as mmengine's test
            # loop runs each batch: autocast keeps the low-precision copy of a weight
            # that requires grad (the plain model's) until its region closes, so one
            # region around every repeat would let the plain model cast its weights
            # once for all of them while the merged and unmerged ones, whose frozen
            # weights autocast never keeps, cast theirs at every call.
            def run(model):
                if not args.amp:
                    return lambda: model(x)
                dtype = torch.float16 if dev == 'cuda' else torch.bfloat16

                def forward():
                    with torch.autocast(dev, dtype=dtype):
                        return model(x)
                return forward

            t = interleaved({'plain': run(plain), 'merged': run(merged),
                             'unmerged': run(adapted)}, dev, args.repeats * 2)
        out.append(dict(case=name, times=t, unfolded=len(unfolded), max_abs_diff=diff,
                        max_rel_diff=rel))
        rows.append([name, str(len(unfolded)), f'{t["plain"] * 1e3:.1f}',
                     f'{t["merged"] * 1e3:.1f}', f'{t["merged"] / t["plain"]:.3f}',
                     f'{t["unmerged"] / t["plain"]:.3f}', f'{diff:.1e} ({rel:.1e})'])
    results['merge'] = out
    convnext = [o for o in out if o['case'].startswith('ConvNeXt')]
    results['merge_targets'] = report_targets([
        (f'merged inference, {o["case"]}, merged / plain',
         o['times']['merged'] / o['times']['plain'], '<=', 1.10) for o in convnext])
    table(f'3. Inference, backbone only, batch {args.merge_batch} x {size}x{size}, '
          'median ms (plain / merged / unmerged run in turn)',
          ['model', 'layers left unfolded', 'plain', 'merged', 'merged / plain',
           'unmerged / plain', 'max |merged - unmerged| (/ max |unmerged|)'], rows)


# ---------------------------------------------------------------------- 4. deltas
def bench_deltas(args, results: dict) -> None:
    from colora_mm.adapters import iter_adapted_layers, reset_adapters_from_weights
    models = registry()
    dev = args.device
    rows, out = [], {}
    for method in ('lora', 'hira', 'colora'):
        torch.manual_seed(0)
        backbone = models.build(dict(type='CoLoRAConvNeXt', arch=args.arch,
                                     adapter=dict(method=method)))
        reset_adapters_from_weights(backbone)
        with torch.no_grad():                   # trained-looking adapters, B != 0
            for pname, p in backbone.named_parameters():
                if 'adapter_' in pname:
                    p.normal_(0, 0.02)
        backbone.to(dev).train()
        layers = [layer for _, layer in iter_adapted_layers(backbone)]

        def deltas():
            total = 0
            for layer in layers:
                d = layer.adapter_branch.delta_weight(layer)
                if d is not None:
                    total = total + d.sum()
            total.backward()
        t = timeit(deltas, dev, args.repeats)
        out[method] = t
        step = results.get('train_step_s', {}).get(method)
        rows.append([method, f'{t * 1e3:.2f}',
                     f'{100 * t / step:.1f}%' if step else '-'])
    results['deltas_s'] = out
    rows = [r + [f'{out[r[0]] / out["lora"]:.2f}'] for r in rows]
    table(f'4. Forming every weight update of CoLoRAConvNeXt-{args.arch} once '
          '(delta_weight forward + backward), median ms',
          ['method', 'ms per step', 'share of the training step', 'vs LoRA'], rows)


# ---------------------------------------------------------------------- main
TABLES = dict(train=bench_train, paper=bench_paper, filter=bench_filter,
              spatial=bench_spatial, merge=bench_merge, deltas=bench_deltas)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: on CUDA fp16 autocast (AmpOptimWrapper), '
                             'on the CPU bfloat16 autocast (the memory tables: what a GPU '
                             'step keeps, counted on the CPU)')
    parser.add_argument('--only', nargs='+', default=list(TABLES), choices=list(TABLES))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--arch', default='tiny', help='ConvNeXt arch of tables 1 and 4')
    parser.add_argument('--size', type=int, default=256, help='training crop (table 1)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--head-channels', type=int, default=128,
                        help='UperNet channels (upstream: 512)')
    parser.add_argument('--memory-steps', type=int, default=2)
    parser.add_argument('--methods', nargs='+', default=None,
                        help=f'rows of tables 1 and 1b (default: {" ".join(METHODS)} '
                             f'and the breakdown rows; also: {" ".join(OPTIONAL)})')
    parser.add_argument('--no-breakdown', action='store_true',
                        help='table 1 without the colora-nofilter / colora-pairs rows')
    parser.add_argument('--merge-size', type=int, default=224)
    parser.add_argument('--merge-batch', type=int, default=2)
    parser.add_argument('--profile', nargs='*', default=[],
                        help='also print a torch.profiler table of one training step '
                             'for these methods (e.g. lora colora)')
    parser.add_argument('--profile-rows', type=int, default=15)
    parser.add_argument('--json', default=None, help='also write the numbers here')
    parser.add_argument('--malloc', default='retain', choices=['retain', 'default'],
                        help='CPU timings: "retain" (default) makes glibc keep freed '
                             'memory, as a caching allocator does (no page faults in '
                             'the timed steps); "default" leaves glibc as it is. The '
                             'memory columns are measured in fresh processes with '
                             "glibc's defaults either way")
    parser.add_argument('--memory-mmap-threshold', type=int, default=0, metavar='BYTES',
                        help='CPU memory columns: fix glibc\'s mmap threshold at BYTES in '
                             'the memory workers (e.g. 1048576), so that every tensor of '
                             'that size or more is returned to the kernel when freed; '
                             'default 0: glibc\'s defaults (the threshold rises with '
                             'the blocks freed, up to 32 MiB, and tensors below it '
                             'leave holes in the heap that count in the peak RSS)')
    parser.add_argument('--memory-layouts', type=int, default=0, metavar='N',
                        help='CPU memory columns: run each row\'s memory worker N times, '
                             'each with address-space randomisation off (setarch -R) '
                             'and PYTHONHASHSEED 0..N-1, and read the median peak RSS: '
                             'every such process places the heap\'s blocks the same way '
                             'each time, so the column is the same in every run from '
                             'the same environment; default 0: one fresh process per '
                             'row, whose heap layout (and peak RSS) varies from run to '
                             'run')
    parser.add_argument('--list-methods', action='store_true',
                        help='print every row name --methods takes (one line, spaces '
                             'between) and exit')
    parser.add_argument('--memory-worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list_methods:
        print(' '.join(known_rows()))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device visible.')
    if not 0 <= args.memory_mmap_threshold <= 32 * 2 ** 20:
        parser.error(f'--memory-mmap-threshold {args.memory_mmap_threshold}: between 0 '
                     "(glibc's defaults) and 33554432 (32 MiB, glibc's largest)")
    if args.memory_mmap_threshold and args.device != 'cpu':
        parser.error('--memory-mmap-threshold is for the CPU memory workers (glibc); '
                     'on CUDA the memory columns come from the caching allocator.')
    if args.memory_layouts < 0:
        parser.error(f'--memory-layouts {args.memory_layouts}: 0 (one fresh process per '
                     'row) or more')
    if args.memory_layouts and args.device != 'cpu':
        parser.error('--memory-layouts is for the CPU memory workers (peak RSS); on CUDA '
                     'the memory columns come from the caching allocator.')
    if args.memory_layouts and not args.memory_worker and not layout_off_prefix():
        parser.error('--memory-layouts needs `setarch -R` (util-linux) to start the '
                     'memory workers with address randomisation off, which this system '
                     'refuses or lacks; leave the option out (one fresh process per row).')
    allocator = preloaded_allocator()
    if args.memory_mmap_threshold and allocator:
        parser.error(f'--memory-mmap-threshold sets glibc\'s malloc, which the preloaded '
                     f'{allocator} replaces here: leave out one or the other '
                     '(LD_PRELOAD or the option).')
    rows = known_rows()
    for flag, names in (('--methods', args.methods or []),
                        ('--memory-worker', [args.memory_worker] if args.memory_worker else [])):
        unknown = [m for m in names if m not in rows]
        if unknown:
            parser.error(f'{flag}: unknown rows {unknown}; the rows are {" ".join(rows)}')
    for flag, value in (('--size', args.size), ('--merge-size', args.merge_size)):
        if value < 32:
            parser.error(f'{flag} {value}: at least 32 (ConvNeXt\'s last stage is 1/32 of '
                         'the input; table 2b times a branch at every stage)')
    if args.memory_worker:
        memory_worker(args.memory_worker, args)
        return {}

    if args.device == 'cpu' and args.malloc == 'retain' and not retain_freed_memory():
        print('(this C library has no mallopt: timings with its default allocator)')
        args.malloc = 'default'
    print(f'device: {args.device} ({machine(args.device)}); torch {torch.__version__}; '
          f'repeats {args.repeats}; malloc {args.malloc if args.device == "cpu" else "-"}')
    print('command: python ' + ' '.join([os.path.relpath(__file__)] + sys.argv[1:]))
    results: dict = dict(machine=machine(args.device), args=vars(args))
    # Each table on its own: one that fails is reported and the next runs; the JSON is
    # written after every table, so what finished is kept whatever fails later.
    jobs = [(name, fn) for name, fn in TABLES.items() if name in args.only]
    if args.profile:
        jobs.append(('profile', bench_profile))
    for name, fn in jobs:
        try:
            fn(args, results)
        except Exception as err:  # noqa: BLE001 - reported; the other tables still run
            import traceback
            traceback.print_exc()
            results.setdefault('failed_tables', {})[name] = f'{type(err).__name__}: {err}'
            print(f'\ntable {name} FAILED: {type(err).__name__}: {err}')
        sys.stdout.flush()
        sys.stderr.flush()
        if args.json:
            write_json(args.json, results)
    if results.get('failed_tables'):
        print('\nfailed tables: ' + ', '.join(results['failed_tables']))
    return results


def write_json(path: str, results: dict) -> None:
    """``results`` into ``path`` whole or not at all (a temporary file renamed)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == '__main__':
    sys.exit(1 if main().get('failed_tables') else 0)

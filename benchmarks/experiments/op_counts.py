"""Operators a training step dispatches, per method: on a GPU each one that computes
is a kernel launch, and a step with thousands of small ones is bound by launching them
(docs/benchmarks.md, "GPU"). Counted on the CPU with a dispatch-mode counter, so the
counts are exact and the same on every machine; views and metadata ops (``view``,
``t``, ``detach``, ...), which launch nothing, are counted apart.

    python benchmarks/experiments/op_counts.py                  # block, scaling, model
    python benchmarks/experiments/op_counts.py --no-model       # the fast tables only

Tables: (a) one ConvNeXt block (CoLoRAConvNeXt-atto, stage 1, batch 2 x 16x16),
forward + backward, per method; (b) the scalings of one side of a pair
(``colora_mm.adapters.scaling``), as plain ops and as the one autograd op training
uses, forward and backward apart; (c) the whole model of table 1b (UperNet 512 + ConvNeXt-B), forward
(losses included) + backward, without the optimizer step (on a GPU AdamW runs as a
few multi-tensor kernels, on the CPU one loop per parameter). The low-rank ops'
backward recomputes a LayerNorm or GELU input whole, as on a GPU (``--recompute cpu``:
in the CPU's pieces of a few MiB, each a few more ops).
"""
import argparse
import collections
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _common import adapted_convnext, bench_colora
from colora_mm.adapters import lowrank

#: Operators that only make views or read metadata: no kernel on a GPU.
NO_KERNEL = frozenset({
    'aten.view', 'aten._unsafe_view', 'aten.reshape', 'aten.t', 'aten.transpose',
    'aten.permute', 'aten.expand', 'aten.unsqueeze', 'aten.squeeze', 'aten.slice',
    'aten.select', 'aten.alias', 'aten.as_strided', 'aten.split', 'aten.unbind',
    'aten.detach', 'aten.promote_types', 'aten._local_scalar_dense', 'aten.is_same_size',
    'aten.empty_like', 'aten.empty', 'aten.lift_fresh'})


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def top(self, k: int = 4) -> str:
        common = [(op, n) for op, n in self.ops.most_common() if op not in NO_KERNEL][:k]
        return ', '.join(f'{op[len("aten."):]} {n}' for op, n in common)


def counted(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def warm_up(step) -> None:
    """Two uncounted steps under the counter, so that the counted one runs as a later
    training step on a GPU does: the 'effective' partners hold a step's offsets, and
    what a path makes once (the scalings' constants, cached per pair) is made. Under a
    dispatch mode the CPU's C++ pair node steps aside for the Python formulation, the
    one a GPU runs; warming up outside the mode would leave that path's one-off
    constants to the counted step."""
    counted(step)
    counted(step)


def block_table(methods):
    rows = {}
    for name in methods:
        backbone = adapted_convnext(name, 'atto').train()
        block = backbone.stages[1][0]
        x = torch.randn(2, block.depthwise_conv.in_channels, 16, 16, requires_grad=True)

        def step():
            block(x).sum().backward()
        warm_up(step)
        rows[name] = counted(step)
    base = rows.get('limit')
    print('(a) one ConvNeXt block of CoLoRAConvNeXt-atto (stage 1, 64 channels), batch 2 x '
          '16x16, forward + backward')
    print('| method | ops that launch a kernel | over the limit | all ops | most frequent |')
    print('|---|---|---|---|---|')
    for name, c in rows.items():
        over = f'{c.kernels - base.kernels:+d}' if base is not None else '-'
        print(f'| {name} | {c.kernels} | {over} | {c.total} | {c.top()} |')


def scaling_table():
    from colora_mm.adapters import scaling
    from colora_mm.adapters.colora_pair import CoLoRAPair
    torch.manual_seed(0)
    pair = CoLoRAPair(64, 256, 64, gamma=16, share_ratio=0.5)
    with torch.no_grad():
        for p in (pair.B1, pair.Bs):
            p.normal_(0, 0.02)
    holder = {}
    cache = {}
    scaling.scaled_columns(pair._terms(0, torch.float32), cache)   # constants, once

    def fused():
        holder['out'] = scaling.scaled_columns(pair._terms(0, torch.float32), cache)

    def plain():
        terms = pair._terms(0, torch.float32)
        holder['out'] = torch.cat([scaling.plain_scaled(x, y, k) for x, y, k in terms], 1)

    def backward():
        holder['out'].backward(holder['grad'])
    print('\n(b) the scalings of one side of a pair, L = [s1 A1 | s As] with s1 = 1 / '
          '(sqrt(rl) (std(A1) + std(B1))), s = 1 / ((rs n)^(1/4) (std(As) + std(Bs W2^T))); '
          'A1, As 64 x 2 (the partner product Bs W2^T included)')
    print('| scalings | pass | ops that launch a kernel | all ops | most frequent |\n'
          '|---|---|---|---|---|')
    for name, fn in (('plain ops (torch.compile, no grad)', plain),
                     ('one autograd op (training)', fused)):
        fwd = counted(fn)
        holder['grad'] = torch.ones_like(holder['out'])
        bwd = counted(backward)
        for pass_, c in (('forward', fwd), ('backward', bwd)):
            print(f'| {name} | {pass_} | {c.kernels} | {c.total} | {c.top(6)} |')


def model_table(methods, size):
    cfg = SimpleNamespace(arch='base', size=size, head_channels=512, device='cpu',
                          amp=False, batch=2)
    print(f'\n(c) UperNet (512 channels) + ConvNeXt-B, batch 2 x {size}x{size}: forward with '
          'the losses + backward, no optimizer step')
    print('| method | ops that launch a kernel | vs limit | all ops |\n|---|---|---|---|')
    rows = {}
    for name in methods:
        model = bench_colora.build_trainer(name, cfg)[0]
        data = bench_colora.make_batch(cfg.batch, cfg.size)

        def step(model=model, data=data):
            batch = model.data_preprocessor(data, True)
            losses = model._run_forward(batch, mode='loss')
            loss, _ = model.parse_losses(losses)
            loss.backward()
        warm_up(step)
        rows[name] = counted(step)
        base = rows.get('limit')
        c = rows[name]
        ratio = f'{c.kernels / base.kernels:.2f}' if base is not None else '-'
        print(f'| {name} | {c.kernels} | {ratio} | {c.total} |', flush=True)
        del step, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--methods', nargs='+',
                        default=['limit', 'lora', 'hira', 'colora-pairs', 'colora-nofilter',
                                 'colora'])
    parser.add_argument('--no-model', action='store_true', help='skip table (c)')
    parser.add_argument('--size', type=int, default=64,
                        help='input size of table (c); with --recompute gpu the counts do '
                             'not depend on it')
    parser.add_argument('--recompute', choices=('gpu', 'cpu'), default='gpu',
                        help="how the low-rank ops' backward recomputes a LayerNorm or GELU "
                             'input: whole, as on a GPU (default), or in the pieces of a '
                             'few MiB the CPU takes (more pieces, and ops, the larger the '
                             'input)')
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.recompute == 'gpu':
        # the counted tensors are CPU tensors: count the rule a CUDA device takes
        lowrank.piece_bytes = lambda device_type: None
    print('experiment: operators dispatched per forward + backward (benchmarks/'
          f'experiments/op_counts.py; CPU, exact counts; inputs recomputed as on the '
          f'{args.recompute.upper()})')
    block_table(args.methods)
    scaling_table()
    if not args.no_model:
        model_table([m for m in args.methods if m != 'hira'] if 'limit' in args.methods
                    else args.methods, args.size)


if __name__ == '__main__':
    main()

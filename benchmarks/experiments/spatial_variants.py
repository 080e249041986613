"""The spatial branch's up-projection (3x3, ``r -> C``, ``groups=r``): where the
grouped convolution's time goes, and formulations beyond table 2b of
``bench_colora.py``, forward + backward from the output gradient at the shapes of
CoLoRAConvNeXt-T (batch 2 at 256x256, spatial ranks C // 16 and C // 32; ``--channels``,
``--size``, ``--batch`` for other shapes, e.g. ConvNeXt-B at 512: 128, 512, 2):

* ``forward``: the grouped conv's forward alone;
* ``split, unfold`` / ``split, conv2d_weight``: forward by the grouped conv, backward
  as two separate calls (input gradient by ``conv_transpose2d``; weight gradient by
  ``unfold`` + one batched matmul, or by ``torch.nn.grad.conv2d_weight``);
* ``eager taps``: the nine taps as shifted multiply-adds, op by op;
* ``compiled taps``: the same, compiled by ``torch.compile`` (Inductor: a C++ compiler
  on the CPU, Triton on CUDA; about 5 s per shape; skipped with a note when it cannot
  run).

Each is checked against the grouped conv (values and both gradients) first.

On CUDA (``--device cuda``) each timed call runs ``--inner`` times (default 20) between
two synchronisations, so that launch latency does not decide the ratios.

    python benchmarks/experiments/spatial_variants.py [--repeats 30] [--no-compile]
        [--device cuda] [--channels 96 --size 256 --batch 2]
"""
import argparse
import contextlib
import importlib
import statistics

import torch
import torch.nn.functional as F

from _common import bench_colora, setup


class SplitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, weight_grad):
        ctx.save_for_backward(z, w)
        ctx.weight_grad = weight_grad
        return F.conv2d(z, w, None, 1, 1, 1, z.shape[1])

    @staticmethod
    def backward(ctx, g):
        z, w = ctx.saved_tensors
        r = z.shape[1]
        n, c = g.shape[:2]
        gz = F.conv_transpose2d(g, w, None, 1, 1, 0, r)
        if ctx.weight_grad == 'unfold':
            cols = F.unfold(z, 3, padding=1).view(n, r, 9, -1)
            gw = (g.view(n, r, c // r, -1) @ cols.transpose(-1, -2)).sum(0).view_as(w)
        else:
            gw = torch.nn.grad.conv2d_weight(z, w.shape, g, 1, 1, 1, r)
        return gz, gw, None


def shifted_taps(z, w):
    n, r, h, wd = z.shape
    c = w.shape[0]
    zp = F.pad(z, (1, 1, 1, 1)).unsqueeze(2)                 # n, r, 1, h+2, w+2
    wv = w.view(r, c // r, 9)
    out = None
    for t in range(9):
        dy, dx = divmod(t, 3)
        term = zp[..., dy:dy + h, dx:dx + wd] * wv[:, :, t, None, None]
        out = term if out is None else out + term
    return out.reshape(n, c, h, wd)


def repeated(fn, n):
    def run():
        for _ in range(n):
            fn()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--no-compile', action='store_true')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--inner', type=int, default=None,
                        help='calls per timed run (default 1 on the CPU, 20 on CUDA)')
    parser.add_argument('--channels', type=int, default=96, help='stage-1 width')
    parser.add_argument('--size', type=int, default=256, help='input size (stage 1: /4)')
    parser.add_argument('--batch', type=int, default=2)
    args = parser.parse_args()
    if args.size < 32 or args.size % 32:
        parser.error(f'--size {args.size}: a multiple of 32 (the last stage is 1/32)')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device visible')
    dev = args.device
    inner = args.inner or (20 if dev == 'cuda' else 1)
    print(setup() if dev == 'cpu' else bench_colora.machine(dev)
          + f'; {inner} calls per timed run')
    compiled = None
    if not args.no_compile:
        try:
            config = importlib.import_module('torch._dynamo').config
            for limit in ('recompile_limit', 'cache_size_limit'):   # one compile per shape
                if hasattr(config, limit):
                    setattr(config, limit, 64)
            compiled = torch.compile(shifted_taps, dynamic=False)
            z = torch.randn(1, 2, 8, 8, device=dev, requires_grad=True)
            torch.autograd.grad(compiled(z, torch.randn(4, 1, 3, 3, device=dev)).sum(), z)
        except Exception as err:  # noqa: BLE001 - reported, the rest still runs
            print(f'(compiled taps skipped: torch.compile failed: {type(err).__name__})')
            compiled = None
    print(f'experiment: spatial up-projection (3x3, r -> C, groups=r), forward + backward, '
          f'median ms (benchmarks/experiments/spatial_variants.py; {dev}, stage widths '
          f'{args.channels}-{args.channels * 8}, batch {args.batch} at {args.size}x'
          f'{args.size})')
    names = ['grouped conv', 'forward', 'split, unfold', 'split, conv2d_weight',
             'eager taps'] + (['compiled taps'] if compiled else [])
    totals = dict.fromkeys(names, 0.0)
    print('| stage | r | ' + ' | '.join(f'{k} ms' for k in names) + ' |')
    print('|' + '---|' * (len(names) + 2))
    for stage in range(4):
        c, hw = args.channels * 2 ** stage, args.size // 4 // 2 ** stage
        for r in (c // 16, c // 32):
            if r < 1:          # too narrow a stage for this rank divisor
                continue
            z = torch.randn(args.batch, r, hw, hw, device=dev, requires_grad=True)
            w = (torch.randn(c, 1, 3, 3, device=dev) * 0.02).requires_grad_()
            g = torch.randn(args.batch, c, hw, hw, device=dev)
            with bench_colora.exact_fp32():
                ref = torch.autograd.grad(F.conv2d(z, w, None, 1, 1, 1, r), (z, w), g)
            fns = {
                'grouped conv': lambda: torch.autograd.grad(
                    F.conv2d(z, w, None, 1, 1, 1, r), (z, w), g),
                'forward': lambda: F.conv2d(z.detach(), w.detach(), None, 1, 1, 1, r),
                'split, unfold': lambda: torch.autograd.grad(
                    SplitBackward.apply(z, w, 'unfold'), (z, w), g),
                'split, conv2d_weight': lambda: torch.autograd.grad(
                    SplitBackward.apply(z, w, 'conv2d_weight'), (z, w), g),
                'eager taps': lambda: torch.autograd.grad(shifted_taps(z, w), (z, w), g),
            }
            if compiled:
                fns['compiled taps'] = lambda: torch.autograd.grad(compiled(z, w), (z, w), g)
            for name, fn in fns.items():
                if name == 'forward':
                    continue
                # the checks without TF32 (the compiled taps use no matmul or conv, and
                # stay out of it so that TorchDynamo compiles them once)
                exact = (contextlib.nullcontext() if name == 'compiled taps'
                         else bench_colora.exact_fp32())
                with exact:
                    for a, b in zip(fn(), ref):
                        err = ((a - b).abs().max() / b.abs().max()).item()
                        assert err < 1e-5, \
                            f'{name} differs from the grouped conv: {err:.1e}'
            times = bench_colora.interleaved_times(
                {k: repeated(f, inner) for k, f in fns.items()}, dev, args.repeats)
            times = {k: [t / inner for t in v] for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in names:
                totals[k] += med[k]
            print(f'| {stage} (C={c}, {hw}x{hw}) | {r} | '
                  + ' | '.join(f'{med[k] * 1e3:.2f}' for k in names) + ' |')
    print('| all | - | ' + ' | '.join(
        f'{totals[k] * 1e3:.2f} ({totals[k] / totals["grouped conv"]:.2f}x)'
        for k in names) + ' |')


if __name__ == '__main__':
    main()

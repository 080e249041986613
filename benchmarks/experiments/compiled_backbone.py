"""The adapted backbone eager and compiled (``backbone.compile()``, in place), forward +
backward, per method: what capturing the adapters' many small ops into fused kernels
buys, on the CPU and, where a step is bound by kernel launches, on a GPU.

    python benchmarks/experiments/compiled_backbone.py                      # CPU, ConvNeXt-T 256
    python benchmarks/experiments/compiled_backbone.py --device cuda --amp \\
        --arch base --size 512                                               # GPU, fp16 autocast

Each compiled backbone is checked against its eager twin first (same weights: the
outputs of one forward pass agree to rounding); the compile time is the first calls'
(warm-up) time. Timings are interleaved, median of ``--repeats``.
"""
import argparse
import contextlib
import copy
import statistics
import time

import torch

from _common import adapted_convnext, bench_colora, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true', help='fp16 autocast (CUDA)')
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--methods', nargs='+', default=['limit', 'lora', 'colora'])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--backend', default='inductor',
                        help="torch.compile backend (default inductor; 'aot_eager' "
                             'traces without generating code)')
    args = parser.parse_args()
    if args.amp and args.device != 'cuda':
        parser.error('--amp needs --device cuda')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device visible')
    info = setup() if args.device == 'cpu' else bench_colora.machine('cuda')
    print(f'experiment: eager and compiled backbone, forward + backward, median ms '
          f'(benchmarks/experiments/compiled_backbone.py; {args.device}, {info}; '
          f'CoLoRAConvNeXt-{args.arch}, batch {args.batch} x {args.size}x{args.size}'
          f'{", AMP fp16" if args.amp else ""}; backend {args.backend})')
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    amp = (torch.autocast('cuda', dtype=torch.float16) if args.amp
           else contextlib.nullcontext())
    fns, compile_s = {}, {}
    for name in args.methods:
        eager = adapted_convnext(name, args.arch, trained_looking=True)
        eager.to(args.device).train()
        compiled = copy.deepcopy(eager)
        compiled.compile(backend=args.backend)
        with torch.no_grad(), bench_colora.exact_fp32():
            err = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12)
                      for a, b in zip(compiled(x), eager(x)))
        if err > 1e-4:
            raise AssertionError(f'{name}: the compiled backbone differs from the eager '
                                 f'one by {err:.1e} (relative)')
        for tag, model in (('eager', eager), ('compiled', compiled)):
            def step(model=model):
                with amp:
                    loss = sum(o.float().mean() for o in model(x))
                loss.backward()
            t0 = time.perf_counter()
            for _ in range(3):                  # compiles; 'effective' partners settle
                step()
            bench_colora.sync(args.device)
            compile_s[f'{name} {tag}'] = time.perf_counter() - t0
            fns[f'{name} {tag}'] = step
    times = bench_colora.interleaved_times(fns, args.device, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = {tag: med.get(f'limit {tag}') for tag in ('eager', 'compiled')}
    print('| method | eager ms | compiled ms | compiled / eager | eager / limit eager | '
          'compiled / limit compiled | first 3 calls compiled, s |')
    print('|---|---|---|---|---|---|---|')
    for name in args.methods:
        e, c = med[f'{name} eager'], med[f'{name} compiled']
        ratios = [f'{e / base["eager"]:.2f}' if base['eager'] else '-',
                  f'{c / base["compiled"]:.2f}' if base['compiled'] else '-']
        print(f'| {name} | {e * 1e3:.1f} | {c * 1e3:.1f} | {c / e:.2f} | {ratios[0]} | '
              f'{ratios[1]} | {compile_s[f"{name} compiled"]:.0f} |')


if __name__ == '__main__':
    main()

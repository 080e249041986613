"""Minor page faults per training step of table 1's model (UperNet + ConvNeXt-T,
batch 2 x 256x256), per method, with glibc's allocator defaults or with freed memory
retained (``bench_colora.py --malloc``): whether the faults differ between methods.

    python benchmarks/experiments/page_faults.py [--malloc default|retain]
        [--steps 3] [--methods full limit lora colora]
"""
import argparse
import time
from types import SimpleNamespace

from _common import bench_colora, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--malloc', default='default', choices=['default', 'retain'])
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--methods', nargs='+', default=['full', 'limit', 'lora', 'colora'])
    args = parser.parse_args()
    print(setup(retain=args.malloc == 'retain'))
    cfg = SimpleNamespace(arch='tiny', size=256, head_channels=128, device='cpu',
                          amp=False, batch=2)
    steps = {m: bench_colora.build_trainer(m, cfg)[1] for m in args.methods}
    for step in steps.values():                 # warm-up
        step()
    counts = {m: [] for m in steps}
    for _ in range(args.steps):                 # methods in turn
        for m, step in steps.items():
            before, t0 = bench_colora.minor_faults(), time.perf_counter()
            step()
            counts[m].append((bench_colora.minor_faults() - before,
                              time.perf_counter() - t0))
    print('| method | minor faults per step | step ms |\n|---|---|---|')
    for m, v in counts.items():
        print(f'| {m} | {", ".join(str(f) for f, _ in v)} | '
              f'{", ".join(f"{t * 1e3:.0f}" for _, t in v)} |')


if __name__ == '__main__':
    main()

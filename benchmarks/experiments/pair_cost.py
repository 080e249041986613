"""Where a CoLoRA pair's training-step time over LoRA's goes: table 1's UperNet +
ConvNeXt training step with LoRA, with CoLoRA's pairs alone (``colora-pairs``: no
spatial branch) and with the pairs minus one part of their factor computation at a
time. The parts removed change the numbers the step computes, so those rows only
attribute cost (they are timed, not checked); the rows that compute the same numbers
(``python factors``, ``plain-op scalings``) are checked against the pairs as they are
first.

* ``pairs``: as the package runs them (on the CPU each side's factors as one C++
  autograd node, ``csrc/pair_factors.cpp``);
* ``python factors``: the factors as the Python formulation (``COLORA_MM_UP3X3=conv``;
  the scalings as one autograd op), each pair on its own (as with ``COLORA_MM_PAIR_BATCH=0``);
  the rows below but the next remove parts of it:
* ``stacked factors``: the Python formulation as a GPU runs it, the scalings of the
  pairs of one shape formed together (:mod:`colora_mm.adapters.pair_batch`);
* ``plain-op scalings``: the scalings as plain tensor ops, not as one autograd op;
* ``no stds``: the scalings replaced by the constants ``1 / k_j`` (no ``std`` in the
  forward or the backward pass);
* ``no partner products``: the partners' base weights taken as zero (``Bs W2^T`` and
  ``W1^T As`` and their gradients, the GEMMs that stream a whole frozen weight, gone);
* ``no partner offsets``: the partners without their low-rank offsets (the base weight
  only, as with ``partner_policy='frozen'``).

At a small input (the default, 32x32) the rows show the cost that does not grow with
the number of tokens; at table 1's 256x256 what grows with it too. A second table times
one side of a pair alone (forward + backward) as the C++ node and as the Python
formulation at ConvNeXt-T's four stage shapes; a third the stage-3 partner products
alone with the weight just used (hot in cache) and after 256 MB of other traffic
(cold): in a training step the weight is cold.

    python benchmarks/experiments/pair_cost.py [--size 32] [--repeats 15]
"""
import argparse
import statistics
import time

import torch

from _common import bench_colora, interleaved_runs, median_ratio, setup

VARIANTS = ('pairs', 'python factors', 'stacked factors', 'plain-op scalings', 'no stds',
            'no partner products', 'no partner offsets')


def patch(mode: list) -> None:
    """Route the pairs' scalings, partner bases and offsets through ``mode[0]``."""
    from colora_mm.adapters import colora_pair as cp
    from colora_mm.adapters.scaling import plain_scaled
    as_is_columns = cp.scaled_columns
    as_is_base, as_is_offset = cp.CoLoRAPair.partner_base, cp.CoLoRAPair.offset
    as_is_node = cp.pair_side_factors
    as_is_applies = cp.CoLoRAPair.one_node_applies

    def pair_side_factors(*args, **kwargs):
        return as_is_node(*args, **kwargs) if mode[0] == 'pairs' else None

    def one_node_applies(self, index):
        # where the node applies the pairs are not stacked: the pairs stack in one mode
        # only, the others remove parts of the per-pair formulation
        return False if mode[0] == 'stacked factors' else (
            as_is_applies(self, index) if mode[0] == 'pairs' else True)

    def scaled_columns(terms, cache):
        if mode[0] == 'plain-op scalings':
            parts = [plain_scaled(x, y, k) for x, y, k in terms]
        elif mode[0] == 'no stds':
            parts = [x * (1.0 / k) for x, _, k in terms]
        else:
            return as_is_columns(terms, cache)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def partner_base(self, index):
        return None if mode[0] == 'no partner products' else as_is_base(self, index)

    def offset(self, index):
        if mode[0] == 'no partner offsets':
            din, dout = self.side_shapes()[index]
            return self.partner_l1.new_zeros(din, 0), self.partner_l1.new_zeros(0, dout)
        return as_is_offset(self, index)

    cp.scaled_columns, cp.pair_side_factors = scaled_columns, pair_side_factors
    cp.CoLoRAPair.partner_base, cp.CoLoRAPair.offset = partner_base, offset
    cp.CoLoRAPair.one_node_applies = one_node_applies


def partner_products(repeats: int) -> list:
    """Stage-3 partner products of ConvNeXt-T (W 3072 x 768, rs = 24), median ms,
    hot (the same product just before) and cold (256 MB streamed in between)."""
    w, as_, bs = torch.randn(3072, 768), torch.randn(768, 24), torch.randn(24, 3072)
    g1, g2 = torch.randn(24, 768), torch.randn(3072, 24)
    traffic = torch.ones(64 * 1024 * 1024)
    products = {'Bs W2^T (forward)': lambda: bs @ w,
                'W1^T As (forward)': lambda: w @ as_,
                'dC W2 (backward)': lambda: g1 @ w.t(),
                'W1 dC (backward)': lambda: w.t() @ g2}
    rows = []
    for name, fn in products.items():
        hot, cold = [], []
        for _ in range(repeats):
            traffic.add_(1.0)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            cold.append(t1 - t0)
            hot.append(t2 - t1)
        rows.append((name, statistics.median(hot) * 1e3, statistics.median(cold) * 1e3))
    return rows


def one_side(repeats: int) -> list:
    """Median microseconds of one pair side's factors, forward + backward, as the C++
    node and as the Python formulation, at ConvNeXt-T's stage shapes (gamma 16, share
    0.5, effective partners with an offset of width r)."""
    from colora_mm.adapters import up3x3
    from colora_mm.adapters.scaling import scaled_columns
    if up3x3.load_kernel() is None:
        return []
    rows = []
    for d in (96, 192, 384, 768):
        r = d // 16
        rl, rs = r - r // 2, r // 2
        for index in (0, 1):
            g = torch.Generator().manual_seed(index)
            din, dout = (d, 4 * d) if index == 0 else (4 * d, d)

            def rand(*shape, grad=False):
                return torch.randn(*shape, generator=g).requires_grad_(grad)
            A, B = rand(din, rl, grad=True), rand(rl, dout, grad=True)
            As, Bs = rand(d, rs, grad=True), rand(rs, d, grad=True)
            if index == 0:     # partner W2 (d'' x d' as PyTorch stores it), offset L2 R2
                base, left, right = rand(d, 4 * d), rand(4 * d, r), rand(r, d)
            else:              # partner W1 (d' x d), offset L1 R1
                base, left, right = rand(4 * d, d), rand(d, r), rand(r, 4 * d)
            k_ind, k_sh = rl ** 0.5, (rs * d) ** 0.25
            cache: dict = {}

            def python():
                if index == 0:
                    C = Bs @ base + (Bs @ right.t()) @ left.t()
                    terms = [(A, B, k_ind), (As, C, k_sh)]
                else:
                    C = base @ As + right.t() @ (left.t() @ As)
                    terms = [(A, B, k_ind), (C, Bs, k_sh)]
                return scaled_columns(terms, cache), torch.cat([B, terms[1][1]], 0)

            def node():
                return up3x3.pair_side_factors(index, A, B, As, Bs, base, left, right,
                                               k_ind, k_sh)
            grads = [torch.randn(t.shape, generator=g) for t in python()]
            times = {}
            for name, fn in (('node', node), ('python', python)):
                def run(fn=fn):
                    torch.autograd.backward(list(fn()), grads)
                for _ in range(5):
                    run()
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    run()
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts) * 1e6
            rows.append((d, index, times['node'], times['python']))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--head-channels', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=15)
    args = parser.parse_args()
    print(setup())
    args.device, args.amp = 'cpu', False
    mode = ['pairs']
    patch(mode)
    steps = {'lora': bench_colora.build_trainer('lora', args)[1]}
    models = {}
    for name in VARIANTS:
        models[name], steps[name], _ = bench_colora.build_trainer('colora-pairs', args)
        torch.manual_seed(1)                    # a trained-looking update: B != 0
        with torch.no_grad():
            for pname, p in models[name].named_parameters():
                if 'adapter_' in pname:
                    p.normal_(0, 0.02)

    # the variants that compute the same numbers: equal gradients
    data = bench_colora.make_batch(args.batch, args.size)
    grads = {}
    same = ('pairs', 'python factors', 'stacked factors', 'plain-op scalings')
    for name in same:
        mode[0] = name
        model = models[name]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)                    # the heads' dropout
        losses = model(**model.data_preprocessor(data, True), mode='loss')
        sum(v for k, v in losses.items() if 'loss' in k).backward()
        grads[name] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
    err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
              for name in same[1:] for a, b in zip(grads[name], grads['pairs']))
    assert err < 1e-4, f'{same[1:]} differ from the pairs as they are: {err:.1e}'

    def timed(name):
        def run():
            mode[0] = name if name in VARIANTS else 'pairs'
            steps[name]()
        return run

    times = interleaved_runs({name: timed(name) for name in steps}, args.repeats)
    mode[0] = 'pairs'
    lora = statistics.median(times['lora']) * 1e3
    print(f'\nUperNet + ConvNeXt-{args.arch} training step, batch {args.batch} x '
          f'{args.size}x{args.size}, {args.repeats} interleaved repeats '
          f'(largest relative gradient difference of {" and ".join(same[1:])} from '
          f'pairs: {err:.1e}):')
    print('| variant | step ms | - LoRA ms | / LoRA | - python factors ms |\n'
          '|---|---|---|---|---|')
    python = statistics.median(times['python factors']) * 1e3
    for name in steps:
        ms = statistics.median(times[name]) * 1e3
        print(f'| {name} | {ms:.1f} | {ms - lora:+.1f} | '
              f'{median_ratio(times[name], times["lora"]):.3f} | '
              f'{ms - python:+.1f} |')
    sides = one_side(max(args.repeats * 7, 100))
    if sides:
        print('\nOne side of a pair alone, forward + backward, median us:')
        print('| stage width d | side | C++ node | Python formulation | node / Python |\n'
              '|---|---|---|---|---|')
        for d, index, node_us, python_us in sides:
            print(f'| {d} | {index} | {node_us:.0f} | {python_us:.0f} | '
                  f'{node_us / python_us:.2f} |')
    else:
        print('\n(the C++ extension cannot be built here: no table of one side alone)')
    print('\nStage-3 partner products alone (ConvNeXt-T: W 3072 x 768, rs 24), median ms:')
    print('| product | weight hot | weight cold |\n|---|---|---|')
    for name, hot, cold in partner_products(max(args.repeats, 15)):
        print(f'| {name} | {hot:.3f} | {cold:.3f} |')


if __name__ == '__main__':
    main()

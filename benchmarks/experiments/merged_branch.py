"""Merged CoLoRAConvNeXt-T with the filter against the plain backbone (inference,
batch 2 x 224x224): the extra time per op (torch.profiler self time), and variants
of the 18 spatial branches that stay unfolded, timed on the whole backbone:

* ``as is``: the branch as the package runs it;
* ``down as matmul``: the 1x1 down-projection as one matrix product;
* ``up channels-last``: the grouped 3x3 up-projection in channels-last;
* ``both``: the two together;
* ``no-grad filter``: the filter's four maps blurred in one call and combined in two
  ops (about 10 ops fewer per branch).

Each variant replaces methods of the package's classes for this process only, and is
checked against the branch as it is first. Ratios are medians over repeats of
(variant / plain), plain and every variant run in turn.

    python benchmarks/experiments/merged_branch.py [--repeats 30]
"""
import argparse
import copy
import math

import torch
import torch.nn.functional as F

from _common import bench_colora, interleaved_runs, median_ratio, setup


def build(x=None):
    """The plain and the merged backbone (ConvNeXt-T with layer scale 1.0, as the
    dense-prediction configs build it: mmpretrain's default 1e-6 would scale every
    block's branch, and any error in its merge, out of sight). With ``x``, the merged
    model is checked against the unmerged one on it first."""
    from colora_mm.adapters import merge_adapters, reset_adapters_from_weights
    models = bench_colora.registry()
    cfg = bench_colora.CONVNEXT_T
    torch.manual_seed(0)
    adapted = models.build(dict(cfg, adapter=dict(method='colora')))
    reset_adapters_from_weights(adapted)
    with torch.no_grad():                       # a trained-looking, non-zero update
        for name, p in adapted.named_parameters():
            if 'adapter_' in name:
                p.normal_(0, 0.02)
    torch.manual_seed(0)
    plain = models.build(dict(cfg, adapter=dict(method='full'))).eval()
    merged = copy.deepcopy(adapted.eval())
    merge_adapters(merged)
    if x is not None:
        with torch.no_grad(), bench_colora.exact_fp32():
            err = bench_colora.relative_error(merged(x), adapted(x))
        assert err <= bench_colora.MERGE_TOLERANCE, \
            f'the merged backbone differs from the unmerged one: {err:.1e} of the output scale'
    return plain, merged


def variants():
    from colora_mm.adapters.filter import RangeKernelFilter
    from colora_mm.adapters.spatial import SpatialLowRankBranch
    as_is_branch = SpatialLowRankBranch.branch
    as_is_filter = RangeKernelFilter._forward_separable

    def branch(down_mm, up_cl):
        def fn(self, layer, x, into=None):
            if down_mm:
                n, c, h, w = x.shape
                z = torch.matmul(self.down.weight.view(-1, c),
                                 x.reshape(n, c, h * w)).view(n, -1, h, w)
            else:
                z = self.down(x)
            if self.filter is not None:
                z = z + self.filter_lambda * self.filter(z)
            if self.scale != 1:
                z = self.scale * z
            if up_cl:
                return F.conv2d(z.contiguous(memory_format=torch.channels_last),
                                self.up.weight.contiguous(memory_format=torch.channels_last),
                                None, self.up.stride, self.up.padding, 1, self.rank)
            return self.up(z)
        return fn

    def nograd_filter(self, z):
        low, high = torch.aminmax(z.flatten(2), dim=-1)
        gz = z * ((math.pi / 2.0) / (high - low).clamp_min_(1e-5))[..., None, None]
        maps = torch.empty((4,) + z.shape, dtype=z.dtype, device=z.device)
        torch.cos(gz, out=maps[0])
        torch.sin(gz, out=maps[1])
        torch.mul(maps[:2], z, out=maps[2:])
        blurred = self.gaussian(maps).view((2, 2) + z.shape)
        den_num = (blurred * maps[:2]).sum(1)
        return den_num[1].div_(den_num[0].add_(self.eps))

    return {
        'as is': (as_is_branch, as_is_filter),
        'down as matmul': (branch(True, False), as_is_filter),
        'up channels-last': (branch(False, True), as_is_filter),
        'both': (branch(True, True), as_is_filter),
        'no-grad filter': (as_is_branch, nograd_filter),
    }, (SpatialLowRankBranch, RangeKernelFilter)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args()
    print(setup())
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(2, 3, 224, 224)
    plain, merged = build(x)
    table, (branch_cls, filter_cls) = variants()

    def use(name):
        branch_cls.branch, filter_cls._forward_separable = table[name]

    with torch.no_grad():
        use('as is')
        ref = merged(x)
        for name in table:
            use(name)
            err = bench_colora.relative_error(merged(x), ref)
            assert err < 1e-5, \
                f'{name} differs from the branch as it is: {err:.1e} of the output scale'
        use('as is')
        self_ms = {}
        for name, model in (('plain', plain), ('merged', merged)):
            for _ in range(2):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    model(x)
            self_ms[name] = {e.key: e.self_cpu_time_total / 10 / 1e3
                             for e in prof.key_averages()}
        p, m = self_ms['plain'], self_ms['merged']
        print(f'\nSelf time per forward pass: plain {sum(p.values()):.1f} ms, merged '
              f'{sum(m.values()):.1f} ms ({sum(m.values()) / sum(p.values()):.3f}); '
              'the ops that differ most:')
        print('| op | plain ms | merged ms | merged - plain |\n|---|---|---|---|')
        for key in sorted(set(p) | set(m), key=lambda k: p.get(k, 0) - m.get(k, 0))[:12]:
            print(f'| {key} | {p.get(key, 0):.2f} | {m.get(key, 0):.2f} | '
                  f'{m.get(key, 0) - p.get(key, 0):+.2f} |')

        def timed(name):
            def run():
                use(name)
                merged(x)
            return run
        fns = {'plain': lambda: plain(x)}
        fns.update({name: timed(name) for name in table})
        times = interleaved_runs(fns, args.repeats)
    use('as is')
    print(f'\nWhole backbone, {args.repeats} interleaved repeats, median of (variant / plain):')
    print('| variant | merged / plain |\n|---|---|')
    for name in table:
        print(f'| {name} | {median_ratio(times[name], times["plain"]):.3f} |')


if __name__ == '__main__':
    main()

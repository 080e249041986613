"""What one training step of the adapted backbone saves for backward, per method, by
dtype and by the line of code that saved it, optionally under bf16 autocast on the CPU
(as fp16 autocast does on a GPU: the low-precision copies autocast makes are what a GPU
step keeps). Exact byte counts of the distinct storages autograd saves (parameters and
buffers excluded), the same on every machine.

    python benchmarks/experiments/saved_tensors.py                       # ConvNeXt-B 256, bf16
    python benchmarks/experiments/saved_tensors.py --autocast none --arch tiny
    python benchmarks/experiments/saved_tensors.py --autocast none --arch tiny --shapes
"""
import argparse
import collections
import traceback

import torch

from _common import adapted_convnext


def _short(path):
    """``colora_mm/...`` or ``mmpretrain/...``: the path from the package's folder."""
    for package in ('colora_mm/', 'mmpretrain/'):
        if package in path:
            return package + path.rsplit(package, 1)[1]
    return path


def saved_by(model, x, autocast):
    fixed = {t.untyped_storage().data_ptr() for t in
             list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in fixed and ptr not in seen:
            frames = traceback.extract_stack(limit=16)
            where = next((f'{_short(f.filename)}:{f.lineno}' for f in reversed(frames[:-1])
                          if 'colora_mm' in f.filename or 'mmpretrain' in f.filename),
                         '?')
            seen[ptr] = (t.untyped_storage().nbytes(), str(t.dtype).replace('torch.', ''),
                         where, tuple(t.shape))
        return t

    ctx = (torch.autocast('cpu', dtype=torch.bfloat16) if autocast == 'bf16'
           else torch.autocast('cpu', enabled=False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with ctx:
            outs = model(x)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    return list(seen.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='base')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--autocast', default='bf16', choices=['bf16', 'none'])
    parser.add_argument('--methods', nargs='+', default=['limit', 'lora', 'colora'])
    parser.add_argument('--top', type=int, default=8, help='places listed per method')
    parser.add_argument('--shapes', action='store_true',
                        help='also list, per method, the package\'s places by the shape '
                             'saved there (count, MiB), the largest first')
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f'experiment: tensors saved for backward by one training step of '
          f'CoLoRAConvNeXt-{args.arch}, batch {args.batch} x {args.size}x{args.size}, '
          f'autocast {args.autocast} (benchmarks/experiments/saved_tensors.py; CPU, exact)')
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows, places, shapes = {}, {}, {}
    for name in args.methods:
        model = adapted_convnext(name, args.arch).train()
        saved = saved_by(model, x, args.autocast)
        by_dtype = collections.Counter()
        by_place = collections.Counter()
        by_shape = collections.defaultdict(lambda: [0, 0])
        for nbytes, dtype, where, shape in saved:
            by_dtype[dtype] += nbytes
            by_place[f'{dtype} {where}'] += nbytes
            if where.startswith('colora_mm/'):
                entry = by_shape[where, shape]
                entry[0] += 1
                entry[1] += nbytes
        rows[name] = by_dtype
        places[name] = by_place
        shapes[name] = by_shape
        del model
    mib = 2 ** 20
    base = sum(rows['limit'].values()) if 'limit' in rows else None
    dtypes = sorted({d for r in rows.values() for d in r})
    print('| method | saved MiB | ' + ' | '.join(f'{d} MiB' for d in dtypes)
          + ' | over the limit MiB |')
    print('|---|---|' + '---|' * len(dtypes) + '---|')
    for name, r in rows.items():
        total = sum(r.values())
        over = f'{(total - base) / mib:+.1f}' if base is not None else '-'
        print(f'| {name} | {total / mib:.1f} | '
              + ' | '.join(f'{r.get(d, 0) / mib:.1f}' for d in dtypes) + f' | {over} |')
    for name, p in places.items():
        print(f'\n{name}: the {args.top} largest places (MiB)')
        for where, nbytes in p.most_common(args.top):
            print(f'  {nbytes / mib:7.1f}  {where}')
    if args.shapes:
        for name, by_shape in shapes.items():
            if not by_shape:
                continue
            print(f'\n{name}: the package\'s places by shape (the storage saved; the '
                  f'{args.top} largest)')
            print('| place | shape | count | MiB |')
            print('|---|---|---|---|')
            ranked = sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:args.top]
            for (where, shape), (count, nbytes) in ranked:
                print(f'| {where} | {" x ".join(map(str, shape))} | {count} | '
                      f'{nbytes / mib:.2f} |')


if __name__ == '__main__':
    main()

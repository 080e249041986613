"""Fold a trained model's adapters into its weights, for deployment.

    python tools/merge.py CONFIG CHECKPOINT OUT [--shape H W] [--tolerance T]

Builds the model of CONFIG, loads CHECKPOINT (it must be that config's: same tensors,
same shapes, adapter tensors included), folds every adapter that folds (the pointwise
deltas of CoLoRA, LoRA, PiSSA, HiRA; CoLoRA's ResNet spatial branch without filter)
with ``colora_mm.adapters.merge_adapters``, and checks on a random input that the
merged backbone (and neck) computes what the unmerged one did, printing the largest
difference. What cannot fold (the range filter, ConvNeXt's cross-channel spatial
branch, Conv-Adapter) keeps its branch and is listed.

Writes two files, each atomically (a temporary file, then ``os.replace``), and only
when every check passed:

* OUT: ``{'meta': ..., 'state_dict': ...}`` with tensors only; its meta keeps the
  checkpoint's ``dataset_meta`` (the class names and palette the inference APIs and
  ``tools/infer.py`` label predictions with). When everything folded its keys are the
  upstream backbone's (mmpretrain ConvNeXt, mmseg/mmdet ResNet or SwinTransformer): it
  loads into the plain upstream model, without colora_mm.
* OUT with its extension replaced by ``.py`` (``merged.pth`` -> ``merged.py``): the
  config to evaluate OUT with (``tools/test.py``):
  the upstream backbone type when everything folded; otherwise CONFIG with
  ``model.backbone.adapter.merged=True``: the backbone then builds the merged
  structure itself (plain folded layers, the branches that cannot fold), so any
  OpenMMLab tool or inference API loads OUT with that config.

Never replaces a file it did not write: an existing OUT or OUT's ``.py`` is refused
unless ``--force`` is given, and even then an OUT's ``.py`` whose first line is not the
one merge.py writes (:data:`MARKER`) is kept; OUT may not be a folder nor end in
``.py``. ``--shape`` takes sides of at least the backbone's total stride (32). Every
check on the paths, ``--shape``, the config and the checkpoint (including that the
adapter settings recorded in the checkpoint are the config's; ``--allow-mismatch``
overrides) runs before any work.

Exit status 2 with a one-line error (and nothing written) when the input is wrong.
"""
import argparse
import copy
import os
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import (CLIError, check_adapter, check_settings_match,  # noqa: E402
                   check_state_dict_matches, load_config, parse_with_clear_errors,
                   read_checkpoint, read_state_dict, run_cli)

#: CoLoRA backbone type -> the upstream type it was built on (in the config's scope).
PLAIN_BACKBONES = {'CoLoRAConvNeXt': 'mmpretrain.ConvNeXt', 'CoLoRAResNet': 'ResNet',
                   'CoLoRASwin': 'SwinTransformer'}
#: Config keys of the CoLoRA backbones that the upstream classes do not take.
ADAPTER_KEYS = ('adapter', 'attn_adapter', 'adapter_spatial')
#: The first line of every config merge.py writes: ``--force`` replaces only these.
MARKER = '# Written by tools/merge.py'


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Fold adapters into the weights; verify; write a deployable '
        'checkpoint and its config')
    parser.add_argument('config', help='the config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='trained checkpoint (with adapter tensors)')
    parser.add_argument('out', help='merged checkpoint to write (its config goes beside '
                        'it, the extension replaced by .py: merged.pth -> merged.py)')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[224],
        help='H [W] of the random input the outputs are compared on (default 224; each '
        "side at least the backbone's total stride, 32)")
    parser.add_argument(
        '--tolerance',
        type=float,
        default=1e-4,
        help='largest allowed |merged - unmerged| relative to max(1, max|unmerged|) '
        '(default 1e-4)')
    parser.add_argument(
        '--force',
        action='store_true',
        help='replace an existing OUT and OUT.py (refused otherwise)')
    parser.add_argument(
        '--allow-mismatch',
        action='store_true',
        help='merge although the adapter settings recorded in the checkpoint differ '
        "from the config's")
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value')
    return parse_with_clear_errors(parser, argv)


def config_path_for(out):
    return osp.splitext(out)[0] + '.py'


def _same_file(a, b):
    if osp.exists(a) and osp.exists(b):
        return osp.samefile(a, b)
    return osp.realpath(a) == osp.realpath(b)


def written_by_merge(path):
    """Whether the file ``path`` is a config merge.py wrote (its first line starts
    with :data:`MARKER`)."""
    try:
        with open(path, errors='replace') as f:
            return f.readline().startswith(MARKER)
    except OSError:
        return False


def check_paths(config, checkpoint, out, force=False):
    """Refuse outputs that would overwrite an input, a folder, a config merge.py did
    not write (even with ``force``), and (unless ``force``) any existing file."""
    out_config = config_path_for(out)
    if not osp.isfile(checkpoint):
        raise CLIError(f'checkpoint {checkpoint} does not exist')
    if osp.isdir(out) or out.endswith(('/', os.sep)):
        raise CLIError(f'OUT {out} names a folder; OUT is the merged checkpoint file (its '
                       'config goes beside it, with .py): name a file, e.g. '
                       f'{osp.join(out, "merged.pth")}')
    if out.endswith('.py'):
        raise CLIError(f'OUT {out} ends in .py, the name of the config merge.py writes '
                       'beside OUT; name the checkpoint OUT.pth, e.g. '
                       f'{osp.splitext(out)[0]}.pth')
    if osp.isdir(out_config):
        raise CLIError(f"OUT's config {out_config} is a folder; choose another OUT")
    if _same_file(out, checkpoint):
        raise CLIError(f'OUT {out} is the input checkpoint; write the merged model to '
                       'another file')
    if _same_file(out, config) or _same_file(out_config, config):
        raise CLIError(f'OUT {out} would overwrite the config {config} (the merged '
                       f'config goes to {out_config}); choose another OUT')
    if _same_file(out_config, checkpoint):
        raise CLIError(f'the merged config {out_config} would overwrite the input '
                       'checkpoint; choose another OUT')
    parent = osp.dirname(osp.abspath(out))
    if not osp.isdir(parent):
        raise CLIError(f'folder {parent} (of OUT) does not exist')
    if osp.lexists(out_config) and not written_by_merge(out_config):
        raise CLIError(f"OUT's config {out_config} exists and was not written by "
                       f"tools/merge.py (its first line is not {MARKER!r}); it is kept, "
                       '--force or not: choose another OUT, or move that file away')
    if not force:
        for path, what in ((out, 'OUT'), (out_config, "OUT's config")):
            if osp.lexists(path):
                raise CLIError(f'{what} {path} exists; choose another OUT, or pass '
                               '--force to replace it')


def check_shape(shape, backbone_cfg):
    """``(H, W)`` of ``--shape`` (one value: a square), each side at least the
    backbone's total stride."""
    from colora_mm.engine.complexity import total_stride
    given = ' '.join(str(v) for v in shape)
    if len(shape) > 2:
        raise CLIError(f'--shape {given}: give one side (a square input) or H W, e.g. '
                       '--shape 224 or --shape 512 1024')
    height, width = (shape * 2)[:2]
    stride = total_stride(backbone_cfg)
    if min(height, width) < stride:
        raise CLIError(f'--shape {given}: each side must be at least {stride}, the total '
                       f'stride of {backbone_cfg.get("type")} (a smaller input leaves '
                       'its last stage without a pixel); pass e.g. --shape '
                       f'{max(stride, 64)} or leave out --shape (224)')
    return height, width


def _without_pretrained(model_cfg):
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.backbone['init_cfg'] = None
    if 'pretrained' in model_cfg:
        model_cfg['pretrained'] = None
    return model_cfg


def build_model(model_cfg):
    from mmengine.registry import MODELS
    from mmengine.registry import DefaultScope
    scope = DefaultScope.get_current_instance().scope_name
    registry = MODELS
    if scope == 'mmseg':
        from mmseg.registry import MODELS as registry
    elif scope == 'mmdet':
        from mmdet.registry import MODELS as registry
    with warnings.catch_warnings():
        # the upstream heads' notes on their own defaults (build_loss, avg_non_ignore)
        # would stand before an error line about the checkpoint
        warnings.simplefilter('ignore', UserWarning)
        model = registry.build(_without_pretrained(model_cfg))
    return model.eval()


def features(model, inputs):
    """Backbone (and neck) outputs, flattened to one list of tensors."""
    import torch
    with torch.no_grad():
        out = model.extract_feat(inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out]


def max_difference(ref, other):
    return max(float((a - b).abs().max()) for a, b in zip(ref, other))


def plain_config(cfg):
    """The config of the fully merged model: upstream backbone, no colora_mm."""
    cfg = copy.deepcopy(cfg)
    backbone = cfg.model.backbone
    backbone['type'] = PLAIN_BACKBONES[backbone['type']]
    for key in ADAPTER_KEYS:
        backbone.pop(key, None)
    backbone['init_cfg'] = None
    imports = [] if not cfg.get('custom_imports') else list(
        cfg.custom_imports.get('imports', []))
    imports = [m for m in imports if not m.split('.')[0] == 'colora_mm']
    if backbone['type'].startswith('mmpretrain.') and 'mmpretrain.models' not in imports:
        imports.append('mmpretrain.models')
    if imports:
        cfg.custom_imports = dict(imports=imports, allow_failed_imports=False)
    elif 'custom_imports' in cfg:
        cfg.pop('custom_imports')
    hooks = [h for h in cfg.get('custom_hooks', []) if not str(
        h.get('type', '')).startswith('CoLoRA') and h.get('type') != 'MergeReinitHook']
    cfg.custom_hooks = hooks
    # AtomicCheckpointHook takes CheckpointHook's arguments: a config that builds
    # without colora_mm (a Runner too) gets upstream's hook
    for hook in (cfg.get('default_hooks') or {}).values():
        if isinstance(hook, dict) and hook.get('type') == 'AtomicCheckpointHook':
            hook['type'] = 'CheckpointHook'
    wrapper = cfg.get('optim_wrapper', {})
    if wrapper.get('constructor') == 'LayerDecayResNetOptimizerConstructor':
        # colora_mm's constructor; the plain model is for evaluation and deployment.
        wrapper.pop('constructor')
        wrapper.pop('paramwise_cfg', None)
    return cfg


def _atomic_pairs(pairs):
    """Write every ``(path, writer)`` to a temporary file first, then move them all
    into place; on any failure remove the temporary files and write nothing."""
    staged = []
    try:
        for path, write in pairs:
            tmp = f'{path}.tmp-{os.getpid()}'
            staged.append((tmp, path))
            write(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if osp.exists(tmp):
                os.remove(tmp)


def merge(args):
    import torch
    from colora_mm.adapters import (is_adapter_name, iter_adapted_layers,
                                    merge_adapters)

    check_paths(args.config, args.checkpoint, args.out, args.force)
    cfg = load_config(args.config, args.cfg_options)
    backbone_type = cfg.model.get('backbone', {}).get('type')
    if backbone_type not in PLAIN_BACKBONES:
        raise CLIError(f'{args.config}: backbone {backbone_type!r} is not a colora_mm '
                       f'backbone ({", ".join(PLAIN_BACKBONES)}); nothing to merge')
    if (cfg.model.backbone.get('adapter') or {}).get('merged'):
        raise CLIError(f'{args.config} describes an already merged model '
                       '(model.backbone.adapter.merged=True); nothing to merge')
    height, width = check_shape(args.shape, cfg.model.backbone)
    current = check_adapter(cfg, args.config)
    source = read_checkpoint(args.checkpoint)
    source_meta = source.get('meta') if isinstance(source, dict) else None
    if isinstance(source_meta, dict) and source_meta.get('merged_from'):
        written = config_path_for(args.checkpoint)
        beside = f' (its config: {written})' if osp.isfile(written) else ''
        raise CLIError(f'checkpoint {args.checkpoint} was written by tools/merge.py from '
                       f'{source_meta["merged_from"]}{beside}: it is merged already; '
                       'nothing to merge (tools/test.py and tools/infer.py take it with '
                       'the config written beside it)')
    note = check_settings_match(source, args.checkpoint, current, args.config,
                                args.allow_mismatch)
    model = build_model(cfg.model)
    if not any(True for _ in iter_adapted_layers(model)):
        raise CLIError(f'{args.config} has no adapters (full fine-tuning or bitfit?): its '
                       'checkpoints are already plain; nothing to merge')
    state = read_state_dict(args.checkpoint, source)
    if not any(is_adapter_name(k) for k in state):
        raise CLIError(f'checkpoint {args.checkpoint} holds no adapter tensors (no name '
                       "with an 'adapter_' component): it is a plain, full fine-tuning or "
                       'already merged checkpoint; nothing to merge')
    check_state_dict_matches(model, state, args.checkpoint, args.config)
    model.load_state_dict(state, strict=True)

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 3, height, width, generator=generator)
    reference = features(model, inputs)
    layers = [name for name, _ in iter_adapted_layers(model)]
    unfolded = merge_adapters(model)
    merged = features(model, inputs)
    diff = max_difference(reference, merged)
    scale = max(1.0, max(float(t.abs().max()) for t in reference))
    print(f'max |merged - unmerged| = {diff:.3e} over {len(reference)} feature maps '
          f'(input 1x3x{height}x{width}; largest |unmerged| value {scale:.3g})')
    if diff > args.tolerance * scale:
        raise CLIError(f'the merged model differs from the unmerged one by {diff:.3e} '
                       f'(tolerance {args.tolerance} x {scale:.3g}); nothing written')
    print(f'folded {len(layers) - len(unfolded)} of {len(layers)} adapted layers')
    if unfolded:
        print(f'kept unfolded (their adapter does not fold into the weights), '
              f'{len(unfolded)}:')
        for name in unfolded:
            print(f'  {name}')
    merged_state = model.state_dict()

    if unfolded:
        out_cfg = copy.deepcopy(cfg)
        out_cfg.model.backbone.adapter['merged'] = True
        out_cfg.model.backbone['init_cfg'] = None
        header = (f'{MARKER} for the merged checkpoint beside it: the adapters of'
                  '\n# the layers below could not fold and keep their branch; '
                  'every other adapter is\n# folded into its layer '
                  '(model.backbone.adapter.merged=True builds this structure).\n'
                  + ''.join(f'#   {n}\n' for n in unfolded))
        check = build_model(out_cfg.model)
    else:
        out_cfg = plain_config(cfg)
        header = f'{MARKER}: every adapter folded, the model is the upstream one.\n'
        check = build_model(out_cfg.model)
        leftovers = [k for k in merged_state if is_adapter_name(k)]
        if leftovers:
            raise CLIError(f'adapter tensors left after a complete merge '
                           f'({_first(leftovers)}); nothing written')
    # The round trip a user makes: the written config's model loads OUT exactly.
    check_state_dict_matches(check, merged_state, args.out, config_path_for(args.out))
    check.load_state_dict(merged_state, strict=True)
    again = max_difference(merged, features(check, inputs))
    if again > args.tolerance * scale:
        raise CLIError(f'the model of the written config, with OUT loaded, differs from '
                       f'the merged model by {again:.3e}; nothing written')

    if note:          # every check passed: the settings left unchecked, said once
        print(note, file=sys.stderr)
    meta = dict(merged_from=osp.abspath(args.checkpoint),
                config=osp.abspath(args.config),
                max_abs_difference=diff,
                unfolded=list(unfolded))
    if unfolded:   # the merged model still has adapters: record their settings
        from colora_mm.engine.adapter_settings import META_KEY
        meta[META_KEY] = current
    source_meta = source.get('meta') if isinstance(source, dict) else None
    if isinstance(source_meta, dict) and 'dataset_meta' in source_meta:
        # the class names and palette: what the upstream inference APIs label with
        meta['dataset_meta'] = source_meta['dataset_meta']
    checkpoint = dict(meta=meta, state_dict={k: v.detach().cpu().contiguous()
                                             for k, v in merged_state.items()})
    text = header + out_cfg.pretty_text
    out_config = config_path_for(args.out)

    def write_text(path):
        with open(path, 'w') as f:
            f.write(text)

    _atomic_pairs([(args.out, lambda p: torch.save(checkpoint, p)),
                   (out_config, write_text)])
    kind = ('upstream keys, loads without colora_mm' if not unfolded
            else f'{len(unfolded)} adapters kept')
    print(f'wrote {args.out} ({kind}) and {out_config}')


def _first(names):
    return ', '.join(sorted(names)[:3])


def main(argv=None):
    return run_cli(merge, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())

"""Train a segmentor (mmseg) or a detector (mmdet) from a colora_mm config.

The flags are those of mmseg's and mmdet's ``tools/train.py``; the config's
``default_scope`` picks the codebase. On a host without CUDA, ``--launcher pytorch``
(``tools/dist_train.sh``) runs DDP on the CPU with the gloo backend: this script sets
the backend and the DDP wrapper up itself.

Before the runner (or a work dir) exists, the settings are checked, and a wrong one
ends the run with one ``error:`` line naming the key, the value and the fix (exit
status 2): the backbone's adapter spec (every key and its type, and the rank of every
adapted layer: the backbone is built on the meta device), ``--amp`` against the devices
present, local pretrained checkpoints (they exist and look whole; a pretrained URL that
cannot be fetched ends the run with one ``error:`` line when the model initialises),
the data roots and their sub-folders, and for
``--resume`` the checkpoint (the newest one that loads, when none is named) and the
adapter settings it was trained with (``--allow-mismatch`` overrides), and a local
``load_from`` checkpoint likewise (one trained without adapter tensors, e.g. full
fine-tuning, initialises any config). ``--check-only`` runs these checks and exits
(``tools/dist_train.sh`` runs it once, so that a wrong setting is one error line, not
one per process and torchrun's report of the failed processes).

    python tools/train.py configs/ade20k/colora_convnext_b.py --work-dir work_dirs/b
    bash tools/dist_train.sh configs/ade20k/colora_convnext_b.py 4 --amp
"""
import argparse
import contextlib
import os
import os.path as osp
import sys
import warnings

# mmengine 0.10.7 imports pkg_resources, which setuptools deprecates; nothing for a
# user to act on, and it would bury the tools' own messages.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

SCOPES = ('mmseg', 'mmdet')
#: Arguments the CoLoRA backbones add to the upstream ones.
ADAPTER_ARGS = ('adapter', 'attn_adapter', 'adapter_spatial')


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, nothing written."""


def run_cli(run, args):
    """``run(args)``; a :class:`CLIError` becomes one ``error:`` line on stderr and
    exit status 2 (the tools' ``main``)."""
    try:
        run(args)
    except CLIError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Train a colora_mm segmentor or detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or without a value from the latest '
        'checkpoint in the work_dir')
    parser.add_argument(
        '--allow-mismatch',
        action='store_true',
        help='resume (or start from load_from) although the adapter settings recorded '
        "in the checkpoint differ from the config's")
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (needs a GPU)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the lr with the actual batch size (mmdet configs)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value (nested keys with dots)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument(
        '--check-only',
        action='store_true',
        help='run every check of the config, the options, the data folders and the '
        'checkpoints, then exit without training or writing anything (status 0: '
        'training would start; tools/dist_train.sh runs this once before it starts '
        'the processes)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parse_with_clear_errors(parser, argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def load_config(path, cfg_options=None):
    """Load ``path``, apply ``--cfg-options``, enter the config's registry scope.

    Raises:
        CLIError: missing file, unknown scope.
    """
    if not osp.isfile(path):
        raise CLIError(f'config file {path} does not exist')
    if not path.lower().endswith(('.py', '.yml', '.yaml', '.json')):
        raise CLIError(f'{path} is not a config file (.py, .yml, .yaml or .json); the '
                       'config comes first, e.g. configs/ade20k/colora_convnext_b.py')
    import colora_mm  # noqa: F401  (compat fixes, registries)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    if cfg_options:
        check_option_keys(cfg, cfg_options, path)
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise CLIError(f"{path}: default_scope={scope!r}; colora_mm's tools run "
                       f'{" or ".join(SCOPES)} configs')
    init_default_scope(scope)
    return cfg


#: Top-level keys mmengine 0.10's ``Runner`` reads from its config besides its arguments.
RUNNER_CFG_KEYS = {'compile', 'model_wrapper_cfg', 'sync_bn', 'find_unused_parameters',
                   'activation_checkpointing', 'efficient_conv_bn_eval'}


def runner_keys():
    """The top-level config keys mmengine's ``Runner`` reads: its arguments and what it
    looks up in its config itself (:data:`RUNNER_CFG_KEYS`)."""
    import inspect

    from mmengine.runner import Runner
    return (set(inspect.signature(Runner.__init__).parameters) - {'self'}) | RUNNER_CFG_KEYS


def check_option_keys(cfg, cfg_options, path):
    """Refuse a ``--cfg-options`` key whose first part is neither in the config nor a
    key the runner reads (``modle.backbone...``: merged as a new key, it would be
    ignored while the run goes on), with the nearest key as the likely fix."""
    import difflib
    known = set(cfg.keys()) | runner_keys()
    for key in cfg_options:
        top = key.split('.', 1)[0]
        if top in known:
            continue
        near = difflib.get_close_matches(top, sorted(known), n=1)
        hint = (f'did you mean {near[0]}{key[len(top):]}?' if near else
                f'the top-level keys of {path} are ' + ', '.join(sorted(cfg.keys())))
        raise CLIError(f'--cfg-options {key}: {path} has no top-level key {top!r} and '
                       f'the runner reads none, so the option would be ignored; {hint}')


def parse_with_clear_errors(parser, argv):
    """``parser.parse_args``; mmengine's ``DictAction`` raises a bare ValueError for a
    ``--cfg-options`` item without ``=``: made a usage error."""
    try:
        return parser.parse_args(argv)
    except ValueError as err:
        parser.error(f'--cfg-options: {err}; write each option as KEY=VALUE '
                     '(e.g. model.backbone.adapter.gamma=8)')


def _datasets(cfg, splits):
    for split in splits:
        loader = cfg.get(split)
        if not loader:
            continue
        dataset = loader.get('dataset', {})
        while 'dataset' in dataset:   # RepeatDataset, ClassBalancedDataset...
            dataset = dataset['dataset']
        yield split, dataset


def check_data_roots(cfg, splits):
    """Fail early, naming the fix, when a dataset folder, one of its sub-folders
    (``data_prefix``) or its annotation file is missing or empty (rather than deep
    inside a dataloader worker)."""
    for split, dataset in _datasets(cfg, splits):
        root = dataset.get('data_root') or ''
        hint = ('prepare the dataset as docs/data.md describes, or point the config at '
                f'it with --cfg-options {split}.dataset.data_root=PATH')
        if root and not osp.isdir(root):
            raise CLIError(f'{split}: data_root {root!r} does not exist; {hint}')
        ann_file = dataset.get('ann_file') or ''
        if ann_file:
            ann_path = ann_file if osp.isabs(ann_file) else osp.join(root, ann_file)
            if not osp.isfile(ann_path):
                raise CLIError(f'{split}: annotation file {ann_path!r} does not exist; '
                               f'{hint}')
        prefixes = dataset.get('data_prefix') or {}
        for key, prefix in sorted(prefixes.items()):
            if not isinstance(prefix, str) or not prefix:
                continue
            folder = prefix if osp.isabs(prefix) else osp.join(root, prefix)
            if not osp.isdir(folder):
                raise CLIError(f'{split}: data_prefix.{key} folder {folder!r} does not '
                               f'exist; {hint}')
            if not os.listdir(folder):
                raise CLIError(f'{split}: data_prefix.{key} folder {folder!r} is empty; '
                               f'{hint}')


ALL_SPLITS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def dataset_folders(cfg, splits=ALL_SPLITS):
    """``(split, folder, holds_files)`` for every local folder the config's datasets
    read: each ``data_prefix`` folder (holding the files), and ``data_root`` (holding
    them itself when no prefix names a sub-folder)."""
    for split, dataset in _datasets(cfg, splits):
        root = dataset.get('data_root') or ''
        prefixes = [p for p in (dataset.get('data_prefix') or {}).values()
                    if isinstance(p, str) and p]
        if root:
            yield split, root, not prefixes
        for prefix in prefixes:
            yield split, prefix if osp.isabs(prefix) else osp.join(root, prefix), True


def check_output_outside_data(cfg, flag, path):
    """Refuse an output path in a dataset's folder, where what a tool writes would
    replace or mix with the dataset's own files (predictions named like the ground
    truth, say)."""
    out = osp.realpath(osp.expanduser(path))
    for split, folder, holds_files in dataset_folders(cfg):
        real = osp.realpath(osp.expanduser(folder))
        inside = holds_files and out.startswith(real.rstrip(os.sep) + os.sep)
        if out == real or inside:
            raise CLIError(f'{flag} {path!r} is in the dataset folder {folder!r} of '
                           f'{split}: the files written there could replace the '
                           f"dataset's own; write them to a folder outside the dataset, "
                           f'e.g. {flag} work_dirs/out')


def check_work_dir(path):
    """The work dir may exist, as a folder."""
    if osp.exists(path) and not osp.isdir(path):
        raise CLIError(f'--work-dir {path!r} is a file, not a folder; name a folder '
                       '(it is created when missing)')


def model_cfg_of(cfg):
    """The model config (the wrapped one of a test-time-augmentation model)."""
    model = cfg.get('model') or {}
    return model.get('module', model)


def check_adapter(cfg, config):
    """Check the backbone's adapter spec, key by key and type by type, then build the
    backbone on the meta device (no memory, no weights): every adapted layer's rank
    and shape is checked as in the real build. Returns the adapter settings record
    (:mod:`colora_mm.engine.adapter_settings`).

    Raises:
        CLIError: naming the key, the value and the fix.
    """
    from colora_mm.engine.adapter_settings import adapter_settings
    built = checked_backbone(cfg, config)
    return {} if built is None else adapter_settings(built, prefix='backbone')


def checked_backbone(cfg, config):
    """:func:`check_adapter`'s checks; returns the backbone built on the meta device
    (None when the config names no backbone)."""
    from colora_mm.engine.adapter_settings import build_backbone_cheaply, check_spec_types
    model = model_cfg_of(cfg)
    backbone = model.get('backbone') if model else None
    if not backbone:
        return None
    if 'adapter' in backbone:
        try:
            check_spec_types(backbone['adapter'])
        except ValueError as err:
            raise CLIError(f'{config}: model.backbone.adapter: {err}; fix it in the '
                           'config or with --cfg-options model.backbone.adapter.KEY=VALUE')
    from mmengine.config import Config
    try:
        return build_backbone_cheaply(Config(dict(model=dict(backbone=backbone),
                                                  default_scope=cfg.default_scope)))
    except (ValueError, TypeError, KeyError, AssertionError, IndexError) as err:
        raise CLIError(backbone_error(err, backbone, config))


def check_adapter_and_hooks(cfg, config):
    """:func:`check_adapter`, then :func:`check_hooks` on the same backbone."""
    from colora_mm.engine.adapter_settings import adapter_settings
    backbone = checked_backbone(cfg, config)
    check_hooks(cfg, config, backbone)
    check_activation_checkpointing(cfg, config, backbone)
    return {} if backbone is None else adapter_settings(backbone, prefix='backbone')


def check_activation_checkpointing(cfg, config, backbone):
    """Refuse mmengine's ``activation_checkpointing`` on modules that hold CoLoRA pairs
    with ``partner_policy='effective'``: it recomputes their forward pass in backward,
    after the partners moved on (the backbones refuse ``with_cp=True`` for the same
    reason; the pairs also refuse such a pass when it runs).

    Raises:
        CLIError: naming the module and the fix.
    """
    names = cfg.get('activation_checkpointing')
    if not names or backbone is None:
        return
    from colora_mm.adapters.colora_pair import CoLoRAPairLayer
    for name in [names] if isinstance(names, str) else list(names):
        if name != 'backbone' and not str(name).startswith('backbone.'):
            continue
        module = backbone
        try:
            for part in str(name).split('.')[1:]:
                module = getattr(module, part)
        except AttributeError:
            raise CLIError(f'{config}: activation_checkpointing names {name!r}, which the '
                           'backbone does not have; name one of its modules '
                           '(e.g. backbone.stages.0)') from None
        if any(isinstance(m, CoLoRAPairLayer) and m.get_pair().partner_policy ==
               'effective' for m in module.modules()):
            raise CLIError(
                f'{config}: activation_checkpointing names {name!r}, which holds CoLoRA '
                "pairs with partner_policy='effective': checkpointing recomputes their "
                'forward pass during backward, after the effective partner weights have '
                'moved on, so the gradients would belong to another function; leave it '
                "out of activation_checkpointing, or set model.backbone.adapter."
                "partner_policy='frozen'")


def check_hooks(cfg, config, backbone):
    """Build each of this package's hooks in ``custom_hooks`` (their constructors check
    their arguments) and let those that check the model (``check_model``) check
    ``backbone``, the one :func:`checked_backbone` built: a hook that cannot work on
    this model is refused before the work directory exists.

    Raises:
        CLIError: naming the hook, its place in ``custom_hooks`` and the fix.
    """
    from colora_mm.engine import hooks as ours
    for i, hook_cfg in enumerate(cfg.get('custom_hooks') or []):
        if not isinstance(hook_cfg, dict):
            continue
        kind = hook_cfg.get('type')
        cls = kind if isinstance(kind, type) else getattr(ours, str(kind), None)
        if not (isinstance(cls, type) and cls.__module__ == ours.__name__):
            continue
        where = f'{config}: custom_hooks[{i}] ({cls.__name__})'
        args = {k: v for k, v in hook_cfg.items() if k not in ('type', 'priority')}
        try:
            hook = cls(**args)
            if backbone is not None and hasattr(hook, 'check_model'):
                hook.check_model(backbone)
        except (TypeError, ValueError) as err:
            text = str(err)
            if text.startswith(f'{cls.__name__}: '):
                text = text[len(cls.__name__) + 2:]
            raise CLIError(f'{where}: {text}')


def backbone_error(err, backbone, config):
    """One line for an exception raised while building the backbone: a key the
    backbone does not take named with the nearest one it does; an upstream assertion or
    index error blamed on the backbone's settings, not on the adapter."""
    import difflib
    import re
    kind = backbone.get('type')
    text = str(err).strip().splitlines()[0] if str(err).strip() else ''
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
    if isinstance(err, TypeError) and unexpected:
        key = unexpected.group(1)
        near = difflib.get_close_matches(
            key, [k for k in backbone if k != key] + list(ADAPTER_ARGS), n=1)
        fix = f'did you mean model.backbone.{near[0]}?' if near else 'remove it'
        return f'{config}: model.backbone.{key} is not an argument of {kind}; {fix}'
    message = text.strip("'\"") or type(err).__name__
    if isinstance(err, (AssertionError, IndexError)):
        return (f'{config}: model.backbone ({kind}): the upstream backbone refused its '
                f'settings ({type(err).__name__}: {message}); check the backbone keys '
                '(arch, depths, widths, heads, window and input sizes)')
    where = 'model.backbone.adapter' if 'adapter' in backbone else 'model.backbone'
    return f'{config}: {where} ({kind}): {message}'


def _pretrained_paths(node, key=''):
    """``(config key, path)`` of every pretrained checkpoint a model config names."""
    if isinstance(node, dict):
        if node.get('type') == 'Pretrained' and isinstance(node.get('checkpoint'), str):
            yield f'{key}.checkpoint', node['checkpoint']
        for k, v in node.items():
            if k == 'pretrained' and isinstance(v, str):
                yield f'{key}.{k}', v
            elif isinstance(v, (dict, list, tuple)):
                yield from _pretrained_paths(v, f'{key}.{k}' if key else k)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _pretrained_paths(v, f'{key}.{i}')


def unreadable_checkpoint(path):
    """Why the file ``path`` cannot be a whole ``torch.save`` checkpoint, judged from
    its size, its first bytes and its zip archive's end record (nothing is loaded), or
    None when it may be one."""
    import zipfile
    if osp.getsize(path) == 0:
        return 'the file is empty'
    with open(path, 'rb') as f:
        head = f.read(2)
    if head == b'PK':
        if not zipfile.is_zipfile(path):
            return ('the file is truncated or corrupt (its zip archive has no end '
                    'record): not a whole torch.save file')
        return None
    if head[:1] == b'\x80':       # a pickle: torch.save's legacy format
        return None
    return 'the file is not a PyTorch checkpoint (neither a zip archive nor a pickle)'


def check_pretrained(cfg):
    """Every local pretrained checkpoint the model names exists and looks whole (URLs
    are fetched by mmengine when the model initialises: one that cannot be fetched
    ends the run there, with one error line)."""
    for key, path in _pretrained_paths(model_cfg_of(cfg), 'model'):
        if '://' in path:
            continue
        if not osp.isfile(osp.expanduser(path)):
            raise CLIError(f'{key}={path!r} does not exist; download the checkpoint '
                           f'there, or point the config at it with --cfg-options '
                           f'{key}=PATH')
        why = unreadable_checkpoint(osp.expanduser(path))
        if why:
            raise CLIError(f'{key}={path!r}: {why}; download the checkpoint again, or '
                           f'point the config at another one with --cfg-options '
                           f'{key}=PATH')


def accelerator_available():
    import torch
    from mmengine.device import (is_mlu_available, is_musa_available,
                                 is_npu_available)
    return (torch.cuda.is_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def check_amp(cfg, amp_flag):
    """Mixed precision (``AmpOptimWrapper``) needs a GPU (mmengine 0.10.7 refuses it
    on a CPU, after the runner has started)."""
    wrapper = (cfg.get('optim_wrapper') or {}).get('type', 'OptimWrapper')
    if wrapper != 'AmpOptimWrapper' or accelerator_available():
        return
    if amp_flag:
        raise CLIError('--amp: mixed precision needs a GPU (or NPU/MLU/MUSA) and this '
                       'host has none; drop --amp')
    raise CLIError("optim_wrapper.type='AmpOptimWrapper' (mixed precision) needs a GPU "
                   'and this host has none; train in full precision with --cfg-options '
                   'optim_wrapper.type=OptimWrapper')


def read_checkpoint(path):
    """A whole mmengine checkpoint, loaded on the CPU.

    Raises:
        CLIError: missing or unreadable file.
    """
    if not osp.isfile(path):
        raise CLIError(f'checkpoint {path} does not exist')
    from colora_mm.compat import load_from_local_trusted
    try:
        return load_from_local_trusted(path, map_location='cpu')
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a user error
        why = unreadable_checkpoint(path)
        detail = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'
        raise CLIError(f'cannot read checkpoint {path}: '
                       + (f'{why} ({detail}); copy or download it again' if why
                          else detail))


def check_settings_match(checkpoint, path, current, config, allow_mismatch,
                         flag='--allow-mismatch'):
    """Refuse a checkpoint trained with other adapter settings than ``config``'s
    (``current``: the config's record), listing every differing key. Returns a warning
    line where the checkpoint records no settings (a bare state dict) and the config
    has unmerged adapters: the settings that change no tensor cannot be compared. The
    caller prints it once its own checks have passed, so that a refusal stays one
    line."""
    from colora_mm.engine.adapter_settings import (recorded_adapter_settings,
                                                   settings_differences)
    recorded = recorded_adapter_settings(checkpoint)
    if recorded is None:
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        written_by_merge = isinstance(meta, dict) and 'merged_from' in meta
        if not written_by_merge and any(
                s.get('method') not in ADAPTER_FREE_METHODS and not s.get('merged')
                for s in current.values()):
            return (f'warning: checkpoint {path} records no adapter settings (no '
                    "meta['adapter_settings'], no meta['cfg']): the settings of config "
                    f'{config} that change no tensor (e.g. scaling, filter_lambda, '
                    'use_filter, partner_policy) are taken as they are, unchecked; use '
                    'the config the checkpoint was trained with')
        return None
    diffs = settings_differences(recorded, current)
    if not diffs:
        return
    line = (f'checkpoint {path} does not match config {config}: it was trained with '
            f'other adapter settings ({"; ".join(diffs)})')
    if allow_mismatch:
        print(f'warning: {line} ({flag} given: going on)', file=sys.stderr)
        return
    raise CLIError(f'{line}. Use the config the checkpoint was trained with (saved in '
                   f'its work_dir), or pass {flag}')


def resolve_resume(cfg, args, current):
    """The checkpoint ``--resume`` continues from, checked: a named one must load;
    without a name, the newest checkpoint of the work dir that loads (saying which
    damaged ones it skipped). Its adapter settings must be the config's."""
    from colora_mm.engine.checkpoint_hook import (describe_skipped,
                                                  find_resumable_checkpoint,
                                                  read_resumable)
    if args.resume is None:
        return
    if args.resume == 'auto':
        hook = (cfg.get('default_hooks') or {}).get('checkpoint') or {}
        templates = [hook['filename_tmpl']] if hook.get('filename_tmpl') else []
        try:
            path, checkpoint, skipped = find_resumable_checkpoint(cfg.work_dir,
                                                                  templates)
        except ValueError as err:
            raise CLIError(f'--resume: {err}; resume from another one with --resume '
                           'PATH, or start again in a new --work-dir')
        if path is None:
            print(f'resume: no checkpoint in {cfg.work_dir}; training from the start')
            return
        if skipped:
            print(describe_skipped(skipped, path))
        cfg.load_from = path
    else:
        path = args.resume
        try:
            checkpoint = read_resumable(path)
        except ValueError as err:
            raise CLIError(f'--resume: checkpoint {path} {err}; name another checkpoint')
    note = check_settings_match(checkpoint, path, current, args.config,
                                args.allow_mismatch)
    if note:
        print(note, file=sys.stderr)


# Methods whose checkpoints hold no adapter tensors: their weights initialise any config.
ADAPTER_FREE_METHODS = ('full', 'bitfit')


def check_load_from(cfg, args, current):
    """``load_from`` (weights only; ``--resume`` is checked on its own): a local
    checkpoint must exist and load. mmengine loads it non-strictly, so one trained with
    other adapter settings would lose its adapter tensors (the fine-tuning) while the
    run goes on: such a checkpoint is refused unless ``--allow-mismatch``. One without
    adapter tensors (full fine-tuning, bitfit, an upstream model) initialises the base
    weights of any config. URLs are fetched by mmengine and not checked here."""
    path = cfg.get('load_from')
    if args.resume is not None or not path or not isinstance(path, str) or '://' in path:
        return
    try:
        checkpoint = read_checkpoint(osp.expanduser(path))
    except CLIError as err:
        raise CLIError(f'load_from: {err}; point load_from at an existing checkpoint '
                       '(--cfg-options load_from=PATH) or remove it (load_from=None)')
    from colora_mm.engine.adapter_settings import recorded_adapter_settings
    recorded = recorded_adapter_settings(checkpoint) or {}
    if any(s.get('method') not in ADAPTER_FREE_METHODS for s in recorded.values()):
        # it records settings: nothing goes unchecked, no note
        check_settings_match(checkpoint, f'{path} (load_from)', current, args.config,
                             args.allow_mismatch)


def check_before_work(cfg, args):
    """Every check of the settings that can fail, before the runner exists."""
    current = check_adapter_and_hooks(cfg, args.config)
    check_amp(cfg, args.amp)
    check_pretrained(cfg)
    resolve_resume(cfg, args, current)
    check_load_from(cfg, args, current)


def read_state_dict(path, ckpt=None):
    """The model state dict of an mmengine checkpoint (or of a bare state dict);
    ``ckpt``: the checkpoint, when already loaded.

    Raises:
        CLIError: missing or unreadable file, no tensors in it.
    """
    import torch
    if ckpt is None:
        ckpt = read_checkpoint(path)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f'{path} holds no model state dict')
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def _examples(names, limit=3):
    names = sorted(names)
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def check_state_dict_matches(model, state, checkpoint, config):
    """Refuse a checkpoint whose tensors are not exactly the model's (names and
    shapes), naming what differs.

    Raises:
        CLIError: with counts and examples of missing, unexpected and reshaped tensors.
    """
    from colora_mm.adapters.colora_pair import state_dict_differences
    own = model.state_dict()
    missing, unexpected, reshaped = state_dict_differences(own, state)
    reshaped = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in reshaped]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f'{len(missing)} tensors of the model missing ({_examples(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({_examples(unexpected)})')
    if reshaped:
        parts.append(f'{len(reshaped)} with other shapes (checkpoint vs model: '
                     f'{_examples(reshaped)})')
    raise CLIError(f'checkpoint {checkpoint} does not match config {config}: '
                   + '; '.join(parts) + '. Use the config the checkpoint was trained '
                   'with (it is saved in its work_dir).')


def setup_cfg(args):
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    check_work_dir(cfg.work_dir)

    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print('AMP training is already enabled in the config.')
        elif wrapper != 'OptimWrapper':
            raise CLIError(f'--amp needs optim_wrapper.type OptimWrapper, the config '
                           f'has {wrapper}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise CLIError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the '
                           'config')
        cfg.auto_scale_lr.enable = True

    if args.resume is None and cfg.get('resume'):
        # as mmseg's tools/train.py: only --resume resumes (a config a run saved with
        # --resume says resume = True, and must not resume another run by itself)
        # its load_from is the checkpoint that run resumed from, not weights to start
        # a new run with
        dropped = cfg.get('load_from')
        print('note: the config says resume = True (a config saved by a resumed run); '
              'not resuming, pass --resume to resume'
              + (f"; its load_from {dropped!r} (the checkpoint it resumed from) is not "
                 'loaded either' if dropped else ''))
        cfg.resume = False
        cfg.load_from = None
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise CLIError(f'--resume: checkpoint {args.resume} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume

    drop_amp_settings(cfg)

    splits = {'train_dataloader'}
    if cfg.get('val_cfg') and cfg.get('val_dataloader'):
        splits.add('val_dataloader')
    check_data_roots(cfg, splits)

    from colora_mm.compat import configure_cpu_ddp
    configure_cpu_ddp(cfg)   # gloo and device_ids=None when there is no CUDA
    return cfg


def drop_amp_settings(cfg):
    """``AmpOptimWrapper``'s arguments left in an ``OptimWrapper`` (a mixed-precision
    config switched to full precision with ``--cfg-options
    optim_wrapper.type=OptimWrapper``, what the CPU check advises), which it refuses:
    left out, with a note."""
    wrapper = cfg.get('optim_wrapper') or {}
    if wrapper.get('type', 'OptimWrapper') != 'OptimWrapper':
        return
    dropped = [key for key in ('loss_scale', 'dtype') if key in wrapper]
    for key in dropped:
        wrapper.pop(key)
    if dropped:
        print(f'note: optim_wrapper is OptimWrapper (full precision): its '
              f'mixed-precision setting(s) {", ".join(dropped)} left out')


def keep_input_config(cfg, config_path):
    """mmengine's runner saves the config it runs as ``WORK_DIR/<config file name>``:
    where that file is the input config itself (a work dir's saved config run again),
    this run's config is saved beside it as ``<name>_run.py`` instead, so that the
    input is never overwritten."""
    if not cfg.filename:
        return
    target = osp.join(cfg.work_dir, osp.basename(cfg.filename))
    if not (osp.exists(target) and osp.exists(config_path)
            and osp.samefile(target, config_path)):
        return
    from mmengine.config import Config
    stem = osp.splitext(osp.basename(cfg.filename))[0]
    renamed = osp.join(osp.dirname(cfg.filename), f'{stem}_run.py')
    super(Config, cfg).__setattr__('_filename', renamed)
    print(f'note: {config_path} is the config this work dir keeps; this run\'s config '
          f'is saved as {osp.join(cfg.work_dir, osp.basename(renamed))} (the input is '
          'not overwritten)')


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = setup_cfg(args)
        check_before_work(cfg, args)
        if args.check_only:
            print(f'checked: {args.config} would train in {cfg.work_dir}')
            return 0
        keep_input_config(cfg, args.config)
    except CLIError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    from colora_mm.models.pretrained import PretrainedCheckpointError
    try:
        with process_group_closed():
            runner.train()
            del runner   # its model wrapper holds the process group: see close_process_group
    except PretrainedCheckpointError as err:
        # a pretrained URL that could not be fetched (offline) or a file damaged on the
        # way: the message names the backbone, the source and the fix
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def process_group_closed():
    """Run the block, then :func:`close_process_group`: waiting for every rank after
    a block that succeeded, at once after one that raised (which is re-raised). A
    block that built the runner drops it at its end (``del runner``), so that the
    group goes with it."""
    try:
        yield
    except BaseException:
        close_process_group(wait_for_peers=False)
        raise
    close_process_group()


def close_process_group(wait_for_peers=True):
    """End a distributed run cleanly.

    After a run that succeeded every rank waits at a barrier, so that no group is torn
    down while a peer is still in its last collective (the final metrics broadcast,
    say); after a failure the barrier is skipped: the peers may never reach it.

    ``destroy_process_group`` only unregisters the group. The model wrapper (DDP's
    reducer) holds it too, and mmengine's runner sits in reference cycles, so the
    group, and gloo's worker threads with it, lived on into the interpreter's
    shutdown. A worker thread that then released the tensors of a finished
    collective (the objects ``broadcast_object_list`` sends) needed the GIL, which a
    finalizing interpreter no longer hands out: the process aborted ("terminate
    called without an active exception", SIGABRT) after a run that had finished and
    saved everything. So what the caller has dropped (the runner) is collected here,
    while this function still holds the group, and the group's last reference is
    dropped last: its Python handle destroys it with the GIL released, and joins
    gloo's threads, before the interpreter shuts down.
    """
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        held = [dist.group.WORLD]
        dist.destroy_process_group()
        gc.collect()
        held.clear()


if __name__ == '__main__':
    sys.exit(main())

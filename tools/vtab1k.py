"""Run the VTAB-1k benchmark with one config: every task and seed, then the summary.

    python tools/vtab1k.py configs/vtab1k/colora_convnext_s_1xb32-100e_vtab1k-224x224.py
    python tools/vtab1k.py CONFIG --tasks natural dtd --seeds 0 1 2 --work-dir W --gpus 4
    python tools/vtab1k.py CONFIG --summary-only --paper      # the table from W, no runs

For each task and seed: train on ``train800val200`` (the config's schedule, the seed as
``randomness.seed``), test top-1 on ``test``, write ``W/<task>/seed_<seed>/result.json``.
A task/seed with a result is skipped; one that was stopped resumes from its last
checkpoint. Each ``result.json`` records the model it was trained with (the config path,
the backbone and method, the model config with ``--cfg-options``, the adapter
settings of the built backbone and the training schedule: ``train_cfg``,
``optim_wrapper``, ``param_scheduler``, the batch); a stored result of another model or
schedule is refused before any work, naming what differs (a result without that record,
written by an earlier version, is taken with a note). So is a stopped run started with
another model or schedule (each run writes
``definition.json``, the same record, when it starts), or one whose checkpoint was trained
with other adapter settings than the config's, or whose checkpoints are all damaged.
After every run ``W/results.json`` (every result, the per-task mean and
standard deviation over the seeds, the group averages) and ``W/results.md`` (tables laid
out like the paper's Tables 5-7, with ``--paper`` the paper's row beside ours) are
rewritten. One progress line per task and seed, with the estimated time left.

Before any run (or folder) exists, the settings are checked as tools/train.py checks
them: the backbone's adapter spec (built on the meta device), mixed precision against the
devices present, local pretrained checkpoints, the data layout; a wrong one ends with one
``error:`` line (exit status 2).

The task is set in the config for each run (``train_dataloader.dataset.task``,
``test_dataloader.dataset.task``, ``model.head.num_classes``). With ``--gpus N > 1``
each run is launched on N processes by torchrun (DDP through mmengine, the batch of 32
split over them); otherwise the runs execute in this process, one after the other.
"""
import argparse
import copy
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from train import (CLIError, check_adapter_and_hooks, check_amp,  # noqa: E402
                   check_option_keys, check_pretrained, check_settings_match,
                   check_work_dir, drop_amp_settings, process_group_closed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train and test a config on the VTAB-1k tasks and summarise')
    parser.add_argument('config', help='a configs/vtab1k config')
    parser.add_argument('--tasks', nargs='+', default=['all'],
                        help='all, natural, specialized, structured, or task names '
                        '(folder names such as dtd, or the paper\'s column names)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--work-dir', help='where runs and results go; defaults to '
                        'work_dirs/vtab1k/<config name>')
    parser.add_argument('--data-root', help='the VTAB-1k root (one folder per task); '
                        'defaults to the config\'s data_root')
    parser.add_argument('--gpus', type=int, default=1,
                        help='processes (GPUs) per run; > 1 launches torchrun')
    parser.add_argument('--paper', action='store_true',
                        help='put the paper\'s row beside ours in results.md')
    parser.add_argument('--keep-checkpoints', action='store_true',
                        help='keep the checkpoints of finished runs (by default they '
                        'are removed once the result is written)')
    parser.add_argument('--summary-only', action='store_true',
                        help='only rebuild results.json / results.md from finished runs')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override settings of the config (as tools/train.py)')
    # One run, inside torchrun (set by this tool).
    parser.add_argument('--run-one', nargs=2, metavar=('TASK', 'SEED'),
                        help=argparse.SUPPRESS)
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help=argparse.SUPPRESS)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cfg_options_dict(pairs):
    """``key=value`` strings -> dict, parsed as mmengine's ``DictAction`` does."""
    if not pairs:
        return {}
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    try:
        return parser.parse_args(['--o', *pairs]).o
    except (SystemExit, ValueError):     # DictAction: a bare ValueError without '='
        raise CLIError(f'--cfg-options: cannot parse {pairs}; write each option as '
                       'KEY=VALUE (e.g. train_cfg.max_epochs=50)')


# ---------------------------------------------------------------- config
def load_config(path, cfg_options, data_root=None):
    """The config with ``--cfg-options`` and ``--data-root`` applied.

    Raises:
        CLIError: missing file, not an mmpretrain config, datasets not ``VTAB1k``.
    """
    if not osp.isfile(path):
        raise CLIError(f'config file {path} does not exist')
    import colora_mm  # noqa: F401  (registries, compat fixes)
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    if cfg_options:
        check_option_keys(cfg, cfg_options, path)
        try:
            cfg.merge_from_dict(cfg_options)
        except (TypeError, KeyError) as err:
            message = str(err).strip("'\"").splitlines()[0] if str(err) else ''
            raise CLIError(f'--cfg-options: {message or type(err).__name__}')
    if cfg.get('default_scope') != 'mmpretrain':
        raise CLIError(f'{path}: default_scope={cfg.get("default_scope")!r}; VTAB-1k '
                       'runs need an mmpretrain classification config (configs/vtab1k)')
    for split in ('train_dataloader', 'test_dataloader'):
        dataset = (cfg.get(split) or {}).get('dataset') or {}
        if dataset.get('type') != 'VTAB1k':
            raise CLIError(f'{path}: {split}.dataset.type is {dataset.get("type")!r}; '
                           "this tool sets the task of a 'VTAB1k' dataset "
                           '(configs/_base_/vtab1k_1xb32-100e.py)')
        if data_root is not None:
            dataset['data_root'] = data_root
    drop_amp_settings(cfg)
    return cfg


def set_task(cfg, task, seed, run_dir):
    """Point the config at one task and seed, in ``run_dir``."""
    cfg.train_dataloader.dataset.task = task.name
    cfg.test_dataloader.dataset.task = task.name
    cfg.model.head.num_classes = task.num_classes
    cfg.randomness = dict(cfg.get('randomness') or {}, seed=seed)
    cfg.work_dir = run_dir
    cfg.experiment_name = f'{task.name}_seed{seed}'
    cfg.resume = osp.isfile(osp.join(run_dir, 'last_checkpoint'))
    cfg.load_from = None
    return cfg


def model_identity(cfg):
    """``(backbone key, adapter method)`` of a config: ``'resnet50'``, ``'convnext_s'``,
    ``'convnext_b'`` or the backbone type; the method (``'full'`` without adapter)."""
    backbone = cfg.model.backbone
    kind = backbone.get('type', '?')
    if 'ConvNeXt' in kind:
        arch = backbone.get('arch')
        if isinstance(arch, str):
            kind = {'small': 'convnext_s', 'base': 'convnext_b'}.get(arch, kind)
    elif ('ResNet' in kind and backbone.get('depth') == 50
          and backbone.get('base_channels', 64) == 64):
        kind = 'resnet50'
    adapter = backbone.get('adapter') or {}
    return kind, adapter.get('method', 'full')


#: A run dir's record of the model it was started with (:func:`run_definition`).
DEFINITION = 'definition.json'


def _plain_json(value):
    """``value`` as JSON holds it (tuples as lists, other objects by ``repr``)."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def run_definition(cfg, config, settings):
    """What defines a run's model, recorded in its ``definition.json`` when it starts
    and in its ``result.json``: the config path,
    the backbone and method (:func:`model_identity`), the model config as loaded (with
    ``--cfg-options``, before the task sets the head's classes) and the adapter
    settings of the built backbone (``settings``: :func:`train.check_adapter`'s
    record)."""
    backbone, method = model_identity(cfg)
    return dict(config=osp.abspath(config), backbone=backbone, method=method,
                model=_plain_json(_as_dict(cfg.model)),
                adapter_settings=_plain_json(settings),
                schedule=_plain_json(dict(
                    train_cfg=_as_dict(cfg.get('train_cfg')),
                    optim_wrapper=_as_dict(cfg.get('optim_wrapper')),
                    param_scheduler=[_as_dict(s) for s in
                                     _as_list(cfg.get('param_scheduler'))],
                    batch_size=(cfg.get('train_dataloader') or {}).get('batch_size'))))


def _as_dict(node):
    if node is None:
        return None
    return copy.deepcopy(node.to_dict() if hasattr(node, 'to_dict') else dict(node))


def _as_list(node):
    if node is None:
        return []
    return list(node) if isinstance(node, (list, tuple)) else [node]


def _flat(node, key='model'):
    if isinstance(node, dict):
        out = {}
        for k in node:
            out.update(_flat(node[k], f'{key}.{k}'))
        return out or {key: {}}
    return {key: node}


def definition_differences(stored, current):
    """What differs between the record of a stored run and this config's: the
    backbone and method, every model config key, the adapter settings (as
    :func:`~colora_mm.engine.adapter_settings.settings_differences` compares them), the
    training schedule (``train_cfg``, ``optim_wrapper``, ``param_scheduler``, the
    batch; records written before the schedule was recorded are compared without
    it)."""
    from colora_mm.engine.adapter_settings import settings_differences
    diffs = [f'{key}: stored {stored.get(key)!r}, config {current[key]!r}'
             for key in ('backbone', 'method') if stored.get(key) != current[key]]
    old, new = _flat(stored.get('model') or {}), _flat(current['model'])
    # the backbone's adapter keys are compared as built (defaults resolved) below
    keys = sorted(k for k in set(old) | set(new) if old.get(k, '?') != new.get(k, '?')
                  and not (k.startswith('model.backbone.')
                           and 'adapter' in k.split('.')[2]))
    show = lambda flat, k: repr(flat[k]) if k in flat else 'unset'  # noqa: E731
    if diffs:       # another backbone or method: its keys say no more
        return diffs
    diffs += [f'{k}: stored {show(old, k)}, config {show(new, k)}' for k in keys[:4]]
    if len(keys) > 4:
        diffs.append(f'{len(keys) - 4} more model keys')
    diffs += [d.replace('checkpoint', 'stored run') for d in settings_differences(
        stored.get('adapter_settings') or {}, current['adapter_settings'])]
    if 'schedule' in stored:
        old = _flat(stored['schedule'] or {}, 'schedule')
        new = _flat(current['schedule'], 'schedule')
        keys = sorted(k for k in set(old) | set(new) if old.get(k, '?') != new.get(k, '?'))
        diffs += [f'{k[len("schedule."):]}: stored {show(old, k)}, config {show(new, k)}'
                  for k in keys[:4]]
        if len(keys) > 4:
            diffs.append(f'{len(keys) - 4} more schedule keys')
    return diffs


def check_stored_result(result, run_dir, definition, config):
    """Refuse a stored result of another model than ``definition``'s; one written
    without a record (by an earlier version of this tool) is taken, with a note.
    Returns the note, or None."""
    stored = result.get('definition')
    if not isinstance(stored, dict):
        return (f'note: {osp.join(run_dir, "result.json")} has no record of the model '
                'it was trained with (written by an earlier version of this tool); it is '
                f'taken as {config}\'s. Remove {run_dir} to run it again')
    diffs = definition_differences(stored, definition)
    if diffs:
        raise CLIError(f'{run_dir} holds the result of another model or schedule than '
                       f'{config} '
                       f'(trained with {stored.get("config")}): {"; ".join(diffs)}. Give '
                       f'this config another --work-dir, or remove {run_dir} to run it '
                       'again with this config')
    if stored.get('config') != definition['config']:
        return (f'note: {run_dir} was trained with {stored.get("config")}, '
                f'the same model as {config}')
    return None


# ---------------------------------------------------------------- one run
def backbone_trainable(model):
    """#Param as the paper counts it: what trains inside the backbone."""
    return sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)


def write_json(path, data):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def run_one(cfg, task, seed, run_dir, launcher='none', keep_checkpoints=False,
            definition=None):
    """Train and test one task/seed with mmengine's Runner; rank 0 writes
    ``run_dir/result.json`` (with ``definition``: :func:`run_definition`). Returns the
    result."""
    from mmengine.dist import get_rank, get_world_size
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    from colora_mm.compat import configure_cpu_ddp
    set_task(cfg, task, seed, run_dir)
    cfg.launcher = launcher
    configure_cpu_ddp(cfg)
    # The config's batch is the total one; torchrun's processes share it.
    processes = int(os.environ.get('WORLD_SIZE', 1)) if launcher != 'none' else 1
    cfg.train_dataloader.batch_size //= processes
    resumed = cfg.resume
    runner = Runner.from_cfg(cfg)
    world = get_world_size()
    start = time.time()
    runner.train()
    metrics = runner.test()
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    key = 'accuracy/top1'
    if key not in metrics:
        raise RuntimeError(f'{task.name} seed {seed}: the test metrics {sorted(metrics)} '
                           f'have no {key!r}; the config\'s test_evaluator must be '
                           "dict(type='Accuracy', topk=(1, ))")
    result = dict(task=task.name, seed=seed, top1=float(metrics[key]),
                  params=backbone_trainable(model),
                  model_trainable=sum(p.numel() for p in model.parameters()
                                      if p.requires_grad),
                  num_classes=task.num_classes, resumed=bool(resumed),
                  epochs=runner.train_loop.max_epochs, gpus=world,
                  seconds=round(time.time() - start, 1), definition=definition)
    if get_rank() == 0:
        write_json(osp.join(run_dir, 'result.json'), result)
        if not keep_checkpoints:
            remove_checkpoints(run_dir)
    # The next run builds its own model and dataloaders in this process.
    del runner, model
    import gc
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def remove_checkpoints(run_dir):
    for name in os.listdir(run_dir):
        if name.endswith('.pth') or name == 'last_checkpoint':
            os.remove(osp.join(run_dir, name))


def free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def torchrun_command(args, task, seed, port):
    """The command that runs one task/seed on ``args.gpus`` processes (as
    tools/dist_train.sh launches tools/train.py)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run',
           f'--nnodes={os.environ.get("NNODES", 1)}',
           f'--node_rank={os.environ.get("NODE_RANK", 0)}',
           f'--master_addr={os.environ.get("MASTER_ADDR", "127.0.0.1")}',
           f'--nproc_per_node={args.gpus}', f'--master_port={port}',
           osp.abspath(__file__), args.config, '--run-one', task.name, str(seed),
           '--work-dir', args.work_dir, '--gpus', str(args.gpus),
           '--launcher', 'pytorch']
    if args.data_root:
        cmd += ['--data-root', args.data_root]
    if args.keep_checkpoints:
        cmd.append('--keep-checkpoints')
    if args.cfg_options:
        cmd += ['--cfg-options', *args.cfg_options]
    return cmd


# ---------------------------------------------------------------- results
def collect(work_dir, tasks=None, seeds=None):
    """The ``result.json`` files under ``work_dir`` (of the given tasks and seeds):
    ``{task: {seed: result}}``."""
    from colora_mm.datasets import TASKS
    out = {}
    for task in TASKS:
        if tasks is not None and task.name not in tasks:
            continue
        folder = osp.join(work_dir, task.name)
        if not osp.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = osp.join(folder, name, 'result.json')
            number = name[len('seed_'):]
            if (seeds is not None and number.lstrip('-').isdigit()
                    and int(number) not in seeds):
                continue      # another run's, not read
            if name.startswith('seed_') and osp.isfile(path):
                result = read_result(path)
                if seeds is None or int(result['seed']) in seeds:
                    out.setdefault(task.name, {})[int(result['seed'])] = result
    return out


def read_result(path):
    """A run's ``result.json``.

    Raises:
        CLIError: it cannot be read, or holds no ``seed`` and ``top1``.
    """
    try:
        with open(path) as f:
            result = json.load(f)
        if not isinstance(result, dict) or not {'seed', 'top1'} <= set(result):
            raise ValueError('no seed and top1 in it')
        for key, kind in (('seed', int), ('top1', (int, float))):
            if isinstance(result[key], bool) or not isinstance(result[key], kind):
                raise ValueError(f'{key} is {result[key]!r}, not a number')
        if not math.isfinite(float(result['top1'])):
            raise ValueError(f'top1 is {result["top1"]}')
    except (OSError, ValueError, TypeError) as err:   # JSONDecodeError is a ValueError
        raise CLIError(f'{path} is damaged ({type(err).__name__}: '
                       f'{str(err).splitlines()[0] if str(err) else ""}); remove '
                       f'{osp.dirname(path)} to run that task and seed again')
    return result


def table_tasks(selected, runs):
    """The tasks of the table, in VTAB-1k's order: the selected ones and every one
    with a finished run in the work dir."""
    from colora_mm.datasets import TASKS
    chosen = {t.name for t in selected} | set(runs)
    return [t.name for t in TASKS if t.name in chosen]


def write_results(work_dir, cfg_path, identity, runs, tasks, with_paper):
    """``results.json`` and ``results.md`` from the finished runs."""
    from colora_mm.evaluation import format_markdown, group_of_tasks, summarize
    summary = summarize({t: {s: r['top1'] for s, r in seeds.items()}
                         for t, seeds in runs.items()})
    params = next((r['params'] for seeds in runs.values() for r in seeds.values()
                   if r.get('params') is not None), None)
    backbone, method = identity
    data = dict(config=cfg_path, backbone=backbone, method=method, params=params,
                runs={t: {str(s): {k: v for k, v in r.items() if k != 'definition'}
                          for s, r in seeds.items()} for t, seeds in runs.items()},
                tasks=summary['tasks'], groups=summary['groups'])
    write_json(osp.join(work_dir, 'results.json'), data)
    groups = group_of_tasks(tasks)
    table = format_markdown(summary, backbone, method, params, groups=groups,
                            with_paper=with_paper)
    with open(osp.join(work_dir, 'results.md'), 'w') as f:
        f.write(f'# VTAB-1k: {osp.basename(cfg_path)}\n\n{table}')
    return table


def _duration(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


# ---------------------------------------------------------------- main
def check_layout(cfg, tasks):
    """Every selected task folder, split file and image, before any run starts."""
    from colora_mm.datasets import VTABLayoutError, check_task
    root = cfg.train_dataloader.dataset.data_root
    test_root = cfg.test_dataloader.dataset.data_root
    if not osp.isdir(root):
        raise CLIError(f'VTAB-1k root {root} does not exist; prepare it as docs/data.md '
                       'describes, or give --data-root')
    for task in tasks:
        try:
            check_task(root, task, splits=('train800val200',))
            check_task(test_root, task, splits=('test',))
        except VTABLayoutError as err:
            raise CLIError(str(err))


def check_stored_results(args, tasks, definition):
    """Every stored result of the work dir, before any work (the summary takes them
    all, the selected tasks and seeds or not): one of another model is refused.
    Returns the notes to print."""
    notes = []
    for task, seeds in collect(args.work_dir).items():
        for seed, result in seeds.items():
            run_dir = osp.join(args.work_dir, task, f'seed_{seed}')
            note = check_stored_result(result, run_dir, definition, args.config)
            if note:
                notes.append(note)
    return notes


def check_resumable(args, cfg, tasks, current, definition):
    """Every stopped run that would resume (its ``last_checkpoint`` there), before any
    work: the model it was started with (``definition.json``, when there) must be
    ``definition``'s, and the checkpoint it resumes from (the newest that loads) must
    have been trained with the config's adapter settings (``current``)."""
    from colora_mm.engine.checkpoint_hook import find_resumable_checkpoint
    hook = (cfg.get('default_hooks') or {}).get('checkpoint') or {}
    templates = [hook['filename_tmpl']] if hook.get('filename_tmpl') else []
    for task in tasks:
        for seed in args.seeds:
            run_dir = osp.join(args.work_dir, task.name, f'seed_{seed}')
            if (osp.isfile(osp.join(run_dir, 'result.json'))
                    or not osp.isfile(osp.join(run_dir, 'last_checkpoint'))):
                continue
            record = osp.join(run_dir, DEFINITION)
            if osp.isfile(record):
                try:
                    with open(record) as f:
                        stored = json.load(f)
                    diffs = definition_differences(stored, definition)
                except (OSError, ValueError, TypeError, AttributeError) as err:
                    raise CLIError(f'{record} is damaged ({type(err).__name__}); remove '
                                   f'{run_dir} to run {task.name} seed {seed} again from '
                                   'the start')
                if diffs:
                    raise CLIError(
                        f'{run_dir} holds a stopped run of another model or schedule than '
                        f'{args.config} (started with {stored.get("config")}): '
                        f'{"; ".join(diffs)}. Give this config another --work-dir, or '
                        f'remove {run_dir} to run {task.name} seed {seed} again from the '
                        'start with it')
            try:
                path, checkpoint, _ = find_resumable_checkpoint(run_dir, templates)
            except ValueError as err:
                raise CLIError(f'{err}; remove {run_dir} to run {task.name} seed {seed} '
                               'again from the start')
            if path is not None:
                check_settings_match(
                    checkpoint, path, current, args.config, False,
                    flag=f'another --work-dir (or remove {run_dir} to run {task.name} '
                    f'seed {seed} again from the start)')


def main(argv=None):
    args = parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))      # each seed runs once
    try:
        if args.gpus < 1:
            raise CLIError(f'--gpus {args.gpus}: give 1 or more')
        for seed in args.seeds:
            if not 0 <= seed < 2 ** 32:
                raise CLIError(f'--seeds {seed}: a seed is a whole number from 0 to '
                               f'{2 ** 32 - 1}')
        from colora_mm.datasets import VTABLayoutError, get_task, resolve_tasks
        try:
            tasks = resolve_tasks(args.tasks)
        except VTABLayoutError as err:
            raise CLIError(f'--tasks: {err}')
        options = cfg_options_dict(args.cfg_options)
        cfg = load_config(args.config, options, args.data_root)
        if args.work_dir is None:
            args.work_dir = osp.join('work_dirs', 'vtab1k',
                                     osp.splitext(osp.basename(args.config))[0])
        check_work_dir(args.work_dir)
        for task in tasks:
            for path in (osp.join(args.work_dir, task.name),
                         *(osp.join(args.work_dir, task.name, f'seed_{s}')
                           for s in args.seeds)):
                if osp.exists(path) and not osp.isdir(path):
                    raise CLIError(f'{path} is a file where the runs of {task.name} go; '
                                   'move it away, or give another --work-dir')
        batch = cfg.train_dataloader.batch_size
        if batch % args.gpus:
            raise CLIError(f'--gpus {args.gpus} does not divide the batch of {batch} '
                           '(train_dataloader.batch_size, the total over all GPUs)')
        current = check_adapter_and_hooks(cfg, args.config)
        definition = run_definition(cfg, args.config, current)
        if args.run_one is not None:      # inside torchrun
            task, seed = get_task(args.run_one[0]), int(args.run_one[1])
            run_dir = osp.join(args.work_dir, task.name, f'seed_{seed}')
            # run_one drops its runner: the process group goes with it here
            with process_group_closed():
                run_one(cfg, task, seed, run_dir, args.launcher, args.keep_checkpoints,
                        definition)
            return 0
        if not args.summary_only:
            check_amp(cfg, False)
            check_pretrained(cfg)
            check_layout(cfg, tasks)
            check_resumable(args, cfg, tasks, current, definition)
        notes = check_stored_results(args, tasks, definition)
    except CLIError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for note in notes:
        print(note, flush=True)

    identity = model_identity(cfg)
    jobs = [(task, seed) for task in tasks for seed in args.seeds]
    if not args.summary_only:
        os.makedirs(args.work_dir, exist_ok=True)
        timed = []
        for index, (task, seed) in enumerate(jobs, 1):
            run_dir = osp.join(args.work_dir, task.name, f'seed_{seed}')
            result_path = osp.join(run_dir, 'result.json')
            head = f'[{index}/{len(jobs)}] {task.name} seed {seed}'
            if osp.isfile(result_path):
                done = read_result(result_path)
                print(f'{head}: done before, top-1 {done["top1"]:.2f}', flush=True)
                continue
            resuming = osp.isfile(osp.join(run_dir, 'last_checkpoint'))
            print(f'{head}: {"resuming" if resuming else "starting"} '
                  f'({task.column}, {task.num_classes} classes)', flush=True)
            os.makedirs(run_dir, exist_ok=True)
            write_json(osp.join(run_dir, DEFINITION), definition)
            start = time.time()
            if args.gpus > 1:
                port = int(os.environ.get('PORT', 0)) or free_port()
                code = subprocess.call(torchrun_command(args, task, seed, port))
                if code != 0 or not osp.isfile(result_path):
                    print(f'error: {task.name} seed {seed}: the run on {args.gpus} '
                          f'processes failed (exit status {code}); see {run_dir}',
                          file=sys.stderr)
                    return 1
                result = read_result(result_path)
            else:
                one = load_config(args.config, options, args.data_root)
                result = run_one(one, task, seed, run_dir,
                                 keep_checkpoints=args.keep_checkpoints,
                                 definition=definition)
            timed.append(time.time() - start)
            left = sum(1 for t, s in jobs[index:] if not osp.isfile(
                osp.join(args.work_dir, t.name, f'seed_{s}', 'result.json')))
            eta = _duration(left * sum(timed) / len(timed))
            print(f'{head}: top-1 {result["top1"]:.2f} in {_duration(timed[-1])}; '
                  f'{left} runs left, ETA {eta}', flush=True)
            runs = collect(args.work_dir)      # every run of the work dir
            write_results(args.work_dir, args.config, identity, runs,
                          table_tasks(tasks, runs), args.paper)
    runs = collect(args.work_dir)
    if not runs:
        print(f'error: no finished run under {args.work_dir} (run the tasks first, '
              'without --summary-only)', file=sys.stderr)
        return 2
    table = write_results(args.work_dir, args.config, identity, runs,
                          table_tasks(tasks, runs), args.paper)
    print(table)
    print(f'results: {osp.join(args.work_dir, "results.json")}, '
          f'{osp.join(args.work_dir, "results.md")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

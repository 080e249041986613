"""Evaluate a checkpoint of a colora_mm config (mmseg or mmdet, by ``default_scope``).

    python tools/test.py CONFIG CHECKPOINT [--work-dir D] [--out O] [--show-dir S]
    bash tools/dist_test.sh CONFIG CHECKPOINT 4

The checkpoint must be that config's (same tensors, same shapes, and the same adapter
settings when the checkpoint records them; ``--allow-mismatch`` lets other settings
through): anything else is refused with the list of differences instead of being
evaluated half-loaded. The adapter spec, the data root and its sub-folders and the
checkpoint are checked before the runner exists; a wrong one ends with one ``error:``
line and exit status 2 (``--check-only`` runs the checks alone; ``tools/dist_test.sh``
runs it once before it starts the processes). Configs
written by ``tools/merge.py`` work as they are (``adapter.merged=True`` builds the
merged structure first). The metrics are logged and, on rank 0, also written to
``WORK_DIR/metrics.json``.

``--out``: for segmentation, a folder for the predicted label maps (mmseg's meaning);
for detection, a ``.pkl`` file with the raw results (mmdet's meaning).
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import (CLIError, check_adapter, check_data_roots,  # noqa: E402
                   check_output_outside_data, check_settings_match,
                   check_state_dict_matches, check_work_dir, keep_input_config,
                   load_config,
                   parse_with_clear_errors, process_group_closed, read_checkpoint,
                   read_state_dict)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Test (evaluate) a colora_mm segmentor or detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the dir to save logs and the metrics (default: ./work_dirs/CONFIG)')
    parser.add_argument(
        '--out',
        help='segmentation: folder for the predictions; detection: .pkl file for '
        'the results')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='folder where painted images are saved; implies drawing')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument(
        '--allow-mismatch',
        action='store_true',
        help='evaluate although the adapter settings recorded in the checkpoint differ '
        "from the config's")
    parser.add_argument(
        '--check-only',
        action='store_true',
        help='run every check of the config, the options, the data folder and the '
        'checkpoint, then exit without evaluating or writing anything (status 0: the '
        'evaluation would start; tools/dist_test.sh runs this once before it starts '
        'the processes)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parse_with_clear_errors(parser, argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def trigger_visualization_hook(cfg, args):
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise CLIError('--show/--show-dir need a visualization hook in '
                       'default_hooks (SegVisualizationHook / DetVisualizationHook)')
    hook = hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if cfg.default_scope == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:
            cfg.visualizer['save_dir'] = args.show_dir


def setup_cfg(args):
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    check_work_dir(cfg.work_dir)
    for flag, path in (('--out', args.out), ('--show-dir', args.show_dir)):
        if path:
            check_output_outside_data(cfg, flag, path)
    if args.out is not None and osp.isdir(args.out) and cfg.default_scope == 'mmdet':
        raise CLIError(f'--out {args.out!r} is a folder; detection results are written '
                       'as one .pkl file')
    if args.out is not None and osp.isfile(args.out) and cfg.default_scope != 'mmdet':
        raise CLIError(f'--out {args.out!r} is a file; segmentation predictions are '
                       'written into a folder')
    if args.show or args.show_dir:
        trigger_visualization_hook(cfg, args)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise CLIError('--tta needs tta_model and tta_pipeline in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None:
        if cfg.default_scope == 'mmdet':
            if not args.out.endswith(('.pkl', '.pickle')):
                raise CLIError('--out: detection results are written as a .pkl file')
        else:
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
    check_data_roots(cfg, {'test_dataloader'})
    cfg.load_from = args.checkpoint

    from colora_mm.compat import configure_cpu_ddp
    configure_cpu_ddp(cfg)
    return cfg


def check_checkpoint(cfg, args):
    """Check the adapter spec (on the meta device), the adapter settings recorded in
    the checkpoint, then build the model once, as the runner will, and compare the
    checkpoint's tensors with it. Returns ``(checkpoint, model)``: the loaded
    checkpoint and the model built (without its weights)."""
    from merge import build_model
    current = check_adapter(cfg, args.config)
    checkpoint = read_checkpoint(args.checkpoint)
    try:
        note = check_settings_match(checkpoint, args.checkpoint, current, args.config,
                                    args.allow_mismatch)
        state = read_state_dict(args.checkpoint, checkpoint)
        tta = getattr(args, 'tta', False)
        model_cfg = cfg.model.get('module', cfg.model) if tta else cfg.model
        model = build_model(model_cfg)
        check_state_dict_matches(model, state, args.checkpoint, args.config)
    except CLIError as err:
        # whichever check refused it, a merged checkpoint has its own config
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict) and meta.get('merged_from'):
            from merge import config_path_for
            raise CLIError(f'{err} It is a merged checkpoint (tools/merge.py): test it '
                           f'with the config written beside it, '
                           f'{config_path_for(args.checkpoint)}')
        raise
    if note:
        print(note, file=sys.stderr)
    return checkpoint, model


def make_runner(cfg):
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def main(argv=None):
    args = parse_args(argv)
    try:
        if not osp.isfile(args.checkpoint):
            raise CLIError(f'checkpoint {args.checkpoint} does not exist')
        cfg = setup_cfg(args)
        check_checkpoint(cfg, args)
        if args.check_only:
            print(f'checked: {args.checkpoint} would be evaluated with {args.config}')
            return 0
        keep_input_config(cfg, args.config)
        runner = make_runner(cfg)
    except CLIError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if args.out is not None and cfg.default_scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    from mmengine.dist import is_main_process
    with process_group_closed():
        metrics = runner.test()
        main_process = is_main_process()
        del runner   # its model wrapper holds the process group
    if main_process:
        path = osp.join(cfg.work_dir, 'metrics.json')
        with open(path, 'w') as f:
            json.dump({k: _jsonable(v) for k, v in metrics.items()}, f, indent=1)
        print(f'metrics written to {path}')
    return 0


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return float(value) if hasattr(value, '__float__') else str(value)


if __name__ == '__main__':
    sys.exit(main())

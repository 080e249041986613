"""The flags of tools/train.py and tools/test.py, read back from the config they
prepare (in-process, no training): the same flags for mmseg and mmdet configs, and
the errors they give instead of starting a run."""
import os.path as osp

import pytest

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import torch  # noqa: E402

from data_gen import (make_ade20k, make_coco,  # noqa: E402
                      write_tiny_config)
from tools_loader import load_tool  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_config_loading')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ADE_CFG = osp.join(ROOT, 'configs', 'ade20k', 'colora_convnext_b.py')
COCO_CFG = osp.join(ROOT, 'configs', 'coco', 'faster-rcnn_lora_r50_fpn_2xb8-1x_coco.py')


train = load_tool('train')
test = load_tool('test')


@pytest.fixture(scope='module')
def configs(tmp_path_factory):
    base = tmp_path_factory.mktemp('cli')
    ade = make_ade20k(str(base / 'ade'), num_train=1, num_val=1)
    coco = make_coco(str(base / 'coco'), num_train=1, num_val=1)
    return dict(
        seg=write_tiny_config(ADE_CFG, str(base / 'seg.py'), data_root=ade),
        det=write_tiny_config(COCO_CFG, str(base / 'det.py'), data_root=coco),
        base=base)


def train_cfg(*argv):
    return train.setup_cfg(train.parse_args([str(a) for a in argv]))


@pytest.mark.parametrize('task, scope', [('seg', 'mmseg'), ('det', 'mmdet')])
def test_train_flags(configs, task, scope):
    config = configs[task]
    cfg = train_cfg(config)
    assert cfg.default_scope == scope
    assert cfg.work_dir == osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    assert cfg.optim_wrapper.type == 'OptimWrapper' and not cfg.resume

    cfg = train_cfg(config, '--amp', '--work-dir', 'wd', '--cfg-options',
                    'train_cfg.max_iters=7', 'model.backbone.adapter.gamma=8')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.work_dir == 'wd' and cfg.train_cfg.max_iters == 7
    assert cfg.model.backbone.adapter.gamma == 8

    cfg = train_cfg(config, '--resume')
    assert cfg.resume is True and cfg.load_from is None
    ckpt = configs['base'] / 'some.pth'
    torch.save({}, ckpt)
    cfg = train_cfg(config, '--resume', ckpt)
    assert cfg.resume is True and cfg.load_from == str(ckpt)


def test_auto_scale_lr_is_the_mmdet_flag(configs):
    assert train_cfg(configs['det'], '--auto-scale-lr').auto_scale_lr == dict(
        enable=True, base_batch_size=16)


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU-only path')
def test_pytorch_launcher_on_cpu_uses_gloo(configs):
    cfg = train_cfg(configs['seg'], '--launcher', 'pytorch')
    assert cfg.launcher == 'pytorch'
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert cfg.model_wrapper_cfg.device_ids is None


def test_test_out_and_show_dir_follow_the_codebase(configs, tmp_path):
    ckpt = tmp_path / 'x.pth'
    torch.save({}, ckpt)
    seg = test.setup_cfg(test.parse_args([configs['seg'], str(ckpt), '--out',
                                          'preds', '--show-dir', 'vis']))
    assert seg.test_evaluator.output_dir == 'preds' and seg.test_evaluator.keep_results
    assert seg.visualizer.save_dir == 'vis'
    assert seg.default_hooks.visualization.draw is True
    assert seg.load_from == str(ckpt)
    det = test.setup_cfg(test.parse_args([configs['det'], str(ckpt), '--out',
                                          'r.pkl', '--show-dir', 'vis']))
    assert det.default_hooks.visualization.test_out_dir == 'vis'
    assert 'output_dir' not in det.test_evaluator


def _error(capsys):
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line]
    assert len([line for line in lines if line.startswith('error: ')]) == 1, lines
    return lines[-1]


def test_refusals(configs, tmp_path, capsys):
    missing = tmp_path / 'missing.pth'
    assert train.main([configs['seg'], '--resume', str(missing)]) == 2
    assert 'does not exist' in _error(capsys)
    assert train.main([str(tmp_path / 'nope.py')]) == 2
    assert 'config file' in _error(capsys)
    assert train.main([configs['det'], '--cfg-options', 'default_scope=mmpretrain']) == 2
    assert "default_scope='mmpretrain'" in _error(capsys)
    assert test.main([configs['seg'], str(missing)]) == 2
    assert 'does not exist' in _error(capsys)
    ckpt = tmp_path / 'x.pth'
    torch.save({}, ckpt)
    assert test.main([configs['det'], str(ckpt), '--out', 'results.json']) == 2
    assert '.pkl' in _error(capsys)
    assert test.main([configs['seg'], str(ckpt)]) == 2     # no tensors in it
    assert 'holds no model state dict' in _error(capsys)


def test_dist_scripts_pass_the_usual_variables():
    for script, positional in (('dist_train.sh', 'CONFIG GPUS'),
                               ('dist_test.sh', 'CONFIG CHECKPOINT GPUS')):
        text = open(osp.join(ROOT, 'tools', script)).read()
        for var in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'PORT'):
            assert f'${var}' in text or f'"${var}"' in text, (script, var)
        assert 'torch.distributed.run' in text and '--launcher pytorch' in text
        assert positional in text


def _close_worker(rank, port, out_dir):
    import os
    import time

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    with train.process_group_closed():
        if rank == 1:
            time.sleep(1.0)                 # the peer still finishing its work
        arrived = time.time()
    closed = time.time()
    with open(osp.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(f'{arrived} {closed} {int(dist.is_initialized())}')


def test_close_process_group_waits_for_every_rank(tmp_path):
    """After a successful distributed run no rank destroys the gloo group while a peer
    is still working (a group torn down under a peer aborted rank 0 at exit)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_close_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    times = {}
    for rank in (0, 1):
        arrived, closed, initialized = open(tmp_path / f'rank{rank}.txt').read().split()
        times[rank] = float(arrived), float(closed)
        assert initialized == '0'           # the group is gone on every rank
    assert times[0][1] >= times[1][0]       # rank 0 left only once rank 1 had arrived


def _gloo_threads():
    """Names of this process's threads that belong to gloo (Linux)."""
    import glob
    names = []
    for comm in glob.glob('/proc/self/task/*/comm'):
        try:
            with open(comm) as f:
                names.append(f.read().strip())
        except OSError:                     # the thread ended meanwhile
            pass
    return sorted(n for n in names if 'gloo' in n)


def _wrapper_worker(rank, port, out_dir):
    import os

    # Imported before the group exists, as the tools import it (through
    # mmengine.runner): torch.distributed.nn.functional, imported when a DDP wrapper is
    # first built, keeps the default group of that moment in its functions' defaults.
    import mmengine.runner  # noqa: F401
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    with train.process_group_closed():
        # a model wrapper held in a reference cycle, as mmengine's runner holds it
        runner = [DistributedDataParallel(torch.nn.Linear(4, 2))]
        runner.append(runner)
        runner[0](torch.randn(3, 4)).sum().backward()
        before = _gloo_threads()
        del runner
    with open(osp.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(f'{",".join(before)} {",".join(_gloo_threads()) or "-"}')


@pytest.mark.skipif(not osp.isdir('/proc/self/task'), reason='reads /proc/self/task')
def test_closing_the_group_ends_gloos_threads_before_exit(tmp_path):
    """The wrapper holds the group: once the block has dropped the runner, the group
    and gloo's threads are gone when the block ends, not left to the interpreter's
    shutdown (where a gloo process aborted now and then after a finished run)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_wrapper_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        before, after = open(tmp_path / f'rank{rank}.txt').read().split()
        assert 'pt_gloo_runloop' in before.split(','), before   # what is checked exists
        assert after == '-', after


def test_process_group_closed_skips_the_barrier_after_a_failure(monkeypatch):
    calls = []
    monkeypatch.setattr(train, 'close_process_group',
                        lambda wait_for_peers=True: calls.append(wait_for_peers))
    with train.process_group_closed():
        pass
    with pytest.raises(KeyboardInterrupt):
        with train.process_group_closed():
            raise KeyboardInterrupt
    assert calls == [True, False]


def _test_data_folders(config):
    cfg = train.load_config(config)
    dataset = cfg.test_dataloader.dataset
    return dataset.data_root, osp.join(dataset.data_root, dataset.data_prefix.seg_map_path)


def test_test_outputs_stay_out_of_the_dataset(configs, tmp_path, capsys):
    """--out and --show-dir in a dataset folder (predictions named like the ground
    truth would replace it) are refused before anything runs; the files stay."""
    import os
    ckpt = tmp_path / 'x.pth'
    torch.save({}, ckpt)
    root, annotations = _test_data_folders(configs['seg'])
    before = {f: os.path.getmtime(osp.join(annotations, f)) for f in os.listdir(annotations)}
    for flag, path in (('--out', annotations), ('--out', osp.join(annotations, 'sub')),
                       ('--show-dir', annotations), ('--out', root)):
        assert test.main([configs['seg'], str(ckpt), flag, path]) == 2
        message = _error(capsys)
        assert f'{flag} {path!r} is in the dataset folder' in message, message
    after = {f: os.path.getmtime(osp.join(annotations, f)) for f in os.listdir(annotations)}
    assert after == before
    # beside the dataset (in its root, outside the image and annotation folders): fine
    cfg = test.setup_cfg(test.parse_args([configs['seg'], str(ckpt), '--out',
                                          osp.join(root, 'predictions')]))
    assert cfg.test_evaluator.output_dir == osp.join(root, 'predictions')


def test_work_dir_and_out_of_the_wrong_kind(configs, tmp_path, capsys):
    ckpt = tmp_path / 'x.pth'
    torch.save({}, ckpt)
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('keep me')
    assert train.main([configs['seg'], '--work-dir', str(a_file)]) == 2
    assert 'is a file, not a folder' in _error(capsys)
    assert test.main([configs['seg'], str(ckpt), '--work-dir', str(a_file)]) == 2
    assert 'is a file, not a folder' in _error(capsys)
    assert test.main([configs['seg'], str(ckpt), '--out', str(a_file)]) == 2
    assert 'written into a folder' in _error(capsys)
    assert test.main([configs['det'], str(ckpt), '--out', str(tmp_path)]) == 2
    assert 'one .pkl file' in _error(capsys)
    assert a_file.read_text() == 'keep me'


def _recorded_checkpoint(path, method):
    from colora_mm.engine.adapter_settings import META_KEY
    torch.save(dict(meta={META_KEY: {'backbone': dict(method=method)}},
                    state_dict={'backbone.x': torch.zeros(1)}), path)
    return str(path)


def test_load_from_is_checked_like_resume(configs, tmp_path, capsys):
    """A local load_from must exist; one trained with other adapters (whose tensors
    mmengine's non-strict load would drop) is refused; one without adapter tensors
    (full fine-tuning) starts any method."""
    missing = tmp_path / 'missing.pth'
    assert train.main([configs['seg'], '--cfg-options', f'load_from={missing}']) == 2
    message = _error(capsys)
    assert message.startswith('error: load_from: checkpoint') and 'does not exist' in message

    def check(path, *flags):
        args = train.parse_args([configs['seg'], *flags, '--cfg-options',
                                 f'load_from={path}'])
        train.check_before_work(train.setup_cfg(args), args)

    lora = _recorded_checkpoint(tmp_path / 'lora.pth', 'lora')
    with pytest.raises(train.CLIError, match=r'load_from\) does not match config .*'
                       r'other adapter settings'):
        check(lora)
    check(lora, '--allow-mismatch')                       # overridden, with a warning
    assert 'warning' in capsys.readouterr().err
    check(_recorded_checkpoint(tmp_path / 'full.pth', 'full'))
    check('https://download.openmmlab.com/some/model.pth')   # fetched by mmengine


def test_merged_checkpoint_with_the_adapter_config_names_the_merged_one(configs, tmp_path,
                                                                        capsys):
    ckpt = tmp_path / 'merged.pth'
    torch.save(dict(meta=dict(merged_from='/some/iter_10.pth'),
                    state_dict={'backbone.x': torch.zeros(1)}), ckpt)
    assert test.main([configs['seg'], str(ckpt)]) == 2
    message = _error(capsys)
    assert 'does not match config' in message
    assert f'merged checkpoint (tools/merge.py): test it with the config written beside ' \
           f'it, {tmp_path / "merged.py"}' in message
    # also where its recorded adapter settings are what refuse it first
    from colora_mm.engine.adapter_settings import META_KEY
    torch.save(dict(meta={'merged_from': '/some/iter_10.pth',
                          META_KEY: {'backbone': dict(method='lora')}},
                    state_dict={'backbone.x': torch.zeros(1)}), ckpt)
    assert test.main([configs['seg'], str(ckpt)]) == 2
    message = _error(capsys)
    assert 'other adapter settings' in message
    assert f'test it with the config written beside it, {tmp_path / "merged.py"}' in message


def test_cfg_options_typos_are_refused(configs, capsys):
    """A misspelt top-level key would merge as a new key the run ignores; an option
    without '=' is a usage error, not a traceback."""
    assert train.main([configs['seg'], '--cfg-options', 'modle.backbone.adapter.gamma=8']) == 2
    message = _error(capsys)
    assert "no top-level key 'modle'" in message
    assert 'did you mean model.backbone.adapter.gamma?' in message
    # a key the runner reads, though the config does not set it, is taken
    assert train_cfg(configs['seg'], '--cfg-options', 'experiment_name=x').experiment_name == 'x'
    # and so are the keys it reads from the config itself, not as arguments
    cfg = train_cfg(configs['seg'], '--cfg-options', 'find_unused_parameters=True',
                    'compile.backend=inductor')
    assert cfg.find_unused_parameters is True and cfg.compile.backend == 'inductor'
    for tool, argv in ((train, [configs['seg']]), (test, [configs['seg'], 'x.pth'])):
        with pytest.raises(SystemExit) as info:
            tool.parse_args(argv + ['--cfg-options', 'model.backbone.adapter.gamma'])
        assert info.value.code == 2
        assert 'write each option as KEY=VALUE' in capsys.readouterr().err


@pytest.mark.parametrize('script, argv, fragment', [
    ('dist_train.sh', ['nothere.py', '2'], 'config file nothere.py does not exist'),
    ('dist_train.sh', ['{seg}', '0'], "GPUS='0' must be a positive number"),
    ('dist_train.sh', ['2', '{seg}'], 'config file 2 does not exist'),
    ('dist_test.sh', ['{seg}', 'nothere.pth', '2'], 'checkpoint nothere.pth does not exist'),
    ('dist_test.sh', ['{seg}', '{seg}', 'two'], "GPUS='two' must be a positive number"),
])
def test_dist_scripts_check_their_arguments(configs, script, argv, fragment):
    import subprocess
    argv = [a.format(seg=configs['seg']) for a in argv]
    fragment = fragment.format(seg=configs['seg'])
    res = subprocess.run(['bash', osp.join(ROOT, 'tools', script), *argv],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and fragment in res.stderr, res.stderr


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh'])
@pytest.mark.parametrize('bad, fragment', [
    (['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (['--cfg-options', 'model.backbone.adpater.gamma=8'],
     'model.backbone.adpater is not an argument of CoLoRAConvNeXt'),
])
def test_dist_scripts_report_a_wrong_setting_once(configs, tmp_path, script, bad,
                                                  fragment):
    """The launchers run the tool's checks once before torchrun starts the processes:
    a wrong option or setting is one message (exit status 2), not one per process
    followed by torchrun's report of the failed processes."""
    import subprocess
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': {}}, ckpt)
    args = [configs['seg'], '2'] if script == 'dist_train.sh' else \
        [configs['seg'], str(ckpt), '2']
    res = subprocess.run(['bash', osp.join(ROOT, 'tools', script), *args, *bad,
                          '--work-dir', str(tmp_path / 'work')],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count(fragment) == 1, res.stderr
    assert 'torch.distributed' not in res.stderr and 'ChildFailedError' not in res.stderr
    assert not (tmp_path / 'work').exists()


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_check_only_runs_the_checks_and_writes_nothing(configs, tmp_path, capsys, tool):
    work = tmp_path / 'work'
    if tool == 'train':
        assert train.main([configs['seg'], '--work-dir', str(work), '--check-only']) == 0
        assert capsys.readouterr().out.strip().endswith(f'would train in {work}')
        # a failing check still fails
        assert train.main([configs['seg'], '--work-dir', str(work), '--check-only',
                           '--cfg-options', 'model.backbone.adapter.gamma=0']) == 2
        assert _error(capsys)
    else:
        from helpers_ckpt import trained_checkpoint
        ckpt = tmp_path / 'model.pth'
        trained_checkpoint(configs['seg'], ckpt)
        assert test.main([configs['seg'], str(ckpt), '--work-dir', str(work),
                          '--check-only']) == 0
        assert capsys.readouterr().out.strip().endswith(
            f'{ckpt} would be evaluated with {configs["seg"]}')
        assert test.main([configs['seg'], str(tmp_path / 'none.pth'),
                          '--work-dir', str(work), '--check-only']) == 2
        assert 'none.pth does not exist' in _error(capsys)
    assert not work.exists()


def test_backbone_keys_it_does_not_take_are_named(configs, capsys):
    assert train.main([configs['seg'], '--cfg-options',
                       'model.backbone.adpater.gamma=8']) == 2
    message = _error(capsys)
    assert 'model.backbone.adpater is not an argument of CoLoRAConvNeXt; did you mean ' \
           'model.backbone.adapter?' in message, message


def test_upstream_assertions_are_blamed_on_the_backbone_settings():
    err = train.backbone_error(AssertionError('window size must be positive'),
                               dict(type='CoLoRASwin', adapter=dict()), 'c.py')
    assert err.startswith('c.py: model.backbone (CoLoRASwin): the upstream backbone ')
    assert 'AssertionError: window size must be positive' in err


def test_hooks_that_cannot_work_are_refused_before_any_work(configs, tmp_path, capsys):
    """MergeReinitHook on a model with nothing to fold (CoLoRA with share_ratio=1), or
    with a bad interval, is refused by train.py's checks, before the work dir exists."""
    config = tmp_path / 'with_merge.py'
    config.write_text(f"_base_ = [{configs['seg']!r}]\n"
                      "custom_hooks = [dict(type='CoLoRAReportHook', input_size=(32, 32)),"
                      " dict(type='MergeReinitHook', interval=10)]\n")
    work_dir = tmp_path / 'work'
    args = ['--work-dir', str(work_dir), '--cfg-options']
    assert train.main([str(config), *args, 'model.backbone.adapter.share_ratio=1.0']) == 2
    message = _error(capsys)
    assert 'custom_hooks[1] (MergeReinitHook)' in message, message
    assert 'nothing to fold' in message and 'Remove MergeReinitHook' in message
    assert not work_dir.exists()
    bad = tmp_path / 'bad_interval.py'
    bad.write_text(f"_base_ = [{str(config)!r}]\n"
                   "custom_hooks = [dict(type='MergeReinitHook', interval='10')]\n")
    assert train.main([str(bad), '--work-dir', str(work_dir)]) == 2
    assert "custom_hooks[0] (MergeReinitHook): interval='10'" \
        in _error(capsys)
    assert not work_dir.exists()
    args = train.parse_args([str(config)])               # the config as written: fine
    train.check_before_work(train.setup_cfg(args), args)


def test_a_config_that_says_resume_does_not_resume_by_itself(configs, tmp_path, capsys):
    """As mmseg's train.py: only --resume resumes (a config saved by a run that
    resumed says resume = True and must not resume a fresh run from another one)."""
    config = tmp_path / 'saved.py'
    config.write_text(open(configs['seg']).read() + "resume = True\nload_from = 'x.pth'\n")
    cfg = train_cfg(config)
    assert cfg.resume is False and cfg.load_from is None
    out = capsys.readouterr().out
    assert 'not resuming, pass --resume to resume' in out
    assert "its load_from 'x.pth' (the checkpoint it resumed from) is not loaded" in out
    assert train_cfg(config, '--resume').resume is True


def test_full_precision_leaves_the_mixed_precision_settings_out(configs, capsys):
    """Following the CPU's advice (``optim_wrapper.type=OptimWrapper``) on a config made
    for AMP: OptimWrapper takes no loss scale."""
    cfg = train_cfg(configs['seg'], '--cfg-options', 'optim_wrapper.type=OptimWrapper',
                    'optim_wrapper.loss_scale=dynamic', 'optim_wrapper.dtype=float16')
    assert 'loss_scale' not in cfg.optim_wrapper and 'dtype' not in cfg.optim_wrapper
    assert 'loss_scale, dtype left out' in capsys.readouterr().out
    cfg = train_cfg(configs['seg'], '--cfg-options', 'optim_wrapper.type=AmpOptimWrapper',
                    'optim_wrapper.loss_scale=dynamic')
    assert cfg.optim_wrapper.loss_scale == 'dynamic'


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_a_work_dirs_own_config_is_never_overwritten(configs, tmp_path, tool, capsys):
    """The runner saves its config as WORK_DIR/<config name>: run from the config a
    work dir keeps, the tools save this run's beside it as <name>_run.py."""
    work = tmp_path / 'work'
    work.mkdir()
    config = work / 'seg.py'
    config.write_text(open(configs['seg']).read())
    before = config.read_text()
    cfg = train_cfg(config, '--work-dir', work, '--cfg-options', 'train_cfg.max_iters=3')
    module = train if tool == 'train' else test
    module.keep_input_config(cfg, str(config))
    assert 'is the config this work dir keeps' in capsys.readouterr().out
    runner = test.make_runner(cfg)
    del runner
    assert config.read_text() == before
    assert 'max_iters=3' in (work / 'seg_run.py').read_text().replace(' ', '')
    other = tmp_path / 'elsewhere.py'                  # the usual case: untouched
    other.write_text(before)
    cfg = train_cfg(other, '--work-dir', work)
    train.keep_input_config(cfg, str(other))
    assert osp.basename(cfg.filename) == 'elsewhere.py'


def test_activation_checkpointing_of_moving_partners_is_refused(configs, tmp_path, capsys):
    """mmengine's ``activation_checkpointing`` on a part of the backbone that holds
    CoLoRA pairs with effective partners is refused before the work dir exists (as the
    backbones refuse ``with_cp=True``); elsewhere, or with frozen partners, it passes."""
    config = tmp_path / 'checkpointed.py'
    config.write_text(f"_base_ = [{configs['seg']!r}]\n"
                      "activation_checkpointing = ['backbone.stages.1']\n")
    work_dir = tmp_path / 'work'
    assert train.main([str(config), '--work-dir', str(work_dir)]) == 2
    message = _error(capsys)
    assert "activation_checkpointing names 'backbone.stages.1', which holds CoLoRA " \
           "pairs with partner_policy='effective'" in message, message
    assert "partner_policy='frozen'" in message
    assert not work_dir.exists()
    missing = tmp_path / 'missing.py'
    missing.write_text(f"_base_ = [{str(config)!r}]\n"
                       "activation_checkpointing = ['backbone.stagez']\n")
    assert train.main([str(missing), '--work-dir', str(work_dir)]) == 2
    assert "names 'backbone.stagez', which the backbone does not have" in _error(capsys)
    for argv in ([str(config), '--cfg-options',
                  'model.backbone.adapter.partner_policy=frozen'],
                 [str(config), '--cfg-options', "activation_checkpointing=['decode_head']"]):
        args = train.parse_args(argv)
        train.check_before_work(train.setup_cfg(args), args)

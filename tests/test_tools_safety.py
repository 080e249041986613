"""The tools never lose a user's files and stop wrong settings before any work:
``tools/demo.py`` only clears its own output folder, ``tools/merge.py`` never replaces a
file it did not write, ``tools/train.py`` / ``test.py`` / ``merge.py`` check the adapter
spec, ``--amp``, pretrained paths and data folders before the runner or a work dir
exists, and refuse a checkpoint trained with other adapter settings; ``--resume``
skips a damaged newest checkpoint."""
import glob
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import colora_mm  # noqa: E402,F401
from colora_mm.engine import adapter_settings  # noqa: E402
from colora_mm.engine.adapter_settings import (check_spec_types,  # noqa: E402
                                               settings_differences)
from data_gen import (make_ade20k,  # noqa: E402
                      single_error, write_tiny_config)
from tools_loader import load_tool  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ADE = osp.join(ROOT, 'configs', 'ade20k')
COLORA = osp.join(ADE, 'colora_convnext_b.py')
LORA = osp.join(ADE, 'upernet_lora_convnext_b_4xb4-160k_ade20k-512x512.py')


train = load_tool('train')
test_tool = load_tool('test')
merge_tool = load_tool('merge')
demo = load_tool('demo')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp('safety')
    ade = make_ade20k(str(base / 'ade'), num_train=2, num_val=1)
    return dict(base=base, ade=ade,
                colora=write_tiny_config(COLORA, str(base / 'colora.py'), data_root=ade),
                lora=write_tiny_config(LORA, str(base / 'lora.py'), data_root=ade),
                nofilter=write_tiny_config(
                    COLORA, str(base / 'nofilter.py'), data_root=ade,
                    extra=dict(model=dict(backbone=dict(adapter=dict(use_filter=False))))))


def error_line(capsys):
    captured = capsys.readouterr()
    return single_error(captured.out + captured.err)


def save_checkpoint(config, path, record=True, cfg_text=False):
    """A checkpoint of ``config``'s model (untrained), with the adapter settings record
    in its meta (``record``) and/or the config text mmengine saves (``cfg_text``)."""
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    from mmseg.registry import MODELS
    model = MODELS.build(cfg.model)
    meta = dict(iter=2, epoch=0)
    if record:
        meta['adapter_settings'] = adapter_settings(model)
    if cfg_text:
        meta['cfg'] = cfg.pretty_text
    torch.save(dict(meta=meta, state_dict=model.state_dict()), str(path))
    return str(path)


# ------------------------------------------------------------------ demo
def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / 'data' / 'ade' / 'X').mkdir(parents=True)
    (tmp_path / 'data' / 'ade' / 'X' / 'a.jpg').write_bytes(b'jpg')
    (tmp_path / 'work_dirs' / 'run').mkdir(parents=True)
    (tmp_path / 'work_dirs' / 'run' / 'iter_160000.pth').write_bytes(b'ckpt')
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'demo.py'), '--quick',
                           '--out', '.'], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = single_error(proc.stdout + proc.stderr)
    assert 'not written by tools/demo.py' in line and demo.MARKER in line
    assert sorted(str(p) for p in tmp_path.rglob('*')) == before
    assert (tmp_path / 'work_dirs' / 'run' / 'iter_160000.pth').read_bytes() == b'ckpt'


def test_demo_accepts_new_empty_and_its_own_folders(tmp_path):
    demo.check_output_folder(str(tmp_path / 'new'))
    (tmp_path / 'empty').mkdir()
    demo.check_output_folder(str(tmp_path / 'empty'))
    own = tmp_path / 'own'
    demo.claim_output_folder(str(own))
    (own / 'logs').mkdir()
    demo.check_output_folder(str(own))
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='not a folder'):
        demo.check_output_folder(str(tmp_path / 'file'))
    (tmp_path / 'empty' / 'mine.txt').write_text('x')
    with pytest.raises(ValueError, match='is not empty'):
        demo.check_output_folder(str(tmp_path / 'empty'))


@pytest.mark.parametrize('argv,message', [
    (['--jobs', '-2'], '--jobs -2: must be at least 1'),
    (['--jobs', '0'], '--jobs 0: must be at least 1'),
    (['--threads', '-1'], '--threads -1: must be at least 1'),
    (['--threads', '0'], '--threads 0: must be at least 1')])
def test_demo_checks_jobs_and_threads_before_work(tmp_path, capsys, argv, message):
    out = tmp_path / 'demo'
    with pytest.raises(SystemExit) as info:
        demo.main(argv + ['--quick', '--out', str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f'demo.py: error: {message}' in err or f'error: {message}' in err
    assert not out.exists() and os.listdir(tmp_path) == []
    args = demo.parse_args(['--jobs', '2', '--threads', '1'])
    assert (args.jobs, args.threads) == (2, 1)


# ------------------------------------------------------------------ merge outputs
def _run_merge(*argv):
    return merge_tool.main([str(a) for a in argv] + ['--shape', '64'])


def test_merge_never_replaces_a_file_it_did_not_write(data, tmp_path, capsys):
    ckpt = save_checkpoint(data['colora'], tmp_path / 'iter_2.pth')
    out = tmp_path / 'merged.pth'
    out.write_bytes(b'mine')
    assert _run_merge(data['colora'], ckpt, out) == 2
    line = error_line(capsys)
    assert 'merged.pth exists' in line and '--force' in line
    assert out.read_bytes() == b'mine'

    out.unlink()
    (tmp_path / 'merged.py').write_text('# my config\n')
    assert _run_merge(data['colora'], ckpt, out) == 2
    line = error_line(capsys)
    assert "OUT's config" in line and 'merged.py exists' in line and '--force' in line
    assert (tmp_path / 'merged.py').read_text() == '# my config\n'
    assert not out.exists()

    assert _run_merge(data['colora'], ckpt, tmp_path / 'merged.py') == 2
    assert 'ends in .py' in error_line(capsys)

    # --force replaces only a config merge.py wrote: this one stays.
    assert _run_merge(data['colora'], ckpt, out, '--force') == 2
    line = error_line(capsys)
    assert f"OUT's config {tmp_path / 'merged.py'} exists and was not written by " \
        'tools/merge.py' in line and 'move that file away' in line
    assert (tmp_path / 'merged.py').read_text() == '# my config\n'
    assert not out.exists()

    (tmp_path / 'merged.py').unlink()
    assert _run_merge(data['colora'], ckpt, out) == 0
    assert out.is_file() and (tmp_path / 'merged.py').read_text().startswith(
        merge_tool.MARKER)
    merged_meta = torch.load(out, weights_only=False)['meta']
    assert merged_meta['adapter_settings']['backbone']['method'] == 'colora'
    # Its own output: replaced with --force.
    out.write_bytes(b'old')
    assert _run_merge(data['colora'], ckpt, out, '--force') == 0
    assert torch.load(out, weights_only=False)['meta']['adapter_settings']


def test_merge_keeps_a_repository_config_beside_out(data, tmp_path, capsys):
    """OUT named after a config (configs/x.pth beside configs/x.py): x.py is not
    replaced, with or without --force."""
    ckpt = save_checkpoint(data['colora'], tmp_path / 'iter_2.pth')
    folder = tmp_path / 'configs'
    folder.mkdir()
    mine = folder / 'finetune_lora_target.py'
    mine.write_text(open(LORA).read())
    before = mine.read_text()
    for extra in ((), ('--force',)):
        assert _run_merge(data['colora'], ckpt, folder / 'finetune_lora_target.pth',
                          *extra) == 2
        line = error_line(capsys)
        assert f'{mine} exists and was not written by tools/merge.py' in line
        assert mine.read_text() == before
        assert sorted(os.listdir(folder)) == ['finetune_lora_target.py']


def test_merge_refuses_a_folder_out(data, tmp_path, capsys):
    ckpt = save_checkpoint(data['colora'], tmp_path / 'iter_2.pth')
    (tmp_path / 'outdir').mkdir()
    (tmp_path / 'outdir' / 'keep.txt').write_text('x')
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    for out in (tmp_path / 'outdir', f'{tmp_path / "outdir"}{os.sep}'):
        assert _run_merge(data['colora'], ckpt, out, '--force') == 2
        line = error_line(capsys)
        assert f'OUT {out} names a folder' in line
        assert str(tmp_path / 'outdir' / 'merged.pth') in line
    # OUT's config a folder
    (tmp_path / 'm.py').mkdir()
    before.append(str(tmp_path / 'm.py'))
    assert _run_merge(data['colora'], ckpt, tmp_path / 'm.pth', '--force') == 2
    assert f"OUT's config {tmp_path / 'm.py'} is a folder" in error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob('*')) == sorted(before)


@pytest.mark.parametrize('shape,message', [
    (['0'], '--shape 0: each side must be at least 32'),
    (['4'], '--shape 4: each side must be at least 32'),
    (['-8'], '--shape -8: each side must be at least 32'),
    (['64', '16'], '--shape 64 16: each side must be at least 32'),
    (['64', '64', '3'], '--shape 64 64 3: give one side (a square input) or H W')])
def test_merge_checks_shape_before_work(data, tmp_path, capsys, shape, message):
    ckpt = tmp_path / 'iter_2.pth'
    ckpt.write_bytes(b'not read: the shape is checked first')
    before = sorted(os.listdir(tmp_path))
    assert merge_tool.main([data['colora'], str(ckpt), str(tmp_path / 'out.pth'),
                            '--shape', *shape]) == 2
    line = error_line(capsys)
    assert message in line
    assert 'CoLoRAConvNeXt' in line or len(shape) > 2
    assert sorted(os.listdir(tmp_path)) == before


def test_merge_existing_out_message(data, tmp_path, capsys):
    ckpt = save_checkpoint(data['colora'], tmp_path / 'iter_2.pth')
    (tmp_path / 'out.pth').write_bytes(b'x')
    assert _run_merge(data['colora'], ckpt, tmp_path / 'out.pth') == 2
    line = error_line(capsys)
    assert f'OUT {tmp_path / "out.pth"} exists' in line and '--force' in line


# ------------------------------------------------------------------ settings match
def test_settings_differences_cover_every_spec_field():
    a = {'backbone': dict(method='colora', gamma=None, use_filter=True, merged=False)}
    b = {'backbone': dict(method='colora', gamma=16, use_filter=False, merged=True,
                          partner_policy='frozen')}
    diffs = settings_differences(a, b)
    assert diffs == ['backbone.adapter.partner_policy: checkpoint \'effective\', config '
                     "'frozen'",
                     'backbone.adapter.use_filter: checkpoint True, config False']
    assert settings_differences(a, a) == []
    # a field the spec does not know (yet) is compared too
    c = {'backbone': dict(a['backbone'], future_field=1)}
    assert any('future_field' in d for d in settings_differences(c, a))
    assert settings_differences({'backbone': dict(method='full')},
                                {'backbone': dict(method='full', gamma=3)}) == []


def test_settings_differences_compare_only_what_the_methods_read():
    from colora_mm.adapters import AdapterSpec
    lora = AdapterSpec(method='lora', gamma=8).to_dict()
    ignored = dict(lora, use_filter=False, share_ratio=0.9, partner_policy='frozen',
                   filter_lambda=0.5, spatial=False, spatial_gamma=4, act='gelu')
    assert settings_differences({'backbone': lora}, {'backbone': ignored}) == []
    assert settings_differences({'backbone': lora}, {'backbone': dict(
        lora, scaling=1.0)}) == ['backbone.adapter.scaling: checkpoint 2.0, config 1.0']
    full = AdapterSpec(method='full').to_dict()
    assert settings_differences({'backbone': full}, {'backbone': lora}) == [
        "backbone.adapter.method: checkpoint 'full', config 'lora'"]
    # both read gamma: a different rank divisor is listed beside the method
    colora = AdapterSpec(method='colora').to_dict()
    assert settings_differences({'backbone': colora}, {'backbone': lora}) == [
        'backbone.adapter.gamma: checkpoint 16, config 8',
        "backbone.adapter.method: checkpoint 'colora', config 'lora'"]
    conv = AdapterSpec(method='conv_adapter').to_dict()
    assert settings_differences({'backbone': conv}, {'backbone': dict(
        conv, scaling=0.5, partner_policy='frozen')}) == []
    assert settings_differences({'backbone': conv}, {'backbone': dict(
        conv, act='gelu')}) == ["backbone.adapter.act: checkpoint 'relu', config 'gelu'"]


def test_settings_differences_resolve_the_default_spatial_gamma():
    """``spatial_gamma=None`` is CoLoRA's spatial rank divisor ``gamma`` (and
    ``gamma=None`` its default 16): written out or left to the default, the same
    model has no difference; another spatial divisor is one."""
    assert settings_differences({'b': dict(method='colora', gamma=8)},
                                {'b': dict(method='colora', gamma=8,
                                           spatial_gamma=8)}) == []
    assert settings_differences({'b': dict(method='colora')},
                                {'b': dict(method='colora', gamma=16,
                                           spatial_gamma=16)}) == []
    assert settings_differences({'b': dict(method='colora', gamma=8)},
                                {'b': dict(method='colora', gamma=8,
                                           spatial_gamma=16)}) == [
        'b.adapter.spatial_gamma: checkpoint 8, config 16']


def test_test_and_merge_accept_settings_the_method_ignores(data, tmp_path, capsys):
    ckpt = save_checkpoint(data['lora'], tmp_path / 'iter_2.pth', cfg_text=True)
    options = {'model.backbone.adapter.use_filter': False,
               'model.backbone.adapter.share_ratio': 0.9,
               'model.backbone.adapter.partner_policy': 'frozen'}
    cfg = Config.fromfile(data['lora'])
    cfg.merge_from_dict(options)
    init_default_scope(cfg.default_scope)
    with pytest.warns(UserWarning, match="method='lora' does not read share_ratio=0.9"):
        current = train.check_adapter(cfg, data['lora'])
    assert current['backbone']['share_ratio'] == 0.9
    # what tools/test.py and tools/merge.py run before any work: no error
    train.check_settings_match(torch.load(ckpt, weights_only=False), ckpt, current,
                               data['lora'], allow_mismatch=False)
    assert _run_merge(data['lora'], ckpt, tmp_path / 'm.pth', '--cfg-options',
                      *(f'{k}={v}' for k, v in options.items())) == 0
    assert 'warning: checkpoint' not in capsys.readouterr().err


@pytest.mark.parametrize('source', ['record', 'cfg'])
def test_test_and_merge_refuse_other_adapter_settings(data, tmp_path, capsys, source):
    ckpt = save_checkpoint(data['colora'], tmp_path / 'iter_2.pth',
                           record=source == 'record', cfg_text=source == 'cfg')
    assert test_tool.main([data['nofilter'], ckpt, '--work-dir',
                           str(tmp_path / 'wd')]) == 2
    line = error_line(capsys)
    assert 'backbone.adapter.use_filter: checkpoint True, config False' in line
    assert '--allow-mismatch' in line
    assert not (tmp_path / 'wd').exists()
    assert _run_merge(data['nofilter'], ckpt, tmp_path / 'm.pth') == 2
    assert 'use_filter' in error_line(capsys)
    assert _run_merge(data['nofilter'], ckpt, tmp_path / 'm.pth', '--allow-mismatch') == 0
    assert 'warning: checkpoint' in capsys.readouterr().err
    assert (tmp_path / 'm.pth').is_file()


# ------------------------------------------------------------------ checks before work
BAD_ADAPTERS = [
    ('model.backbone.adapter.gamma=2.5', 'gamma=2.5'),
    ('model.backbone.adapter.gamma=0', 'gamma=0'),
    ('model.backbone.adapter.gamma=1000', 'use gamma <= '),
    ('model.backbone.adapter.share_ratio=1.5', 'share_ratio=1.5'),
    ('model.backbone.adapter.method=foo', "method='foo'"),
    ('model.backbone.adapter.use_filter=yes', "use_filter='yes'"),
    ('model.backbone.adapter.rank=4', 'unknown key rank=4'),
]


@pytest.mark.parametrize('option, expected', BAD_ADAPTERS)
def test_train_checks_the_adapter_before_work(data, tmp_path, capsys, option, expected):
    work = tmp_path / 'wd'
    assert train.main([data['colora'], '--work-dir', str(work), '--cfg-options',
                       option]) == 2
    line = error_line(capsys)
    assert expected in line and 'model.backbone.adapter' in line, line
    assert not work.exists()


def test_spec_types_follow_the_dataclass():
    check_spec_types(dict(method='lora', gamma=None, share_ratio=1, use_filter=False))
    with pytest.raises(ValueError, match=r"share_ratio='0.5' \(str\) must be a number"):
        check_spec_types(dict(share_ratio='0.5'))
    with pytest.raises(ValueError, match='gamma=True .* must be an integer or None'):
        check_spec_types(dict(gamma=True))


def test_train_checks_device_pretrained_and_data_before_work(data, tmp_path, capsys):
    work = tmp_path / 'wd'
    if not torch.cuda.is_available():
        assert train.main([data['colora'], '--work-dir', str(work), '--amp']) == 2
        assert '--amp' in error_line(capsys)
        assert train.main([data['colora'], '--work-dir', str(work), '--cfg-options',
                           'optim_wrapper.type=AmpOptimWrapper']) == 2
        assert 'optim_wrapper.type=OptimWrapper' in error_line(capsys)
    missing = str(tmp_path / 'nowhere.pth')
    pretrained = write_tiny_config(COLORA, str(tmp_path / 'pretrained.py'),
                                   data_root=data['ade'], extra=dict(model=dict(
                                       backbone=dict(init_cfg=dict(
                                           type='Pretrained', checkpoint=missing)))))
    assert train.main([pretrained, '--work-dir', str(work)]) == 2
    line = error_line(capsys)
    assert f"model.backbone.init_cfg.checkpoint='{missing}' does not exist" in line
    # damaged files are refused before work too (size, first bytes, zip end record)
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, whole)
    damaged = {'empty.pth': b'', 'truncated.pth': whole.read_bytes()[:-200],
               'text.pth': b'<html>404 Not Found</html>'}
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        assert train.main([pretrained, '--work-dir', str(work), '--cfg-options',
                           f'model.backbone.init_cfg.checkpoint={tmp_path / name}']) == 2
        line = error_line(capsys)
        assert f"model.backbone.init_cfg.checkpoint='{tmp_path / name}': the file is" in line
        assert 'download the checkpoint again' in line
    assert train.unreadable_checkpoint(str(whole)) is None
    legacy = tmp_path / 'legacy.pth'
    torch.save({'w': torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    assert train.unreadable_checkpoint(str(legacy)) is None
    empty = tmp_path / 'empty_root'
    empty.mkdir()
    assert train.main([data['colora'], '--work-dir', str(work), '--cfg-options',
                       f'train_dataloader.dataset.data_root={empty}']) == 2
    line = error_line(capsys)
    assert 'data_prefix.img_path' in line and 'does not exist' in line
    (empty / 'images' / 'training').mkdir(parents=True)
    (empty / 'annotations' / 'training').mkdir(parents=True)
    assert train.main([data['colora'], '--work-dir', str(work), '--cfg-options',
                       f'train_dataloader.dataset.data_root={empty}']) == 2
    assert 'is empty' in error_line(capsys)
    assert not work.exists()


def test_pretrained_url_that_cannot_be_fetched_is_one_error_line(data, tmp_path, capsys):
    """A pretrained URL is fetched when the model initialises: offline, the run ends
    there with the loader's one line (backbone, source, fix) and exit status 2, not a
    traceback."""
    url = 'http://127.0.0.1:9/colora_mm_unreachable_convnext.pth'
    config = write_tiny_config(COLORA, str(tmp_path / 'url.py'), data_root=data['ade'],
                               extra=dict(model=dict(backbone=dict(init_cfg=dict(
                                   type='Pretrained', checkpoint=url)))))
    assert train.main([config, '--work-dir', str(tmp_path / 'wd')]) == 2
    line = error_line(capsys)
    assert f'cannot read the pretrained checkpoint {url}' in line, line
    assert 'could not be downloaded' in line and 'LOCAL_PATH' in line


def test_test_and_merge_check_the_adapter_before_work(data, tmp_path, capsys):
    ckpt = save_checkpoint(data['colora'], tmp_path / 'iter_2.pth')
    assert test_tool.main([data['colora'], ckpt, '--work-dir', str(tmp_path / 'wd'),
                           '--cfg-options', 'model.backbone.adapter.gamma=2.5']) == 2
    assert 'gamma=2.5' in error_line(capsys)
    assert _run_merge(data['colora'], ckpt, tmp_path / 'm.pth', '--cfg-options',
                      'model.backbone.adapter.gamma=0') == 2
    assert 'gamma=0' in error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ['iter_2.pth']


def test_cli_gamma_float_is_one_line_exit_2(data, tmp_path):
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'train.py'), data['colora'],
         '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
         'model.backbone.adapter.gamma=2.5'],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2
    assert 'gamma=2.5' in single_error(proc.stdout + proc.stderr)
    assert not (tmp_path / 'wd').exists()


# ------------------------------------------------------------------ resume
def test_resume_skips_a_damaged_checkpoint_and_checks_settings(data, tmp_path, capsys):
    work = tmp_path / 'wd'
    assert train.main([data['colora'], '--work-dir', str(work)]) == 0
    newest = work / 'iter_4.pth'
    content = newest.read_bytes()
    newest.write_bytes(content[:len(content) // 3])
    capsys.readouterr()
    assert train.main([data['colora'], '--work-dir', str(work), '--resume']) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('resume: skipped')]
    assert len(lines) == 1, out[-2000:]
    assert str(newest) in lines[0] and 'cannot be read' in lines[0]
    assert lines[0].endswith(f'resuming from {work / "iter_2.pth"}')
    assert torch.load(newest, weights_only=False)['meta']['iter'] == 4   # rewritten

    # a LoRA config cannot resume the CoLoRA run
    assert train.main([data['lora'], '--work-dir', str(work), '--resume']) == 2
    line = error_line(capsys)
    assert "backbone.adapter.method: checkpoint 'colora', config 'lora'" in line
    assert train.main([data['nofilter'], '--work-dir', str(work), '--resume',
                       str(work / 'iter_2.pth')]) == 2
    assert 'use_filter' in error_line(capsys)
    newest.write_bytes(b'')
    (work / 'iter_2.pth').write_bytes(b'')
    assert train.main([data['colora'], '--work-dir', str(work), '--resume']) == 2
    assert 'can be resumed from' in error_line(capsys)


SHIPPED = sorted(p for folder in ('ade20k', 'coco', 'demo')
                 for p in glob.glob(osp.join(ROOT, 'configs', folder, '*.py')))


def test_every_shipped_config_saves_atomically():
    assert len(SHIPPED) > 40
    for path in SHIPPED:
        hook = Config.fromfile(path).default_hooks.checkpoint
        assert hook.type == 'AtomicCheckpointHook', path


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh'])
def test_launchers_use_the_checkout_venv(tmp_path, script):
    """A copy of the launcher beside a fake ``.venv/bin/python`` that prints what it
    was asked to run: with PYTHON unset the launcher runs the checkout's venv."""
    (tmp_path / 'tools').mkdir()
    launcher = tmp_path / 'tools' / script
    launcher.write_text(open(osp.join(ROOT, 'tools', script)).read())
    venv_python = tmp_path / '.venv' / 'bin' / 'python'
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text('#!/bin/sh\necho "venv python $*"\n')
    venv_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    (tmp_path / 'cfg.py').write_text('')           # the launchers check that they exist
    (tmp_path / 'ckpt.pth').write_bytes(b'')
    cfg, ckpt = str(tmp_path / 'cfg.py'), str(tmp_path / 'ckpt.pth')
    args = [cfg, '2'] if script == 'dist_train.sh' else [cfg, ckpt, '2']
    proc = subprocess.run(['bash', str(launcher), *args], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('venv python -m torch.distributed.run')
    other = tmp_path / 'other_python'
    other.write_text('#!/bin/sh\necho "other python $*"\n')
    other.chmod(0o755)
    proc = subprocess.run(['bash', str(launcher), *args], capture_output=True, text=True,
                          env=dict(env, PYTHON=str(other)), timeout=60)
    assert proc.stdout.startswith('other python -m torch.distributed.run')

"""VTAB-1k: the task table, the summary (means, standard deviations, group averages
against hand-computed values and the paper's own rows), the mmpretrain CoLoRA ResNet
with torchvision weights, tools/vtab1k.py end to end on a generated two-task root
(runs, a run killed after its first checkpoint and resumed, finished runs skipped),
and the inputs the tools refuse."""
import importlib.util
import json
import math
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmpretrain')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import is_adapter_name, norm_parameter_names  # noqa: E402
from colora_mm.datasets import (GROUPS, TASKS, VTABLayoutError, get_task,  # noqa: E402
                                resolve_tasks)
from colora_mm.evaluation import (format_markdown, paper_row,  # noqa: E402
                                  summarize)
from colora_mm.evaluation.vtab1k_table import PAPER_VTAB1K, format_params  # noqa: E402
from data_gen import single_error  # noqa: E402
from helpers_ckpt import (REDUCED_CONVNEXT, convnext_original_checkpoint,  # noqa: E402
                          save, torchvision_resnet_state_dict)
from vtab1k_gen import make_vtab1k, write_tiny_vtab1k_config  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(ROOT, 'tests')
TOOLS = osp.join(ROOT, 'tools')
CONFIG = osp.join(ROOT, 'configs', 'vtab1k',
                  'colora_convnext_s_1xb32-100e_vtab1k-224x224.py')
TWO_TASKS = ('patch_camelyon', 'kitti')


def load_tool(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- tasks
def test_tasks_classes_and_groups_are_vtabs():
    # VTAB-1k's label spaces (Zhai et al. 2019; the numbers PEFT code bases use).
    expected = {
        'Caltech101': 102, 'CIFAR-100': 100, 'DTD': 47, 'Flowers102': 102, 'Pets': 37,
        'Sun397': 397, 'SVHN': 10, 'Camelyon': 2, 'EuroSAT': 10, 'Resisc45': 45,
        'Retinopathy': 5, 'Clevr-Count': 8, 'Clevr-Dist': 6, 'DMLab': 6, 'dSpr-Loc': 16,
        'dSpr-Ori': 16, 'KITTI-Dist': 4, 'sNORB-Azim': 18, 'sNORB-Elev': 9}
    assert {t.column: t.num_classes for t in TASKS} == expected
    assert [sum(t.group == g for t in TASKS) for g in GROUPS] == [7, 4, 8]
    # the paper's column order, group by group
    assert [t.column for t in TASKS] == [
        'Caltech101', 'CIFAR-100', 'DTD', 'Flowers102', 'Pets', 'Sun397', 'SVHN',
        'Camelyon', 'EuroSAT', 'Resisc45', 'Retinopathy',
        'Clevr-Count', 'Clevr-Dist', 'DMLab', 'dSpr-Loc', 'dSpr-Ori', 'KITTI-Dist',
        'sNORB-Azim', 'sNORB-Elev']


def test_resolve_tasks():
    assert len(resolve_tasks(['all'])) == 19
    assert [t.name for t in resolve_tasks(['specialized'])] == [
        'patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy']
    # paper order, duplicates once, column names and any case
    assert [t.name for t in resolve_tasks(['kitti', 'DTD', 'dtd', 'Pets'])] == [
        'dtd', 'oxford_iiit_pet', 'kitti']
    with pytest.raises(VTABLayoutError, match="unknown VTAB-1k task 'cifar10'"):
        resolve_tasks(['cifar10'])
    assert get_task('sNORB-Elev').name == 'smallnorb_ele'


# ----------------------------------------------------------------- summary
def test_summary_against_hand_computed_values():
    natural = [t.name for t in TASKS if t.group == 'natural']
    top1 = {name: {0: 50.0 + i, 1: 52.0 + i, 2: 57.0 + i} for i, name in
            enumerate(natural)}
    top1['eurosat'] = {0: 90.0, 1: 94.0}          # specialized: incomplete
    summary = summarize(top1)
    # mean (50+52+57)/3 = 53, population std sqrt((9+1+16)/3) = 2.9439
    cal = summary['tasks']['caltech101']
    assert cal['mean'] == pytest.approx(53.0)
    assert cal['std'] == pytest.approx(math.sqrt(26 / 3))
    assert cal['seeds'] == [0, 1, 2]
    euro = summary['tasks']['eurosat']
    assert (euro['mean'], euro['std']) == (pytest.approx(92.0), pytest.approx(2.0))
    # natural average: mean of the task means 53..59 = 56, mean of the stds = 2.9439
    assert summary['groups']['natural']['mean'] == pytest.approx(56.0)
    assert summary['groups']['natural']['std'] == pytest.approx(math.sqrt(26 / 3))
    assert set(summary['groups']) == {'natural'}
    table = format_markdown(summary, 'convnext_s', 'colora', 2_612_345,
                            groups=['natural', 'specialized'], with_paper=True)
    lines = table.splitlines()
    assert lines[0] == ('### VTAB-1k Natural (Table 5), top-1 accuracy (%)')
    assert lines[2] == ('| Backbone | Method | #Param | Caltech101 | CIFAR-100 | DTD | '
                        'Flowers102 | Pets | Sun397 | SVHN | Average |')
    assert lines[4] == ('| ConvNeXt-S | CoLoRA (ours, 2/3 seeds) | 2.6M | 53.00±2.94 | '
                        '54.00±2.94 | 55.00±2.94 | 56.00±2.94 | 57.00±2.94 | 58.00±2.94 | '
                        '59.00±2.94 | 56.00±2.94 |')
    assert lines[5] == ('| ConvNeXt-S | CoLoRA (paper) | 2.6M | 91.60±0.11 | 66.34±0.55 | '
                        '75.00±0.60 | 98.89±0.06 | 90.43±0.27 | 49.94±0.33 | 92.08±0.21 | '
                        '80.61±0.31 |')
    special = table.split('### VTAB-1k Specialized (Table 6)')[1].splitlines()
    assert special[4] == ('| ConvNeXt-S | CoLoRA (ours, 2/3 seeds) | 2.6M | - | '
                          '92.00±2.00 | - | - | - |')
    assert 'Structured' not in table
    assert (format_params(23_508_032), format_params(12_345)) == ('23.5M', '12.3K')


def test_paper_rows_follow_the_same_averaging_rule():
    """The printed group averages of Tables 5-7 are the mean of the task means +- the
    mean of the task standard deviations, to the rounding of the printed cells (0.01:
    the inputs are rounded too); two of the 30 printed standard deviations are not."""
    outliers = {('resnet50', 'full', 'specialized'): 0.35,      # mean of stds 0.315
                ('resnet50', 'conv_adapter', 'structured'): 0.67}  # 0.685
    assert len(PAPER_VTAB1K) == 10
    for backbone, method in PAPER_VTAB1K:
        row = paper_row(backbone, method)
        for group in GROUPS:
            names = [t.name for t in TASKS if t.group == group]
            mean = sum(row['tasks'][n][0] for n in names) / len(names)
            std = sum(row['tasks'][n][1] for n in names) / len(names)
            printed = row['groups'][group]
            key = (backbone, method, group)
            assert abs(mean - printed[0]) <= 0.01, key
            if key in outliers:
                assert printed[1] == outliers[key] and abs(std - printed[1]) > 0.01
            else:
                assert abs(std - printed[1]) <= 0.01, key
    assert paper_row('convnext_b', 'colora') is None
    assert paper_row('resnet50', 'full')['params'] == '23.5M'


# ----------------------------------------------------------------- models
def test_mmpretrain_resnet_loads_torchvision_resnet50(tmp_path):
    """resnet50-11ad3fa6.pth's names and shapes land on mmpretrain's ResNet as they
    are (downsample.0/1 included); only the classifier fc is dropped."""
    from mmpretrain.models.backbones import ResNet
    from mmpretrain.registry import MODELS
    sd = torchvision_resnet_state_dict(seed=3)
    path = save(sd, tmp_path / 'resnet50.pth')
    model = MODELS.build(dict(type='CoLoRAResNet', depth=50, adapter=dict(method='colora'),
                              init_cfg=dict(type='Pretrained', checkpoint=path)))
    assert isinstance(model, ResNet)
    model.init_weights()
    own = model.state_dict()
    assert 'layer1.0.downsample.0.weight' in own and 'layer1.0.downsample.1.weight' in own
    for key, value in sd.items():
        if not key.startswith('fc.'):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    report = model.pretrained_report
    assert report.layout == 'torchvision' and report.clean
    assert set(report.dropped) == {'fc.weight', 'fc.bias'}
    assert len(report.loaded) == len(sd) - 2


def test_fresh_colora_resnet_computes_mmpretrains_resnet():
    from mmpretrain.models.backbones import ResNet
    from mmpretrain.registry import MODELS
    narrow = dict(depth=50, base_channels=16, stem_channels=16)
    sd = torchvision_resnet_state_dict((3, 4, 6, 3), 16, seed=2)
    sd = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    plain = ResNet(**narrow)
    plain.load_state_dict(sd)
    model = MODELS.build(dict(type='CoLoRAResNet', adapter=dict(method='colora'),
                              init_cfg=dict(type='Pretrained', checkpoint=sd), **narrow))
    model.init_weights()
    plain.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], plain(x)[-1], rtol=1e-4, atol=1e-4)
    norms = norm_parameter_names(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters()
        if is_adapter_name(n) or n.endswith('.bias') or n in norms}


def test_mmpretrain_resnet_train_and_eval_chain_and_keep_freezing():
    """mmpretrain's ResNet.train() returns None; the adapted one returns the module,
    re-applies ``frozen_stages`` and ``norm_eval`` and leaves the rest training."""
    from mmpretrain.registry import MODELS
    model = MODELS.build(dict(type='CoLoRAResNet', depth=50, base_channels=16,
                              stem_channels=16, frozen_stages=1, norm_eval=True,
                              adapter=dict(method='colora')))
    assert model.train() is model
    assert not model.layer1.training and not model.bn1.training
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.layer2[0].conv2.training and model.layer2[0].conv2.adapter_branch.training
    for name, p in model.named_parameters():
        if name.startswith(('conv1.', 'bn1.', 'layer1.')):
            assert not p.requires_grad, name
    assert model.layer2[0].conv1.adapter_branch.pair.A1.requires_grad
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    assert model.train(True).train(False) is model and not model.layer2[0].conv2.training


def test_convnext_classifier_loads_the_original_release(tmp_path):
    """The shipped ConvNeXt classifier (at reduced depth and width) on a checkpoint in
    the original release's layout: every backbone tensor loaded, the final ``norm``
    becomes the post-pooling ``norm3``, the release's ``head`` is dropped (the task's
    head keeps its own initialisation)."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=7)
    path = save(ckpt, tmp_path / 'convnext_original.pth')
    cfg = Config.fromfile(CONFIG)
    cfg.model.backbone.arch = dict(REDUCED_CONVNEXT)
    cfg.model.backbone.init_cfg.checkpoint = path
    cfg.model.head.in_channels = REDUCED_CONVNEXT['channels'][-1]
    cfg.model.head.num_classes = 5
    model = MODELS.build(cfg.model)
    model.init_weights()
    report = model.backbone.pretrained_report
    assert report.layout == 'convnext_original' and report.clean
    assert set(report.dropped) == {'head.weight', 'head.bias'}
    sd = ckpt['model']
    torch.testing.assert_close(model.backbone.norm3.weight, sd['norm.weight'])
    torch.testing.assert_close(model.backbone.stages[2][1].pointwise_conv1.weight,
                               sd['stages.2.1.pwconv1.weight'])
    assert model.head.fc.weight.shape == (5, REDUCED_CONVNEXT['channels'][-1])
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64), mode='tensor')
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


# ----------------------------------------------------------------- end to end
def run(*argv, env=None):
    pythonpath = os.pathsep.join([ROOT, TESTS, os.environ.get('PYTHONPATH', '')])
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=pythonpath, **(env or {})))
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope='module')
def vtab(tmp_path_factory):
    base = tmp_path_factory.mktemp('vtab')
    root = make_vtab1k(str(base / 'vtab-1k'), tasks=TWO_TASKS)
    config = write_tiny_vtab1k_config(CONFIG, str(base / 'tiny.py'), data_root=root)
    # The same, plus a hook that kills the process once, after kitti seed 1's first
    # epoch (its checkpoint written).
    killing = write_tiny_vtab1k_config(CONFIG, str(base / 'tiny_killed.py'),
                                       data_root=root, extra=dict(
        custom_imports=dict(imports=['colora_mm', 'vtab1k_kill_hook'],
                            allow_failed_imports=False),
        custom_hooks=[dict(type='CoLoRAReportHook', input_size=(32, 32)),
                      dict(type='KillOnceAfterEpochHook', epoch=1,
                           marker=str(base / 'killed'),
                           work_dir_contains=osp.join('kitti', 'seed_1'))]))
    return base, root, config, killing


@pytest.fixture(scope='module')
def benchmark(vtab):
    """Two tasks x two seeds: the fourth run is killed after epoch 1 (a subprocess);
    the same command again (in this process) skips the three finished runs and resumes
    the fourth."""
    import contextlib
    import io
    base, _, _, killing = vtab
    work = base / 'work'
    argv = [killing, '--tasks', *TWO_TASKS, '--seeds', '0', '1', '--work-dir', str(work),
            '--paper']
    code, log = run(sys.executable, osp.join(TOOLS, 'vtab1k.py'), *argv)
    # what the killed command left behind
    files = {(t, s): sorted(os.listdir(work / t / f'seed_{s}')) for t in TWO_TASKS
             for s in (0, 1)}
    with open(work / 'results.json') as f:
        partial = json.load(f)
    first = (code, log, files, partial)
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    out = io.StringIO()
    sys.path.insert(0, TESTS)     # the kill hook's module, imported by the config
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = tool.main(argv)
    finally:
        sys.path.remove(TESTS)
    return work, first, (code, out.getvalue())


def test_a_killed_run_leaves_its_checkpoint_and_the_others_results(benchmark):
    _, (code, log, files, partial), _ = benchmark
    assert code == -9, log[-3000:]      # SIGKILL
    for (task, seed), names in files.items():
        finished = 'result.json' in names
        assert finished == ((task, seed) != ('kitti', 1)), (task, seed, names)
        # finished runs keep no checkpoint; the killed one its first epoch's
        checkpoints = [n for n in names if n.endswith('.pth')]
        assert checkpoints == ([] if finished else ['epoch_1.pth']), (task, seed, names)
    assert 'last_checkpoint' in files['kitti', 1]
    assert '[1/4] patch_camelyon seed 0: starting (Camelyon, 2 classes)' in log
    assert '[3/4] kitti seed 0: starting (KITTI-Dist, 4 classes)' in log
    assert '[4/4] kitti seed 1: starting' in log
    assert '[1/4] patch_camelyon seed 0: top-1 ' in log and '3 runs left, ETA ' in log
    assert '[4/4] kitti seed 1: top-1' not in log
    assert sorted(partial['runs']) == ['kitti', 'patch_camelyon']
    assert sorted(partial['runs']['kitti']) == ['0']
    assert sorted(partial['runs']['patch_camelyon']) == ['0', '1']


def test_the_same_command_skips_finished_runs_and_resumes_the_killed_one(benchmark):
    work, _, (code, log) = benchmark
    assert code == 0, log[-3000:]
    assert '[1/4] patch_camelyon seed 0: done before, top-1 ' in log
    assert '[3/4] kitti seed 0: done before' in log
    assert '[4/4] kitti seed 1: resuming (KITTI-Dist, 4 classes)' in log
    assert 'resumed epoch: 1' in log
    # only epoch 2 was trained again
    assert 'Epoch(train) [2]' in log and 'Epoch(train) [1]' not in log
    assert '[4/4] kitti seed 1: top-1 ' in log and '0 runs left, ETA 0m00s' in log
    with open(work / 'kitti' / 'seed_1' / 'result.json') as f:
        assert json.load(f)['resumed'] is True


def test_results_json_and_table(benchmark, vtab):
    work, _, (_, log) = benchmark
    _, _, config, _ = vtab
    with open(work / 'results.json') as f:
        results = json.load(f)
    # the shrunk ConvNeXt is not ConvNeXt-S: named by its type, no paper row beside it
    assert (results['backbone'], results['method']) == ('CoLoRAConvNeXt', 'colora')
    for task in TWO_TASKS:
        runs = results['runs'][task]
        values = [runs[s]['top1'] for s in ('0', '1')]
        assert all(0.0 <= v <= 100.0 for v in values)
        mean = sum(values) / 2
        std = abs(values[0] - values[1]) / 2
        assert results['tasks'][task]['mean'] == pytest.approx(mean)
        assert results['tasks'][task]['std'] == pytest.approx(std)
        assert runs['0']['num_classes'] == get_task(task).num_classes
        # top-1 is a share of the 4 test images
        assert all(v * 4 / 100 == pytest.approx(round(v * 4 / 100)) for v in values)
    assert results['groups'] == {}    # no group complete
    # #Param: what trains in the built backbone
    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    expected = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert results['params'] == expected
    assert results['runs']['kitti']['1']['params'] == expected
    with open(work / 'results.md') as f:
        table = f.read()
    pc = results['tasks']['patch_camelyon']
    cell = f"{pc['mean']:.2f}±{pc['std']:.2f}"
    assert (f'| CoLoRAConvNeXt | CoLoRA (ours, 2 seeds) | {format_params(expected)} | '
            f'{cell} |') in table
    assert '(paper)' not in table
    assert 'Structured (Table 7)' in table and 'Natural' not in table
    assert table.split('\n', 2)[2] in log      # printed at the end


def test_the_shipped_configs_name_the_papers_rows():
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    vtab = osp.join(ROOT, 'configs', 'vtab1k')
    for name, identity in (
            ('colora_convnext_s_1xb32-100e_vtab1k-224x224.py', ('convnext_s', 'colora')),
            ('full-ft_r50_1xb32-100e_vtab1k-224x224.py', ('resnet50', 'full')),
            ('conv-adapter_convnext_b_1xb32-100e_vtab1k-224x224.py',
             ('convnext_b', 'conv_adapter'))):
        cfg = tool.load_config(osp.join(vtab, name), {})
        assert tool.model_identity(cfg) == identity
        assert (paper_row(*identity) is None) == (identity[0] == 'convnext_b')
    # a narrowed ResNet-50 is not the paper's: no paper row beside it
    cfg = tool.load_config(osp.join(vtab, 'colora_r50_1xb32-100e_vtab1k-224x224.py'),
                           {'model.backbone.base_channels': 32})
    assert tool.model_identity(cfg) == ('CoLoRAResNet', 'colora')


def test_summary_only_rebuilds_the_table(benchmark, vtab, capsys):
    work, _, _ = benchmark
    _, _, config, _ = vtab
    os.remove(work / 'results.md')
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    before = json.loads((work / 'results.json').read_text())['runs']
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir',
                      str(work), '--summary-only'])
    assert code == 0
    out = capsys.readouterr().out
    # the files hold every finished run of the work dir, whatever --tasks and --seeds
    # select (a benchmark run group by group or seed by seed keeps all of them)
    assert 'KITTI-Dist' in out and 'Camelyon' in out and '(paper)' not in out
    assert osp.isfile(work / 'results.md')
    assert json.loads((work / 'results.json').read_text())['runs'] == before
    assert sorted(before) == sorted(TWO_TASKS) and all(
        sorted(seeds) == ['0', '1'] for seeds in before.values())


def test_summary_only_writes_nothing_without_runs(vtab, tmp_path, capsys):
    _, _, config, _ = vtab
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    work = tmp_path / 'none'
    assert tool.main([config, '--tasks', 'kitti', '--work-dir', str(work),
                      '--summary-only']) == 2
    assert 'no finished run' in capsys.readouterr().err
    assert not work.exists()


# ----------------------------------------------------------------- bad input
def broken_roots(base):
    """(name, root, the file the error must name): one problem each."""
    cases = []
    for name in ('missing_task', 'missing_split', 'missing_image', 'bad_label'):
        root = make_vtab1k(str(base / name), tasks=TWO_TASKS, num_train=4, num_val=1,
                           num_test=2, size=8)
        kitti = osp.join(root, 'kitti')
        if name == 'missing_task':
            import shutil
            shutil.rmtree(kitti)
            cases.append((name, root, kitti, 'missing task folder'))
        elif name == 'missing_split':
            os.remove(osp.join(kitti, 'test.txt'))
            cases.append((name, root, osp.join(kitti, 'test.txt'), 'missing split file'))
        elif name == 'missing_image':
            os.remove(osp.join(kitti, 'images', 'train', '0002.jpg'))
            cases.append((name, root, osp.join(kitti, 'images', 'train', '0002.jpg'),
                          'does not exist'))
        else:
            path = osp.join(kitti, 'train800val200.txt')
            with open(path, 'a') as f:
                f.write('images/train/0001.jpg 4\n')   # kitti has 4 classes: 0..3
            cases.append((name, root, path + ':5', 'label 4 is out of range 0..3'))
    return cases


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
    return broken_roots(tmp_path_factory.mktemp('broken'))


def test_tool_refuses_a_broken_root_before_any_run(broken, vtab, tmp_path, capsys):
    _, _, config, _ = vtab
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    for name, root, named, what in broken:
        work = tmp_path / name
        code = tool.main([config, '--tasks', *TWO_TASKS, '--seeds', '0',
                          '--data-root', root, '--work-dir', str(work)])
        captured = capsys.readouterr()
        assert code == 2, name
        error = single_error(captured.out + captured.err)
        assert named in error and what in error, (name, error)
        assert not work.exists(), name


def test_check_data_names_each_problem(broken, capsys):
    check = load_tool('colora_check_data', osp.join(TOOLS, 'data', 'check_data.py'))
    for name, root, named, what in broken:
        assert check.main(['vtab1k', root]) == 1, name
        captured = capsys.readouterr()
        problems = [line for line in captured.err.splitlines()
                    if line.startswith('problem: ')]
        # the 17 tasks not generated, and the broken one
        assert len(problems) == 18, (name, problems)
        assert any(named in p and what in p for p in problems), (name, problems)


def test_check_data_accepts_a_complete_task(vtab, capsys):
    _, root, _, _ = vtab
    check = load_tool('colora_check_data', osp.join(TOOLS, 'data', 'check_data.py'))
    assert check.main(['vtab1k', root]) == 1    # 17 tasks are absent
    captured = capsys.readouterr()
    assert 'vtab1k kitti train800val200: 8 images (the full dataset has 1000)' in \
        captured.out
    assert 'vtab1k kitti test: 4 images\n' in captured.out
    assert not [p for p in captured.err.splitlines() if 'kitti' in p]


@pytest.mark.parametrize('argv, message', [
    (['--tasks', 'cifar10'], "--tasks: unknown VTAB-1k task 'cifar10'"),
    (['--gpus', '3'], '--gpus 3 does not divide the batch of 4'),
    (['--data-root', '/nonexistent/vtab'], 'VTAB-1k root /nonexistent/vtab does not exist'),
    (['--seeds', '0', '-1'], '--seeds -1: a seed is a whole number from 0 to 4294967295'),
    (['--seeds', str(2 ** 32)], f'--seeds {2 ** 32}: a seed is a whole number'),
    (['--cfg-options', 'model.backbone.adpater.gamma=8'],
     'model.backbone.adpater is not an argument of CoLoRAConvNeXt'),
    (['--cfg-options', 'model.backbone.adapter.gamma=2.5'], 'gamma'),
    pytest.param(['--cfg-options', 'optim_wrapper.type=AmpOptimWrapper'],
                 "optim_wrapper.type='AmpOptimWrapper' (mixed precision) needs a GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(),
                                          reason='mixed precision runs on the GPU')),
    (['--cfg-options', 'model.backbone.init_cfg.type=Pretrained'],
     '--cfg-options: init_cfg='),
    (['--cfg-options', 'foo'], 'write each option as KEY=VALUE'),
    (['--cfg-options', 'trian_cfg.max_epochs=1'], 'did you mean train_cfg.max_epochs'),
])
def test_tool_refuses_bad_arguments(vtab, tmp_path, capsys, argv, message):
    _, _, config, _ = vtab
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--work-dir', str(tmp_path / 'w'), *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert message in single_error(captured.out + captured.err)
    assert not (tmp_path / 'w').exists()


def test_full_precision_leaves_the_mixed_precision_settings_out(vtab):
    """What the CPU check advises for an AMP config, ``optim_wrapper.type=OptimWrapper``:
    OptimWrapper takes no loss scale."""
    _, _, config, _ = vtab
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    cfg = tool.load_config(config, tool.cfg_options_dict([
        'optim_wrapper.type=OptimWrapper', 'optim_wrapper.loss_scale=dynamic']))
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'loss_scale' not in cfg.optim_wrapper


def test_tool_refuses_a_missing_pretrained_checkpoint(vtab, tmp_path, capsys):
    _, root, _, _ = vtab
    config = write_tiny_vtab1k_config(CONFIG, str(tmp_path / 'tiny.py'), data_root=root,
                                      extra=dict(model=dict(backbone=dict(init_cfg=dict(
                                          type='Pretrained',
                                          checkpoint='/nonexistent/convnext.pth')))))
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0',
                      '--work-dir', str(tmp_path / 'w')])
    captured = capsys.readouterr()
    assert code == 2
    assert ("model.backbone.init_cfg.checkpoint='/nonexistent/convnext.pth' does not "
            'exist') in single_error(captured.out + captured.err)
    assert not (tmp_path / 'w').exists()


def test_a_segmentation_config_is_refused(tmp_path, capsys):
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    config = osp.join(ROOT, 'configs', 'ade20k', 'colora_convnext_b.py')
    code = tool.main([config, '--work-dir', str(tmp_path / 'w')])
    captured = capsys.readouterr()
    assert code == 2
    assert "default_scope='mmseg'" in single_error(captured.out + captured.err)


def test_multi_gpu_runs_go_through_torchrun(vtab):
    _, root, config, _ = vtab
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    args = tool.parse_args([config, '--gpus', '4', '--work-dir', 'W', '--data-root', root,
                            '--cfg-options', 'train_cfg.max_epochs=3'])
    cmd = tool.torchrun_command(args, get_task('dtd'), 2, 29555)
    assert cmd[:3] == [sys.executable, '-m', 'torch.distributed.run']
    assert '--nproc_per_node=4' in cmd and '--master_port=29555' in cmd
    tail = cmd[cmd.index(osp.join(TOOLS, 'vtab1k.py')):]
    assert tail == [osp.join(TOOLS, 'vtab1k.py'), config, '--run-one', 'dtd', '2',
                    '--work-dir', 'W', '--gpus', '4', '--launcher', 'pytorch',
                    '--data-root', root, '--cfg-options', 'train_cfg.max_epochs=3']


def test_a_run_on_two_processes(vtab, tmp_path):
    """--gpus 2 on a CPU host: torchrun, two gloo processes, one result, and each
    process leaves with its process group closed (no abort at exit)."""
    _, _, config, _ = vtab
    work = tmp_path / 'work'
    code, log = run(sys.executable, osp.join(TOOLS, 'vtab1k.py'), config, '--tasks', 'kitti',
                    '--seeds', '0', '--gpus', '2', '--work-dir', work)
    assert code == 0, log[-3000:]
    assert 'terminate called' not in log
    with open(work / 'kitti' / 'seed_0' / 'result.json') as f:
        result = json.load(f)
    assert result['gpus'] == 2 and result['seed'] == 0
    assert [n for n in os.listdir(work / 'kitti' / 'seed_0') if n.endswith('.pth')] == []


# ----------------------------------------------------------------- stored runs
def copy_run(work, dest, task='kitti', seed=0):
    """A work dir holding a copy of one finished run of ``work``."""
    import shutil
    shutil.copytree(work / task / f'seed_{seed}', dest / task / f'seed_{seed}')
    return dest


def test_results_record_the_model_they_were_trained_with(benchmark, vtab):
    work, _, _ = benchmark
    _, _, _, killing = vtab
    with open(work / 'kitti' / 'seed_0' / 'result.json') as f:
        definition = json.load(f)['definition']
    assert definition['config'] == osp.abspath(killing)
    assert (definition['backbone'], definition['method']) == ('CoLoRAConvNeXt', 'colora')
    assert definition['model']['backbone']['type'] == 'CoLoRAConvNeXt'
    assert definition['adapter_settings']['backbone']['method'] == 'colora'
    # the summary keeps one line per run
    with open(work / 'results.json') as f:
        assert 'definition' not in json.load(f)['runs']['kitti']['0']


@pytest.mark.parametrize('options, differs', [
    (['--cfg-options', 'model.backbone.adapter.gamma=4'], 'adapter.gamma: stored'),
    ([], "backbone: stored 'CoLoRAConvNeXt', config 'CoLoRAResNet'"),
    (['--cfg-options', 'optim_wrapper.optimizer.lr=0.5'],     # only the schedule
     'optim_wrapper.optimizer.lr: stored 0.002, config 0.5'),
])
@pytest.mark.parametrize('summary_only', [False, True])
def test_a_result_of_another_model_is_refused(benchmark, vtab, tmp_path, capsys,
                                              options, differs, summary_only):
    work, _, _ = benchmark
    base, root, config, _ = vtab
    if not options:     # another config: a ResNet where a ConvNeXt was trained
        config = write_tiny_vtab1k_config(
            osp.join(ROOT, 'configs', 'vtab1k', 'colora_r50_1xb32-100e_vtab1k-224x224.py'),
            str(tmp_path / 'tiny_r50.py'), data_root=root)
    dest = copy_run(work, tmp_path / 'w')
    before = sorted(os.listdir(dest))
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(dest),
                      *options, *(['--summary-only'] if summary_only else [])])
    captured = capsys.readouterr()
    assert code == 2
    error = single_error(captured.out + captured.err)
    run_dir = str(dest / 'kitti' / 'seed_0')
    assert f'{run_dir} holds the result of another model' in error, error
    assert differs in error and 'another --work-dir' in error, error
    assert f'remove {run_dir}' in error
    assert sorted(os.listdir(dest)) == before     # no results.json / results.md


def test_a_result_without_a_record_is_taken_with_a_note(benchmark, vtab, tmp_path,
                                                        capsys):
    work, _, _ = benchmark
    _, _, config, _ = vtab
    dest = copy_run(work, tmp_path / 'w')
    path = dest / 'kitti' / 'seed_0' / 'result.json'
    with open(path) as f:
        result = json.load(f)
    del result['definition']        # as the earlier version wrote it
    with open(path, 'w') as f:
        json.dump(result, f)
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(dest)])
    out = capsys.readouterr().out
    assert code == 0
    assert f'note: {path} has no record of the model' in out
    assert '[1/1] kitti seed 0: done before' in out
    with open(dest / 'results.json') as f:
        assert json.load(f)['runs']['kitti']['0']['top1'] == result['top1']


def stopped_run(tmp_path, vtab, settings_of_config=True, damaged=False):
    """A work dir with kitti seed 0 stopped after its first epoch: a checkpoint
    recording the adapter settings of the tiny config (or a damaged file)."""
    _, _, config, _ = vtab
    run_dir = tmp_path / 'w' / 'kitti' / 'seed_0'
    run_dir.mkdir(parents=True)
    path = run_dir / 'epoch_1.pth'
    if damaged:
        path.write_bytes(b'not a checkpoint')
    else:
        tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
        settings = tool.check_adapter_and_hooks(tool.load_config(config, {}), config)
        torch.save(dict(state_dict={}, meta=dict(epoch=1, iter=2,
                                                 adapter_settings=settings)), path)
    (run_dir / 'last_checkpoint').write_text(str(path))
    return tmp_path / 'w', run_dir, path


@pytest.mark.parametrize('damaged', [False, True])
def test_a_stopped_run_resumes_only_with_its_adapter_settings(vtab, tmp_path, capsys,
                                                               damaged):
    _, _, config, _ = vtab
    work, run_dir, path = stopped_run(tmp_path, vtab, damaged=damaged)
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(work),
                      '--cfg-options', 'model.backbone.adapter.partner_policy=frozen',
                      'model.backbone.adapter.use_filter=False'])
    captured = capsys.readouterr()
    assert code == 2
    error = single_error(captured.out + captured.err)
    if damaged:
        assert f'no checkpoint in {run_dir} can be resumed from' in error, error
    else:
        assert f'checkpoint {path} does not match config {config}' in error, error
        assert 'adapter.partner_policy' in error and 'adapter.use_filter' in error, error
    assert f'remove {run_dir} to run kitti seed 0 again from the start' in error, error
    assert sorted(os.listdir(work)) == ['kitti']          # nothing written
    assert sorted(os.listdir(run_dir)) == ['epoch_1.pth', 'last_checkpoint']


@pytest.mark.parametrize('where', ['work_dir', 'task'])
def test_tool_refuses_a_file_as_work_dir(vtab, tmp_path, capsys, where):
    _, _, config, _ = vtab
    work = tmp_path / 'w'
    if where == 'work_dir':
        work.write_text('a file')
        named = f"--work-dir {str(work)!r} is a file"
    else:
        work.mkdir()
        (work / 'kitti').write_text('a file')
        named = f'{work / "kitti"} is a file where the runs of kitti go'
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(work)])
    captured = capsys.readouterr()
    assert code == 2
    assert named in single_error(captured.out + captured.err)
    if where == 'task':
        assert sorted(os.listdir(work)) == ['kitti']


@pytest.mark.parametrize('summary_only', [False, True])
def test_a_damaged_result_is_named(benchmark, vtab, tmp_path, capsys, summary_only):
    work, _, _ = benchmark
    _, _, config, _ = vtab
    dest = copy_run(work, tmp_path / 'w')
    path = dest / 'kitti' / 'seed_0' / 'result.json'
    path.write_text('{"task": "kitti", "se')       # cut off while written
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(dest),
                      *(['--summary-only'] if summary_only else [])])
    captured = capsys.readouterr()
    assert code == 2
    error = single_error(captured.out + captured.err)
    assert f'{path} is damaged (JSONDecodeError' in error, error
    assert f'remove {path.parent} to run that task and seed again' in error, error
    assert sorted(os.listdir(dest)) == ['kitti']
    # edited by hand: a number written as a string
    path.write_text('{"task": "kitti", "seed": 0, "top1": "50"}')
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(dest),
                      *(['--summary-only'] if summary_only else [])])
    captured = capsys.readouterr()
    assert code == 2
    error = single_error(captured.out + captured.err)
    assert f"{path} is damaged (ValueError: top1 is '50', not a number)" in error, error


def test_a_stopped_run_of_another_model_is_refused(vtab, tmp_path, capsys):
    """The adapter settings are the same; the backbone's drop-path rate is not."""
    _, _, config, _ = vtab
    work, run_dir, _ = stopped_run(tmp_path, vtab)
    tool = load_tool('colora_tools_vtab1k', osp.join(TOOLS, 'vtab1k.py'))
    cfg = tool.load_config(config, {})
    definition = tool.run_definition(cfg, config, tool.check_adapter_and_hooks(cfg, config))
    tool.write_json(str(run_dir / 'definition.json'), definition)
    code = tool.main([config, '--tasks', 'kitti', '--seeds', '0', '--work-dir', str(work),
                      '--cfg-options', 'model.backbone.drop_path_rate=0.3'])
    captured = capsys.readouterr()
    assert code == 2
    error = single_error(captured.out + captured.err)
    assert f'{run_dir} holds a stopped run of another model or schedule than {config}' in error, error
    assert 'model.backbone.drop_path_rate: stored ' in error and ', config 0.3' in error
    assert f'remove {run_dir} to run kitti seed 0 again' in error, error
    assert sorted(os.listdir(run_dir)) == ['definition.json', 'epoch_1.pth',
                                           'last_checkpoint']


def test_a_run_records_its_model_when_it_starts(benchmark, vtab):
    work, _, _ = benchmark
    _, _, _, killing = vtab
    with open(work / 'kitti' / 'seed_1' / 'definition.json') as f:
        started = json.load(f)
    with open(work / 'kitti' / 'seed_1' / 'result.json') as f:
        assert json.load(f)['definition'] == started
    assert started['config'] == osp.abspath(killing)

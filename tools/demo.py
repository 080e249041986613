"""The embedded CPU demo (``make demo``): CoLoRA adapting a small ConvNeXt to a new domain.

    python tools/demo.py [--out demo_out] [--seed 0] [--quick] [--jobs N] [--threads 1]
                         [--no-fork]

1. writes a synthetic two-domain segmentation dataset in the ADE20K layout
   (``colora_mm/demo/data.py``: flat-background shapes = source, textured backgrounds,
   smaller shapes and a rotated palette = target);
2. pretrains UperNet + ``CoLoRAConvNeXt`` (adapter method 'full', 5 blocks, 16-128
   channels) on the source domain with ``tools/train.py``;
3. fine-tunes it on the target domain with full fine-tuning, LoRA, CoLoRA and CoLoRA
   with per-stage settings under the same iteration budget
   (``configs/demo/finetune_*_target.py``, ``tools/train.py``);
4. merges the CoLoRA model with ``tools/merge.py``;
5. evaluates the pretrained model, the four fine-tuned ones and the merged one on the
   target validation split with ``tools/test.py``;
6. prints the table, writes ``OUT/results.md`` (and ``results.json``) and
   ``OUT/predictions.png`` (target images, ground truth, the pretrained model's and the
   merged CoLoRA model's predictions).

Every tool runs in its own process with the command line a user would type, forked
from a server that imported the OpenMMLab stack once (:class:`ToolLauncher`;
``--no-fork``: plain ``python tools/X.py`` processes); every command is written to
``OUT/commands.sh`` and its output to ``OUT/logs/``. Independent runs (the four
fine-tunings, the tests) go in parallel, ``--jobs`` at a time, each on one torch
thread. The same ``--seed`` gives the same table on the same machine (the times
aside).

``OUT`` must be new, empty, or the output of an earlier run: the demo writes a marker
(``OUT/.colora_mm_demo``) first and refuses, before touching anything, a folder that
is not empty and carries no marker. A later run replaces only the demo's own
sub-folders (``data``, ``work_dirs``, ``checkpoints``, ``logs``, ``predictions``).
"""
import argparse
import json
import multiprocessing as mp
import os
import os.path as osp
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = osp.join(REPO, 'configs', 'demo')
PRETRAIN_CONFIG = osp.join(CONFIGS, 'pretrain_full_source.py')
#: (key, table label, config) of the fine-tuning methods, in table order.
METHODS = (
    ('full', 'full fine-tuning', osp.join(CONFIGS, 'finetune_full_target.py')),
    ('lora', 'LoRA (gamma 8)', osp.join(CONFIGS, 'finetune_lora_target.py')),
    ('colora', 'CoLoRA (gamma 8, share 0.5)', osp.join(CONFIGS,
                                                     'finetune_colora_target.py')),
    ('colora_stage', 'CoLoRA per stage (last g4 sr0.75, first none)',
     osp.join(CONFIGS, 'finetune_colora-per-stage_target.py')),
)


#: Imported once by the forkserver the tools are forked from (see ToolLauncher).
PRELOAD = ['__main__', 'colora_mm', 'mmseg.models', 'mmseg.datasets',
           'mmseg.evaluation', 'mmengine.runner']


def _child(target: str, args: list, log_path: str) -> None:
    """Body of a forked process: ``python tools/X.py ARGS`` after the imports when
    ``target`` is a script, else a call of ``'module:function'`` with ``args``."""
    import runpy
    os.chdir(REPO)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        if target.endswith('.py'):
            sys.argv = [target] + list(args)
            sys.path.insert(0, osp.dirname(osp.abspath(target)))
            runpy.run_path(target, run_name='__main__')
        else:
            import importlib
            module, function = target.split(':')
            getattr(importlib.import_module(module), function)(*args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class ToolLauncher:
    """Runs ``tools/*.py`` scripts, each in a fresh process.

    A tool process on a small CPU spends most of its time importing torch, mmcv,
    mmengine, mmseg, mmdet, mmpretrain and colora_mm (about 7 of its 10 CPU-seconds
    in the quick demo). With ``forkserver=True`` they are imported once, in a
    multiprocessing forkserver, and every run is forked from it: the child goes to the
    repository, sends stdout/stderr to the log, sets ``sys.argv`` and runs the script
    as ``__main__``, which is what ``python tools/X.py ARGS`` does after its imports;
    the exit status is the script's. Otherwise (or where there is no forkserver) each
    run is ``python tools/X.py ARGS``.

    Args:
        env (dict): Variables for the tools (thread counts); set in this process too,
            before the forkserver starts and before torch is imported.
        forkserver (bool): Fork the tools from a preloaded server. Defaults to True.
    """

    def __init__(self, env: dict, forkserver: bool = True) -> None:
        self.env = dict(env)
        os.environ.update(self.env)
        self.ctx = None
        if forkserver and 'forkserver' in mp.get_all_start_methods():
            self.ctx = mp.get_context('forkserver')
            self.ctx.set_forkserver_preload(PRELOAD)
            from multiprocessing import forkserver
            forkserver.ensure_running()   # imports PRELOAD while the data is written

    def run(self, target: str, args: list, log_path: str) -> int:
        """Run ``target`` (a script path relative to the repository, or
        ``'module:function'``) with ``args`` in a new process, appending its output
        to ``log_path``; returns its exit status."""
        if self.ctx is None:
            if target.endswith('.py'):
                cmd = [sys.executable, target] + list(args)
            else:
                module, function = target.split(':')
                cmd = [sys.executable, '-c', f'import sys; sys.path.insert(0, {REPO!r}); '
                       f'import {module} as m; m.{function}(*{list(args)!r})']
            with open(log_path, 'a') as log:
                return subprocess.call(cmd, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT,
                                       env=dict(os.environ, **self.env))
        proc = self.ctx.Process(target=_child, args=(target, list(args), log_path))
        proc.start()
        proc.join()
        return proc.exitcode


def _demo_modules():
    """``colora_mm/demo``'s ``data`` and ``report`` modules (numpy, PIL, matplotlib),
    loaded as the package ``colora_mm_demo``: ``import colora_mm.demo`` would first
    import the OpenMMLab stack (``colora_mm/__init__``), seconds of CPU that the tool
    processes spend already."""
    import importlib
    import importlib.util
    name = 'colora_mm_demo'
    if name not in sys.modules:
        folder = osp.join(REPO, 'colora_mm', 'demo')
        spec = importlib.util.spec_from_file_location(
            name, osp.join(folder, '__init__.py'), submodule_search_locations=[folder])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return (importlib.import_module(f'{name}.data'),
            importlib.import_module(f'{name}.report'))


def _show(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it."""
    rel = osp.relpath(path)
    return path if rel.startswith('..') else rel


class Budget:
    """Data size and iteration budget of a run."""

    def __init__(self, quick: bool) -> None:
        if quick:
            self.num_train, self.num_val = 16, 8
            self.pretrain_iters, self.pretrain_warmup = 6, 2
            self.finetune_iters, self.finetune_warmup = 4, 1
            self.batch_size = 4
        else:
            self.num_train, self.num_val = 320, 64
            self.pretrain_iters, self.pretrain_warmup = 600, 30
            self.finetune_iters, self.finetune_warmup = 300, 15
            self.batch_size = 8


def schedule_options(iters: int, warmup: int, batch_size: int) -> list:
    """``--cfg-options`` setting the iteration budget of a demo config."""
    return [f'train_cfg.max_iters={iters}',
            f'default_hooks.checkpoint.interval={iters}',
            f'param_scheduler.0.end={warmup}',
            f'param_scheduler.1.begin={warmup}',
            f'param_scheduler.1.end={iters}',
            f'train_dataloader.batch_size={batch_size}']


class Demo:

    def __init__(self, args) -> None:
        self.out = osp.abspath(args.out)
        self.seed = args.seed
        self.quick = args.quick
        self.jobs = args.jobs or max(1, min(3, os.cpu_count() or 1))
        self.threads = args.threads or int(os.environ.get('OMP_NUM_THREADS') or 1)
        # One thread per tool process: on a small, shared CPU, several processes each
        # running one OpenMP thread per core run 10-30x slower.
        self.launcher = ToolLauncher(
            dict(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                 MPLBACKEND='Agg', PYTHONUNBUFFERED='1'),
            forkserver=not args.no_fork)
        self.budget = Budget(args.quick)
        self.data = osp.join(self.out, 'data')
        self.source = osp.join(self.data, 'source')
        self.target = osp.join(self.data, 'target')
        self.logs = osp.join(self.out, 'logs')
        self.work = osp.join(self.out, 'work_dirs')
        self.ckpts = osp.join(self.out, 'checkpoints')
        self.preds = osp.join(self.out, 'predictions')
        self.pretrained = osp.join(self.ckpts, 'pretrained_source.pth')
        self.merged = osp.join(self.ckpts, 'colora_merged.pth')
        self.start = time.time()
        self.results = {}       # phase -> dict(seconds=..., ...)
        self.commands = []
        self.step = 0
        self.num_steps = 0

    # ------------------------------------------------------------ running tools
    def tool(self, name: str, script: str, argv: list) -> float:
        """Run ``tools/<script>`` in its own process, output to ``logs/<name>.log``;
        returns its wall time; raises RuntimeError with the log's tail on failure."""
        cmd = [sys.executable, osp.join('tools', script)] + [str(a) for a in argv]
        line = ' '.join(shlex.quote(c) for c in cmd)
        self.commands.append(line)
        log = osp.join(self.logs, f'{name}.log')
        t0 = time.time()
        with open(log, 'w') as f:
            f.write('$ ' + line + '\n')
        rc = self.launcher.run(osp.join('tools', script), cmd[2:], log)
        seconds = time.time() - t0
        if rc != 0:
            with open(log) as f:
                tail = f.readlines()[-25:]
            raise RuntimeError(f'{name}: tools/{script} exited with status {rc} '
                               f'(log {log}); last lines:\n' + ''.join(tail))
        return seconds

    def say(self, what: str, seconds: float, detail: str = '') -> None:
        self.step += 1
        total = time.time() - self.start
        line = (f'[{self.step:2d}/{self.num_steps}] {what:<52s} {seconds:6.1f} s'
                f'   (elapsed {total:5.0f} s)')
        if detail:
            line += f'  {detail}'
        print(line, flush=True)

    # ------------------------------------------------------------ phases
    def make_data(self) -> None:
        make_demo_data = _demo_modules()[0].make_demo_data
        t0 = time.time()
        if osp.isdir(self.data):
            shutil.rmtree(self.data)
        b = self.budget
        make_demo_data(self.data, num_train=b.num_train, num_val=b.num_val, size=64,
                       seed=self.seed)
        self.commands.append(
            f'{shlex.quote(sys.executable)} -c "from colora_mm.demo.data import '
            f"make_demo_data; make_demo_data('{self.data}', num_train={b.num_train}, "
            f'num_val={b.num_val}, size=64, seed={self.seed})"')
        self.say(f'data: 2 domains x {b.num_train} train / {b.num_val} val, 64x64',
                 time.time() - t0, f'-> {_show(self.data)}')

    def seed_options(self) -> list:
        return [f'randomness.seed={self.seed}']

    def finetune_options(self) -> list:
        b = self.budget
        return (schedule_options(b.finetune_iters, b.finetune_warmup, b.batch_size)
                + self.seed_options()
                + [f'train_dataloader.dataset.data_root={self.target}',
                   f'test_dataloader.dataset.data_root={self.target}',
                   f'model.backbone.init_cfg.checkpoint={self.pretrained}',
                   f'model.decode_head.init_cfg.checkpoint={self.pretrained}',
                   f'model.auxiliary_head.init_cfg.checkpoint={self.pretrained}'])

    def pretrain(self):
        b = self.budget
        work = osp.join(self.work, 'pretrain_full_source')
        seconds = self.tool('pretrain_full_source', 'train.py', [
            PRETRAIN_CONFIG, '--work-dir', work, '--cfg-options',
            *schedule_options(b.pretrain_iters, b.pretrain_warmup, b.batch_size),
            *self.seed_options(),
            f'train_dataloader.dataset.data_root={self.source}',
            f'test_dataloader.dataset.data_root={self.target}'])
        last = osp.join(work, f'iter_{b.pretrain_iters}.pth')
        shutil.copyfile(last, self.pretrained)
        self.commands.append(f'cp {shlex.quote(last)} {shlex.quote(self.pretrained)}')
        self.results['pretrain'] = dict(seconds=seconds, work_dir=work)
        return f'pretrain on source (full, {b.pretrain_iters} iterations)', seconds

    def finetune(self, key: str, config: str):
        b = self.budget
        work = osp.join(self.work, f'finetune_{key}_target')
        seconds = self.tool(f'finetune_{key}_target', 'train.py', [
            config, '--work-dir', work, '--cfg-options', *self.finetune_options()])
        self.results[f'train_{key}'] = dict(
            seconds=seconds, work_dir=work,
            checkpoint=osp.join(work, f'iter_{b.finetune_iters}.pth'))
        return f'fine-tune on target: {key} ({b.finetune_iters} iterations)', seconds

    def test(self, key: str, config: str, checkpoint: str, data_root: str,
             predictions: bool = False):
        work = osp.join(self.work, f'test_{key}')
        argv = [config, checkpoint, '--work-dir', work]
        if predictions:
            argv += ['--out', osp.join(self.preds, key)]
        argv += ['--cfg-options', f'test_dataloader.dataset.data_root={data_root}']
        seconds = self.tool(f'test_{key}', 'test.py', argv)
        miou = _demo_modules()[1].read_miou(work)
        self.results[f'test_{key}'] = dict(seconds=seconds, miou=miou)
        domain = 'source' if data_root == self.source else 'target'
        return f'test {key} on {domain} val', seconds, f'mIoU {miou:.2f}'

    def merge(self):
        train = self.results['train_colora']
        config = osp.join(CONFIGS, 'finetune_colora_target.py')
        seconds = self.tool('merge_colora', 'merge.py', [
            config, train['checkpoint'], self.merged, '--shape', '64',
            '--cfg-options', *self.finetune_options()])
        with open(osp.join(self.logs, 'merge_colora.log')) as f:
            text = f.read()
        diff = next((line.split('=')[1].split()[0] for line in text.splitlines()
                     if line.startswith('max |merged - unmerged|')), '?')
        self.results['merge'] = dict(seconds=seconds, max_abs_difference=diff)
        return 'merge CoLoRA (tools/merge.py)', seconds, f'max |diff| {diff}'

    # ------------------------------------------------------------ orchestration
    def plan(self):
        """Tasks as ``name -> (dependencies, callable)``; with several jobs, the first
        ready task in this order starts next (the long trainings first)."""
        tasks = {'pretrain': ((), self.pretrain), 'counts': ((), self.count_parameters)}
        for key, _, config in reversed(METHODS):
            tasks[f'train_{key}'] = (('pretrain', ),
                                     lambda k=key, c=config: self.finetune(k, c))
        tasks['merge'] = (('train_colora', ), self.merge)
        tasks['test_pretrained'] = (('pretrain', ), lambda: self.test(
            'pretrained', PRETRAIN_CONFIG, self.pretrained, self.target,
            predictions=True))
        for key, _, config in reversed(METHODS):
            tasks[f'test_{key}'] = ((f'train_{key}', ), lambda k=key, c=config: self.test(
                k, c, self.results[f'train_{k}']['checkpoint'], self.target))
            if key == 'colora':
                tasks['test_colora_merged'] = (('merge', ), lambda: self.test(
                    'colora_merged', osp.splitext(self.merged)[0] + '.py', self.merged,
                    self.target, predictions=True))
        if not self.quick:
            tasks['test_pretrained_source'] = (('pretrain', ), lambda: self.test(
                'pretrained_source', PRETRAIN_CONFIG, self.pretrained, self.source))
        return tasks

    def run_tasks(self, tasks) -> None:
        """Run ``tasks`` (``name -> (dependencies, callable)``), ``self.jobs`` at a time,
        in worker threads that each wait for one tool process."""
        done, running = set(), {}
        pending = list(tasks)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            while pending or running:
                for name in list(pending):
                    if len(running) >= self.jobs:
                        break
                    deps, fn = tasks[name]
                    if all(d in done for d in deps):
                        pending.remove(name)
                        running[pool.submit(fn)] = name
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    self.say(*future.result())
                    done.add(name)

    def count_parameters(self):
        """Trainable and total parameters of every config's model, counted in a tool
        process (``colora_mm.demo.report.write_parameter_counts``)."""
        path = osp.join(self.work, 'parameter_counts.json')
        configs = {'pretrain': PRETRAIN_CONFIG}
        configs.update({key: config for key, _, config in METHODS})
        t0 = time.time()
        log = osp.join(self.logs, 'parameter_counts.log')
        rc = self.launcher.run('colora_mm.demo.report:write_parameter_counts',
                               [path, configs], log)
        if rc != 0:
            raise RuntimeError(f'counting parameters failed (log {log})')
        with open(path) as f:
            self.results['counts'] = json.load(f)
        return f'count parameters of the {len(configs)} models', time.time() - t0

    def report(self) -> None:
        report = _demo_modules()[1]
        Row, format_console = report.Row, report.format_console
        prediction_figure, write_results = report.prediction_figure, report.write_results
        read_seconds_per_iter = report.read_seconds_per_iter
        t0 = time.time()
        rows = []
        pre = self.results['counts']['pretrain']
        rows.append(Row('pretrained on source only', 0, pre['backbone_plain'],
                        self.results['test_pretrained']['miou']))
        heads = None
        for key, label, config in METHODS:
            counts = self.results['counts'][key]
            heads = counts['trainable_heads']
            train = self.results[f'train_{key}']
            rows.append(Row(label, counts['trainable_backbone'], counts['backbone_plain'],
                            self.results[f'test_{key}']['miou'], train['seconds'],
                            read_seconds_per_iter(train['work_dir'])))
        rows.append(Row('CoLoRA merged (tools/merge.py)', None, None,
                        self.results['test_colora_merged']['miou']))
        figure = prediction_figure(
            osp.join(self.out, 'predictions.png'), self.target, {
                f'pretrained only\nmIoU {rows[0].miou:.2f}':
                    osp.join(self.preds, 'pretrained'),
                f'CoLoRA, merged\nmIoU {rows[-1].miou:.2f}':
                    osp.join(self.preds, 'colora_merged')})
        b = self.budget
        source = self.results.get('test_pretrained_source')
        source_note = f' (source val mIoU {source["miou"]:.2f})' if source else ''
        header = (f'# colora_mm demo results\n\n'
                  f'`python tools/demo.py --seed {self.seed}'
                  f'{" --quick" if self.quick else ""}`: UperNet + CoLoRAConvNeXt '
                  f'(depths 1-1-2-1, channels 16-128), pretrained on the source domain '
                  f'for {b.pretrain_iters} iterations{source_note}, then fine-tuned on '
                  f'the target domain for {b.finetune_iters} iterations of '
                  f'{b.batch_size} images (each run on {self.threads} CPU thread'
                  f'{"s" if self.threads > 1 else ""}, {self.jobs} at a time); mIoU on '
                  f'the {b.num_val} target validation images.')
        footer = (f'Trainable backbone parameters: adapters + every bias and norm for '
                  f'LoRA and CoLoRA, everything for full fine-tuning; % of the '
                  f'{pre["backbone_plain"]:,} parameters of the plain backbone. The '
                  f'UperNet and auxiliary heads ({heads:,} parameters) train in every '
                  f'method. Training time: wall time of the `tools/train.py` run (model '
                  f'build, weight loading, training, checkpoint), ms/iter from its log. '
                  f'CoLoRA merged: '
                  f'max |merged - unmerged| feature difference '
                  f'{self.results["merge"]["max_abs_difference"]}; the ConvNeXt spatial '
                  f'branches stay unfolded (they are cross-channel, the 7x7 conv is '
                  f'depthwise).')
        md = write_results(self.out, rows, header, footer)
        with open(osp.join(self.out, 'commands.sh'), 'w') as f:
            f.write(f'#!/bin/bash\n# The steps of this demo run, in the order they '
                    f'started.\nset -e\ncd {shlex.quote(REPO)}\nexport OMP_NUM_THREADS='
                    f'{self.threads} MKL_NUM_THREADS={self.threads}\n'
                    + '\n'.join(self.commands) + '\n')
        self.say('table and figure', time.time() - t0)
        print()
        print(format_console(rows))
        print()
        if source:
            print(f'the pretrained model on its own (source) domain: val mIoU '
                  f'{source["miou"]:.2f}')
        print(f'wrote {_show(md)}, {_show(figure)}; tool logs in {_show(self.logs)}/, '
              f'commands in {_show(osp.join(self.out, "commands.sh"))}')
        print(f'total {time.time() - self.start:.0f} s')

    def run(self) -> int:
        claim_output_folder(self.out)
        for folder in (self.work, self.preds, self.logs, self.ckpts):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        tasks = self.plan()
        self.num_steps = len(tasks) + 2
        methods = ', '.join(label for _, label, _ in METHODS)
        print(f'colora_mm demo: pretrain a small ConvNeXt on one synthetic domain, adapt '
              f'it to another with {methods} (seed {self.seed}'
              f'{", quick" if self.quick else ""}, {self.jobs} job'
              f'{"s" if self.jobs > 1 else ""}); output in {_show(self.out)}/',
              flush=True)
        self.make_data()
        try:
            self.run_tasks(tasks)
        except RuntimeError as err:
            print(f'error: {err}', file=sys.stderr)
            return 1
        self.report()
        return 0


#: Written into every output folder the demo creates; the demo only ever clears (its own
#: sub-folders of) a folder that carries it.
MARKER = '.colora_mm_demo'


def check_output_folder(out: str) -> None:
    """Refuse an ``--out`` the demo did not create: it exists and is not empty, and
    carries no :data:`MARKER`. Raises ValueError with the reason and the fix."""
    if not osp.lexists(out):
        return
    if not osp.isdir(out):
        raise ValueError(f'--out {out} exists and is not a folder; choose a new folder, '
                         'e.g. --out demo_out')
    if os.listdir(out) and not osp.isfile(osp.join(out, MARKER)):
        raise ValueError(f'--out {out} exists, is not empty and was not written by '
                         f'tools/demo.py (no {MARKER} in it); the demo replaces its '
                         'data, work_dirs, checkpoints, logs and predictions sub-folders, '
                         'so choose a new or empty folder, e.g. --out demo_out')


def claim_output_folder(out: str) -> None:
    """Create ``out`` (if needed) and mark it as the demo's."""
    os.makedirs(out, exist_ok=True)
    with open(osp.join(out, MARKER), 'w') as f:
        f.write('Output folder of tools/demo.py: a later run replaces its data, '
                'work_dirs, checkpoints, logs and predictions.\n')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='CoLoRA demo on a CPU: synthetic domains, pretrain, fine-tune '
        '(full, LoRA, CoLoRA), merge, test, table and figure')
    parser.add_argument('--out', default='demo_out',
                        help='output folder (data, checkpoints, logs, results); '
                        'default demo_out. It must be new, empty or an earlier demo '
                        'output (the demo marks its folders)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the data and of every training run; default 0')
    parser.add_argument('--quick', action='store_true',
                        help='a few images and iterations: checks the pipeline in '
                        'about a minute (numbers meaningless)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='tool processes run at once (default: the number of CPU '
                        'cores, at most 3)')
    parser.add_argument('--no-fork', action='store_true',
                        help='start every tool as `python tools/X.py ...` instead of '
                        'forking it from a process that imported the stack once')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads of each tool process (OMP_NUM_THREADS); '
                        'default: $OMP_NUM_THREADS, else 1')
    args = parser.parse_args(argv)
    for flag, value in (('--jobs', args.jobs), ('--threads', args.threads)):
        if value is not None and value < 1:
            parser.error(f'{flag} {value}: must be at least 1 (leave it out for the '
                         'default)')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_folder(osp.abspath(args.out))
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return Demo(args).run()


if __name__ == '__main__':
    sys.exit(main())

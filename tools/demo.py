"""The embedded CPU demo (``make demo``): CoLoRA adapting a small ConvNeXt to a new domain.

    python tools/demo.py [--out demo_out] [--seed 0] [--quick] [--jobs N] [--threads 1]

1. writes a synthetic two-domain segmentation dataset in the ADE20K layout
   (``colora_mm/demo/data.py``: flat-background shapes = source, textured backgrounds,
   smaller shapes and a rotated palette = target);
2. pretrains UperNet + ``CoLoRAConvNeXt`` (adapter method 'full', 5 blocks, 16-128
   channels) on the source domain with ``tools/train.py``;
3. fine-tunes it on the target domain with full fine-tuning, LoRA and CoLoRA under the
   same iteration budget (``configs/demo/finetune_*_target.py``, ``tools/train.py``);
4. merges the CoLoRA model with ``tools/merge.py``;
5. evaluates the pretrained model, the three fine-tuned ones and the merged one on the
   target validation split with ``tools/test.py``;
6. prints the table, writes ``OUT/results.md`` (and ``results.json``) and
   ``OUT/predictions.png`` (target images, ground truth, the pretrained model's and the
   merged CoLoRA model's predictions).

The tools run as separate processes, exactly as a user runs them; every command is
written to ``OUT/commands.sh`` and its output to ``OUT/logs/``. Independent runs (the
three fine-tunings, the tests) go in parallel, ``--jobs`` at a time, each on one torch
thread. The same ``--seed`` gives the same table (the times aside).
"""
import argparse
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
)


def _load_data_module():
    """``colora_mm/demo/data.py`` (numpy + PIL only), loaded by path: ``import
    colora_mm`` would first load the OpenMMLab stack, seconds before the first tool
    can start."""
    import importlib.util
    path = osp.join(REPO, 'colora_mm', 'demo', 'data.py')
    spec = importlib.util.spec_from_file_location('_colora_demo_data', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
        self.threads = args.threads
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
        returns its wall time, or exits with the log's tail on failure."""
        cmd = [sys.executable, osp.join('tools', script)] + [str(a) for a in argv]
        self.commands.append(' '.join(shlex.quote(c) for c in cmd))
        log = osp.join(self.logs, f'{name}.log')
        env = dict(os.environ, MPLBACKEND='Agg', PYTHONUNBUFFERED='1')
        # One thread per tool process: on a small, shared CPU, several processes each
        # spinning up all cores' worth of OpenMP threads run 10-30x slower.
        env.setdefault('OMP_NUM_THREADS', str(self.threads))
        env.setdefault('MKL_NUM_THREADS', env['OMP_NUM_THREADS'])
        t0 = time.time()
        with open(log, 'w') as f:
            f.write('$ ' + self.commands[-1] + '\n')
            f.flush()
            rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                 env=env)
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
        make_demo_data = _load_data_module().make_demo_data
        t0 = time.time()
        if osp.isdir(self.data):
            shutil.rmtree(self.data)
        b = self.budget
        make_demo_data(self.data, num_train=b.num_train, num_val=b.num_val, size=64,
                       seed=self.seed)
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
        shutil.copyfile(osp.join(work, f'iter_{b.pretrain_iters}.pth'), self.pretrained)
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
        from colora_mm.demo.report import read_miou
        miou = read_miou(work)
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
        tasks = {'pretrain': ((), self.pretrain)}
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

    def run_tasks(self, tasks, inline=None) -> None:
        """Run ``tasks`` (``name -> (dependencies, callable)``), ``self.jobs`` at a time,
        in worker threads that each wait for one tool process; ``inline`` (a callable)
        runs in this thread once the first tasks are started."""
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
                if inline is not None:
                    self.say(*inline())
                    inline = None
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    self.say(*future.result())
                    done.add(name)

    def count_parameters(self):
        """Parameter counts of every config's model, built in this process (while the
        first tool runs; the worker threads print nothing meanwhile); the builds'
        warnings and log lines go to ``logs/parameter_counts.log``."""
        import contextlib
        import warnings
        t0 = time.time()
        with open(osp.join(self.logs, 'parameter_counts.log'), 'w') as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from colora_mm.demo.report import count_parameters
            counts = {'pretrain': count_parameters(PRETRAIN_CONFIG)}
            for key, _, config in METHODS:
                counts[key] = count_parameters(config)
        self.results['counts'] = counts
        return 'count parameters of the 4 models', time.time() - t0

    def report(self) -> None:
        from colora_mm.demo.report import (Row, format_console, prediction_figure,
                                           read_seconds_per_iter, write_results)
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
                f'pretrained only\nmIoU {rows[0].miou:.1f}':
                    osp.join(self.preds, 'pretrained'),
                f'CoLoRA, merged\nmIoU {rows[-1].miou:.1f}':
                    osp.join(self.preds, 'colora_merged')})
        b = self.budget
        source = self.results.get('test_pretrained_source')
        source_note = f' (source val mIoU {source["miou"]:.2f})' if source else ''
        header = (f'# colora_mm demo results\n\n'
                  f'`python tools/demo.py --seed {self.seed}'
                  f'{" --quick" if self.quick else ""}`: UperNet + CoLoRAConvNeXt '
                  f'(depths 1-1-2-1, channels 16-128), pretrained on the source domain '
                  f'for {b.pretrain_iters} iterations{source_note}, then fine-tuned on the target domain for '
                  f'{b.finetune_iters} iterations of {b.batch_size} images; mIoU on '
                  f'the {b.num_val} target validation images.')
        footer = (f'Trainable backbone parameters: adapters + every bias and norm for '
                  f'LoRA and CoLoRA, everything for full fine-tuning; % of the '
                  f'{pre["backbone_plain"]:,} parameters of the plain backbone. The '
                  f'UperNet and auxiliary heads ({heads:,} parameters) train in every '
                  f'method. Training time: wall time of `tools/train.py` (start-up '
                  f'included), ms/iter from its log. CoLoRA merged: '
                  f'max |merged - unmerged| feature difference '
                  f'{self.results["merge"]["max_abs_difference"]}; the ConvNeXt spatial '
                  f'branches stay unfolded (they are cross-channel, the 7x7 conv is '
                  f'depthwise).')
        md = write_results(self.out, rows, header, footer)
        with open(osp.join(self.out, 'commands.sh'), 'w') as f:
            f.write('#!/bin/bash\n# The tool runs of this demo, in order (from the '
                    'repository root).\nset -e\n' + '\n'.join(self.commands) + '\n')
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
        for folder in (self.out, self.logs, self.ckpts, self.preds):
            os.makedirs(folder, exist_ok=True)
        for folder in (self.work, self.preds, self.logs, self.ckpts):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        tasks = self.plan()
        self.num_steps = len(tasks) + 3
        print(f'colora_mm demo: pretrain a small ConvNeXt on one synthetic domain, adapt '
              f'it to another with full fine-tuning, LoRA and CoLoRA (seed {self.seed}'
              f'{", quick" if self.quick else ""}, {self.jobs} job'
              f'{"s" if self.jobs > 1 else ""}); output in {_show(self.out)}/',
              flush=True)
        self.make_data()
        try:
            self.run_tasks(tasks, inline=self.count_parameters)
        except RuntimeError as err:
            print(f'error: {err}', file=sys.stderr)
            return 1
        self.report()
        return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='CoLoRA demo on a CPU: synthetic domains, pretrain, fine-tune '
        '(full, LoRA, CoLoRA), merge, test, table and figure')
    parser.add_argument('--out', default='demo_out',
                        help='output folder (data, checkpoints, logs, results); '
                        'default demo_out')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the data and of every training run; default 0')
    parser.add_argument('--quick', action='store_true',
                        help='a few images and iterations: checks the pipeline in '
                        'about a minute (numbers meaningless)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='tool processes run at once (default: the number of CPU '
                        'cores, at most 3)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads of each tool process (OMP_NUM_THREADS, '
                        'unless already set); default 1')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return Demo(parse_args(argv)).run()


if __name__ == '__main__':
    sys.exit(main())

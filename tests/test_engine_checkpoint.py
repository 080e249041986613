"""mmengine checkpoints of adapted models: ``load_from`` restores exactly the trained
model (partner buffers included), and ``resume`` continues a run to the same model an
uninterrupted run reaches (torch >= 2.6: colora_mm.compat). The runs carry both hooks:
the report at the start, a merge-and-reinit at iteration 3 (after the resume point)."""
import os.path as osp

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip('mmpretrain')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import is_adapter_name  # noqa: E402
from colora_mm.models import CoLoRAConvNeXt  # noqa: E402
from helpers_ckpt import REDUCED_CONVNEXT, convnext_original_checkpoint, save  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

MAX_ITERS = 4


class ToyClassifier(BaseModel):
    def __init__(self, pretrained, adapter=dict(method='colora')):
        super().__init__()
        self.backbone = CoLoRAConvNeXt(
            arch=REDUCED_CONVNEXT, adapter=adapter,
            init_cfg=dict(type='Pretrained', checkpoint=pretrained))
        self.head = nn.Linear(REDUCED_CONVNEXT['channels'][-1], 3)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.backbone(inputs)[-1])
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


class ToyData(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


def make_runner(work_dir, name, pretrained, **kwargs):
    from mmengine.runner import Runner
    torch.manual_seed(123)      # a different random start for every run
    return Runner(
        model=ToyClassifier(pretrained),
        work_dir=str(work_dir),
        experiment_name=name,
        train_dataloader=dict(dataset=ToyData(), batch_size=4, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.05)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2,
                                           by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='CoLoRAReportHook', input_size=(32, 32)),
                      dict(type='MergeReinitHook', interval=3)],
        randomness=dict(seed=0),
        **kwargs)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('colora_ckpt')
    pretrained = save(convnext_original_checkpoint(REDUCED_CONVNEXT, seed=0),
                      root / 'pretrained.pth')
    runner = make_runner(root / 'run', 'uninterrupted', pretrained)
    runner.train()
    model = runner.model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(root=root, pretrained=pretrained, state=state, model=model,
                work_dir=root / 'run')


def test_training_moved_partners_and_adapters(trained):
    """Sanity: the run trained (B != 0) and the 'effective' partners moved away from the
    pretrained weights, so restoring them is a real test."""
    state = trained['state']
    ckpt = torch.load(trained['pretrained'], weights_only=True)['model']
    pair = 'backbone.stages.0.0.pointwise_conv1.adapter_branch.pair.'
    assert torch.count_nonzero(state[pair + 'B1']) > 0
    # the partner is the base weight plus a stored low-rank offset, non-zero after
    # training (and after the fold, which records the folded part there)
    left, right = state[pair + 'partner_l2'], state[pair + 'partner_r2']
    assert left.shape[1] > 0 and torch.count_nonzero(left @ right) > 0
    base = trained['model'].backbone.stages[0][0].pointwise_conv2.weight
    partner = base.detach().t() + left @ right
    assert not torch.allclose(partner, ckpt['stages.0.0.pwconv2.weight'].t())
    logs = ''.join(p.read_text() for p in trained['work_dir'].glob('**/*.log'))
    assert 'CoLoRA report' in logs and 'backbone adapters' in logs
    assert 'MergeReinitHook: iter 3: folded and re-initialised' in logs


def test_load_from_restores_the_trained_model_exactly(trained):
    from mmengine.runner import load_checkpoint
    torch.manual_seed(999)
    fresh = ToyClassifier(trained['pretrained'])
    fresh.init_weights()
    load_checkpoint(fresh, osp.join(trained['work_dir'], f'iter_{MAX_ITERS}.pth'),
                    map_location='cpu', strict=True)
    restored = fresh.state_dict()
    assert set(restored) == set(trained['state'])
    for key, value in trained['state'].items():
        assert torch.equal(restored[key], value), key
    assert any('partner_l' in k for k in restored if is_adapter_name(k))
    x = torch.randn(2, 3, 32, 32)
    fresh.eval()
    trained['model'].eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained['model'](x))


def test_resume_reaches_the_uninterrupted_model(trained):
    runner = make_runner(trained['root'] / 'resumed', 'resumed', trained['pretrained'],
                         resume=True,
                         load_from=osp.join(trained['work_dir'], 'iter_2.pth'))
    runner.train()
    assert runner.iter == MAX_ITERS
    resumed = runner.model.state_dict()
    for key, value in trained['state'].items():
        assert torch.equal(resumed[key], value), key

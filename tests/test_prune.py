"Pruning diffusers UNets end to end: prune, sample, save, reload, compare (CPU, offline)."
import json, copy
import pytest, torch
from diffusers import UNet2DModel, UNet2DConditionModel, DDPMScheduler, DDIMPipeline, DDIMScheduler
from diffprune.models import load_model, save_model, tiny_unet, CIFAR10_CONFIG
from diffprune.diffusion import ddim_sample
from diffprune.importance import ScoredModel, importance_criterion, score_model
from diffprune.prune import prune_model
from diffprune.unet import kept_channels, UNetPruner
from diffprune.sizes import example_inputs, count_macs

SCHED = DDPMScheduler(num_train_timesteps=1000)

def magnitude(u): return ScoredModel(u, SCHED, 'magnitude', importance_criterion('magnitude'))

def tiny_cond():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
                                cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8)

def roundtrip(res, tmp_path):
    "Save, reload, and check outputs are bit-identical; returns the reloaded UNet."
    res.save(tmp_path/'m')
    u2, s2 = load_model(tmp_path/'m')
    x = example_inputs(u2, 2)
    with torch.no_grad(): assert torch.equal(u2(**x).sample, res.denoiser(**x).sample)
    return u2, s2

def test_digits_teacher_diff_pruning_prunes_samples_and_reloads_identically(tmp_path):
    res = prune_model(score_model('digits', method='diff-pruning', stride=20, calibration_size=16, progress=False), target_macs=0.5)
    assert res.params_after < res.params_before and abs(res.macs_after / res.macs_before - 0.5) < 0.03
    u2, s2 = roundtrip(res, tmp_path)
    a = ddim_sample(res.denoiser, res.scheduler, 4, steps=5, seed=3, progress=False)
    b = ddim_sample(u2, s2, 4, steps=5, seed=3, progress=False)
    assert torch.equal(a, b)
    # the reloaded model works inside diffusers' own pipeline
    pipe = DDIMPipeline(unet=u2, scheduler=DDIMScheduler.from_config(s2.config))
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type='np').images
    assert out.shape == (2, 16, 16, 1)

def test_multihead_attention_is_pruned_per_head_and_reloads(tmp_path):
    u = tiny_unet(head_dim=8)
    heads = {n: m.heads for n, m in u.named_modules() if type(m).__name__ == 'Attention'}
    res = prune_model(magnitude(u), pruning_ratio=0.5)
    for n, m in res.denoiser.named_modules():
        if n in heads:
            assert m.heads == heads[n] and m.to_q.out_features % m.heads == 0 and m.to_q.out_features < 32
    roundtrip(res, tmp_path)

def test_cifar10_config_target_macs_within_3_percent_and_reloads(tmp_path):
    torch.manual_seed(0)
    res = prune_model(magnitude(UNet2DModel(**CIFAR10_CONFIG)), target_macs=0.56)
    assert abs(res.macs_after / res.macs_before - 0.56) <= 0.03 * 0.56
    assert res.macs_after == count_macs(res.denoiser)
    roundtrip(res, tmp_path)

def test_conditional_unet_keeps_cross_attention_inputs_and_reloads(tmp_path):
    res = prune_model(magnitude(tiny_cond()), pruning_ratio=0.3)
    for m in res.denoiser.modules():
        if type(m).__name__ == 'Attention' and m.is_cross_attention: assert m.to_k.in_features == 24 and m.to_v.in_features == 24
    assert res.macs_after < res.macs_before
    roundtrip(res, tmp_path)

def test_same_seed_keeps_the_same_channels():
    a = kept_channels(score_model('digits', stride=25, calibration_size=8, seed=4, progress=False), pruning_ratio=0.3)
    b = kept_channels(score_model('digits', stride=25, calibration_size=8, seed=4, progress=False), pruning_ratio=0.3)
    assert a == b

@pytest.mark.parametrize('method', ['random', 'magnitude', 'taylor'])
def test_baselines_prune_to_the_same_target(method):
    imp = score_model('digits', method=method, stride=50, calibration_size=8, progress=False)
    res = prune_model(imp, target_macs=0.5)
    assert abs(res.macs_after / res.macs_before - 0.5) < 0.03

def test_unreachable_target_and_bad_ratio_are_value_errors():
    imp = magnitude(tiny_unet())
    with pytest.raises(ValueError, match='no pruning ratio reaches'): prune_model(imp, target_macs=0.0001)
    with pytest.raises(ValueError, match='ratio'): prune_model(imp, pruning_ratio=1.0)

def test_model_with_nothing_prunable_is_refused():
    u = tiny_unet()
    ignored = [m for m in u.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with pytest.raises(ValueError, match='nothing prunable'): UNetPruner(u, importance_criterion('magnitude'), ignored=ignored)

def test_default_round_to_rounds_macs_targets_on_the_cpu_and_leaves_ratios_free():
    "round_to='auto': a MACs target gets widths in multiples of 8 on a CPU; a small pruning ratio still prunes."
    scored = score_model('digits', method='magnitude', progress=False)
    by_macs = prune_model(scored, target_macs=0.5)
    assert by_macs.round_to == 8 and abs(by_macs.macs_after / by_macs.macs_before - 0.5) < 0.03
    assert all(o % 8 == 0 for n, (i, o) in by_macs.widths_after.items() if n != 'conv_out')
    by_ratio = prune_model(scored, pruning_ratio=0.1)  # rounding would leave a small ratio little or nothing to remove
    assert by_ratio.round_to is None and by_ratio.params_after < by_ratio.params_before
    # one pruner gives the same plan for a target before and after a ratio's plan (the any-width fallback does not stick)
    with scored.gradients_on():
        pr = UNetPruner(scored.denoiser, scored.criterion)
        first = pr.plan_for_macs(0.5)
        pr.ratio_plan(0.1)
        assert pr.round_to is None and pr.plan_for_macs(0.5) == first and pr.round_to == 8
    with pytest.raises(ValueError, match='round_to'): prune_model(scored, target_macs=0.5, round_to=True)

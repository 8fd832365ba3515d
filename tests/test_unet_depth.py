"UNet depth (04e): the units a UNet can lose, plans that remove them, folders that keep them removed, bad input."
import copy, json
import pytest, torch
from diffusers import DDPMScheduler, UNet2DModel, UNet2DConditionModel
from diffprune.checks import InputError
from diffprune.importance import ScoredModel, importance_criterion, score_model
from diffprune.models import is_pruned, load_model, unet_config
from diffprune.prune import prune_model
from diffprune.sizes import example_inputs
from diffprune.unet_depth import depth_units, remove_units, named_units, unit_scores

def magnitude(u): return ScoredModel(u, DDPMScheduler(num_train_timesteps=1000), 'magnitude',
                                     importance_criterion('magnitude'))

def cifar_like(seed=0):
    "The CIFAR-10 UNet's anatomy (four levels of two ResNets, attention at level 1) at a CPU test's size."
    torch.manual_seed(seed)
    return UNet2DModel(**unet_config(16, 1, (16, 32, 32, 32), (False, True, False, False), layers_per_block=2,
                                     norm_groups=8))

def sd_unet(seed=0):
    "A tiny Stable-Diffusion-shaped UNet: two levels of two ResNets, cross-attention on the second."
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=24,
                                attention_head_dim=8, norm_num_groups=8)

def runs(unet) -> bool:
    x = example_inputs(unet, 2)
    with torch.no_grad(): return unet(**x).sample.shape == x['sample'].shape

def width_pruned():
    "A free-form width-pruned UNet: its up ResNets' widths are uneven, so fewer of them can go."
    return prune_model(magnitude(cifar_like()), target_macs=0.4, round_to=1).denoiser

@pytest.mark.parametrize('make', [cifar_like, sd_unet, width_pruned])
def test_every_unit_can_go_alone_or_all_together_and_the_unet_runs(make):
    unet = make()
    units = depth_units(unet)
    assert [u.kind for u in units].count('mid') == 1 and len(units) >= 2
    for u in units: assert runs(remove_units(copy.deepcopy(unet), [u])), u.name
    assert runs(remove_units(copy.deepcopy(unet), units))

def test_a_free_form_depth_folder_loads_bit_for_bit_and_prunes_again(tmp_path):
    "The record of the layers kept composes over two prunings and rebuilds the model from the teacher's config."
    first = prune_model(magnitude(cifar_like()), remove_units=['down_blocks.2.1+up_blocks.1.1'])
    assert is_pruned(first.denoiser) and first.units_removed == ['down_blocks.2.1+up_blocks.1.1']
    again = prune_model(magnitude(first.denoiser), remove_units=['down_blocks.2.0+up_blocks.1.0', 'mid_block'])
    kept = again.denoiser.config['_diffprune_kept_layers']
    assert kept['down_blocks.2.resnets'] == [] and kept['up_blocks.1.resnets'] == [2] and kept['mid_block'] is None
    again.save(tmp_path/'m')
    loaded, _ = load_model(tmp_path/'m')
    x = example_inputs(loaded, 2)
    with torch.no_grad(): assert torch.equal(loaded(**x).sample, again.denoiser(**x).sample)
    assert json.loads((tmp_path/'m'/'result.json').read_text())['units_removed'] == again.units_removed
    assert 'units_removed' in (tmp_path/'m'/'README.md').read_text()

def test_the_diffusers_layout_counts_the_units_in_a_plain_config():
    sd = sd_unet()
    res = prune_model(magnitude(sd), remove_units=['down_blocks.1.1+up_blocks.0.1', 'mid_block'], layout='diffusers')
    c = res.denoiser.config
    assert (list(c.layers_per_block), c.mid_block_type, is_pruned(res.denoiser)) == ([2, 1], None, False)
    fresh = UNet2DConditionModel.from_config(c)  # the config alone builds every layer the pruned model has
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fresh) == shapes(res.denoiser)
    both = prune_model(magnitude(sd), target_macs=0.6, removes='both', layout='diffusers')  # depth, then widths
    assert both.units_removed and both.macs_after / both.macs_before <= 0.6 and not is_pruned(both.denoiser)
    deep = prune_model(magnitude(sd), pruning_ratio=0.9, removes='depth', layout='diffusers')  # never a level emptied
    assert deep.denoiser.config.layers_per_block == 1 and len(deep.units_removed) == 3 and not is_pruned(deep.denoiser)
    free = prune_model(magnitude(sd), remove_units=['mid_block'])  # free-form: it records what it lost
    assert type(free.denoiser).__name__ == 'PrunedUNet2DConditionModel'
    with pytest.raises(InputError, match='no diffusers config'):
        prune_model(magnitude(free.denoiser), remove_units=['down_blocks.1.1+up_blocks.0.1'], layout='diffusers')
    with pytest.raises(InputError, match='one layers_per_block for all its levels'):  # a UNet2DModel's one number
        prune_model(magnitude(cifar_like()), remove_units=['mid_block', 'down_blocks.2.1+up_blocks.1.1'],
                    layout='diffusers')

def test_targets_are_met_from_below_with_the_lowest_scored_units_first():
    imp = score_model('digits', 'digits', 'taylor', calibration_size=8, stride=100, progress=False)
    units = depth_units(imp.denoiser)
    order = [units[i].name for i in unit_scores(imp.denoiser, units, 'taylor', imp.gradients).argsort()]
    d = prune_model(imp, target_macs=0.95, removes='depth')
    assert d.units_removed == order[:len(d.units_removed)] and d.macs_after / d.macs_before <= 0.95
    both = prune_model(imp, target_macs=0.5, removes='both')
    assert 0.45 < both.macs_after / both.macs_before <= 0.5 and both.units_removed
    assert prune_model(imp, pruning_ratio=0.5, removes='depth').units_removed == order[:1]
    with pytest.raises(InputError, match='cannot go below 90%'): prune_model(imp, target_macs=0.8, removes='depth')
    # chosen units with a width target: the width that stays is pruned to it
    chosen = prune_model(imp, remove_units=['mid_block'], target_macs=0.6, removes='both')
    assert chosen.units_removed == ['mid_block'] and 0.55 < chosen.macs_after / chosen.macs_before <= 0.6

def test_bad_choices_get_one_line_that_says_what_to_change(cli, tmp_path):
    digits = magnitude(load_model('digits')[0])
    with pytest.raises(InputError, match="no unit 'down_blocks.9.0'.*its units are"):
        prune_model(digits, remove_units=['down_blocks.9.0'])
    with pytest.raises(InputError, match='level 0 of this UNet has none'): named_units(digits.denoiser, 'bk-sdm-small')
    with pytest.raises(InputError, match='named twice'): prune_model(digits, remove_units=['mid_block', 'mid_block'])
    with pytest.raises(InputError, match='is a preset: give it alone'):
        prune_model(digits, remove_units=['bk-sdm-base', 'mid_block'])
    with pytest.raises(InputError, match='as strings'): prune_model(digits, remove_units=3)
    from diffprune.prune import check_prune  # refused before any scoring: a choice no config counts
    with pytest.raises(InputError, match='free-form'):
        check_prune(digits.denoiser, 'width', 'diffusers', remove_units=['down_blocks.2.0+up_blocks.0.0'])
    with pytest.raises(InputError, match='not both'):
        prune_model(digits, remove_units=['mid_block'], keep_blocks=[0])
    with pytest.raises(InputError, match='free-form'):  # a level left with no ResNet: no config counts it
        prune_model(digits, remove_units=['down_blocks.2.0+up_blocks.0.0'], layout='diffusers')
    with pytest.raises(InputError, match='cannot be chosen by name'):
        prune_model(ScoredModel(*load_model('digits-dit'), 'magnitude', importance_criterion('magnitude')),
                    remove_units=['mid_block'])
    r = cli('prune', '--method', 'magnitude', '--remove-units', 'mid_block', '--target-macs', '0.5',
            '--out', tmp_path/'a')
    assert r.returncode == 2 and '--remove-units is the plan' in r.stderr and not (tmp_path/'a').exists()
    r = cli('prune', '--method', 'magnitude', '--remove-units', 'nope', '--out', tmp_path/'b')
    assert r.returncode == 2 and "no unit 'nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path/'b').exists()

def test_the_cli_prunes_a_unet_by_depth_and_finetunes_it(cli, tmp_path):
    r = cli('prune', '--method', 'magnitude', '--removes', 'depth', '--target-macs', '0.95', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    assert 'removed ' in r.stdout and 'mid_block' in r.stdout
    r = cli('finetune', '--model', tmp_path/'p', '--steps', '2', '--batch-size', '4', '--out', tmp_path/'f')
    assert r.returncode == 0, r.stderr
    assert depth_units(load_model(tmp_path/'f')[0]) == []  # both units stayed removed through the finetune

"""Issue #17, part 2: `layout='diffusers'` prunes to a plain diffusers config, which loads where diffprune is not
installed, bit for bit as `load_model` loads it."""
import json, subprocess, sys
import pytest, torch
from diffusers import DDPMScheduler, UNet2DModel, UNet2DConditionModel
from diffusers.models.activations import GEGLU
from safetensors.torch import load_file
from diffprune.importance import ScoredModel, importance_criterion
from diffprune.latent import tiny_latent_pipeline, prune_pipeline, save_pipeline
from diffprune.models import CIFAR10_CONFIG, load_model, is_pruned
from diffprune.prune import prune_model

def magnitude(unet): return ScoredModel(unet, DDPMScheduler(num_train_timesteps=1000), 'magnitude',
                                        importance_criterion('magnitude'))

def inputs(unet):
    "A fixed batch of 2 at timesteps 3 and 500, with text-like conditioning for a conditional UNet."
    c, g = unet.config, torch.Generator().manual_seed(0)
    d = dict(sample=torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g),
             timestep=torch.tensor([3, 500]))
    if isinstance(unet, UNet2DConditionModel):
        d['encoder_hidden_states'] = torch.randn(2, 4, c.cross_attention_dim, generator=g)
    return d

# a fresh interpreter (-I: no user site, no PYTHON* variables) in which `import diffprune` fails, as if not installed
ISOLATED = """
import sys, json; sys.modules['diffprune'] = None
import torch, diffusers
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
args = sys.argv[1:]  # folder, pipeline class, output prefix; repeated (one interpreter, one import of torch)
for folder, pipeline_class, out in zip(args[::3], args[1::3], args[2::3]):
    for name, cls in (('auto', DiffusionPipeline), ('own', getattr(diffusers, pipeline_class))):
        pipe = cls.from_pretrained(folder)
        assert type(pipe).__module__.startswith('diffusers.') and type(pipe.unet).__module__.startswith('diffusers.')
        g = torch.Generator().manual_seed(0)
        c = pipe.unet.config
        kw = dict(sample=torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g),
                  timestep=torch.tensor([3, 500]))
        if 'cross_attention_dim' in c:
            kw['encoder_hidden_states'] = torch.randn(2, 4, c.cross_attention_dim, generator=g)
        with torch.no_grad(): save_file({'sample': pipe.unet(**kw).sample}, f'{out}-{name}.safetensors')
print(json.dumps(sorted(m for m, v in sys.modules.items() if m.startswith('diffprune') and v is not None)))
"""

def load_without_diffprune(*loads) -> list:
    """For each `(folder, pipeline_class, out)`: the outputs of the folder's UNet loaded by `DiffusionPipeline` and by
    `pipeline_class`, in one interpreter where diffprune cannot be imported."""
    r = subprocess.run([sys.executable, '-I', '-c', ISOLATED, *(str(a) for load in loads for a in load)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []  # nothing of diffprune was imported
    return [[load_file(f'{out}-{n}.safetensors')['sample'] for n in ('auto', 'own')] for _, _, out in loads]

def assert_plain(unet, cls):
    "`unet` is exactly `cls(**its config)`: the class itself, every layer's shape as the config builds it."
    assert type(unet) is cls and not is_pruned(unet)
    fresh = cls.from_config(unet.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}

def test_the_diffusers_layout_is_a_plain_config_that_loads_without_diffprune(cli, tmp_path):
    "The digits teacher by Diff-Pruning (CLI, MACs target), the CIFAR-10 UNet by width and depth, a tiny SD pipeline."
    r = cli('prune', '--layout', 'diffusers', '--target-macs', '0.5', '--calibration-size', '8', '--stride', '100',
            '--out', tmp_path/'digits')
    assert r.returncode == 0, r.stderr
    assert 'diffusers layout: block_out_channels [' in r.stdout and 'a plain UNet2DModel' in r.stdout
    assert json.loads((tmp_path/'digits'/'result.json').read_text())['layout'] == 'diffusers'
    torch.manual_seed(0)
    shaped = dict(CIFAR10_CONFIG, block_out_channels=(32, 64, 64, 64), norm_num_groups=8)  # its anatomy, CPU-sized
    cifar = prune_model(magnitude(UNet2DModel(**shaped)), target_macs=0.5, layout='diffusers')
    assert_plain(cifar.denoiser, UNet2DModel)
    assert cifar.macs_after / cifar.macs_before <= 0.5 and cifar.denoiser.config.block_out_channels[0] < 32
    cifar.save(tmp_path/'cifar10')
    torch.manual_seed(0)  # depth: BK-SDM-Small's blocks gone, a plain config (`layers_per_block` 1, no mid-block)
    bk = prune_model(magnitude(UNet2DModel(**shaped)), remove_units='bk-sdm-small', layout='diffusers')
    assert_plain(bk.denoiser, UNet2DModel)
    bk.save(tmp_path/'bk')
    pipe = tiny_latent_pipeline('text', tokenizer_dir=tmp_path/'tok')
    sd, res, _ = prune_pipeline(pipe, calibration_size=4, stride=200, target_macs=0.6, calibration_steps=2,
                                prompts='a digit', progress=False, layout='diffusers')
    assert_plain(sd.unet, UNet2DConditionModel) and res.layout == 'diffusers'
    assert list(sd.unet.config.block_out_channels) != list(pipe.unet.config.block_out_channels)
    save_pipeline(sd, tmp_path/'sd')
    loads = (('digits', 'DDPMPipeline'), ('cifar10', 'DDPMPipeline'), ('bk', 'DDPMPipeline'),
             ('sd', 'StableDiffusionPipeline'))
    outputs = load_without_diffprune(*((tmp_path/name, cls, tmp_path/f'{name}-out') for name, cls in loads))
    for (name, cls), got_both in zip(loads, outputs):
        index = json.loads((tmp_path/name/'model_index.json').read_text())
        assert index['unet'][0] == 'diffusers', name
        if name == 'sd':
            from diffprune.latent import load_pipeline
            ref = load_pipeline(tmp_path/name).unet
        else: ref = load_model(tmp_path/name)[0]
        assert_plain(ref, type(ref))
        with torch.no_grad(): want = ref(**inputs(ref)).sample
        for got in got_both:
            assert torch.equal(got, want), name

def test_the_refitted_time_embedding_gives_the_teachers_at_every_timestep():
    "A narrower first level means fewer sinusoids; the fitted first time layer gives the old embedding back."
    teacher, sched = load_model('digits')
    res = prune_model(magnitude(teacher), pruning_ratio=0.25, layout='diffusers')
    u, t = res.denoiser, torch.arange(sched.config.num_train_timesteps)
    assert u.config.block_out_channels[0] < teacher.config.block_out_channels[0]
    with torch.no_grad(): got, want = (m.time_embedding(m.time_proj(t)) for m in (u, teacher))
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max())
    assert res.time_fit_error < 1e-4 and res.summary()['layout'] == 'diffusers'

def test_a_geglu_hidden_unit_goes_whole_value_and_gate():
    "Hidden unit j of a GEGLU is rows j and H + j of its projection: a plan removing n units removes n pairs."
    from diffprune.unet import UNetPruner
    unet = tiny_latent_pipeline('text').unet
    name = next(n for n, m in unet.named_modules() if isinstance(m, GEGLU))  # a feed-forward's `net.0`
    ff = unet.get_submodule(name[:-len('.0')])
    hidden = ff[2].in_features
    rows = {b: i for i, b in enumerate(ff[0].proj.bias.tolist())}  # a row by its bias (random, so each its own)
    assert len(rows) == 2 * hidden
    pr = UNetPruner(unet, importance_criterion('magnitude'))
    i = next(i for i, g in enumerate(pr.groups) if g.name == f'{name}.proj')
    assert (pr.groups[i].ch_groups, pr.groups[i].size) == (2, hidden)
    pr.apply({'groups': {i: 5}})
    kept = [rows[b] for b in ff[0].proj.bias.tolist()]
    assert ff[2].in_features == hidden - 5 and len(kept) == 2 * (hidden - 5)
    assert [j + hidden for j in kept[:hidden - 5]] == kept[hidden - 5:]  # the gate of each kept unit is its own

TINY_SD = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               norm_num_groups=8, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
               up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=32, attention_head_dim=8)

def tiny(**extra):
    from diffprune.models import unet_config
    return UNet2DModel(**{**unet_config(16, 1, (32, 64), (False, True), norm_groups=8, head_dim=8), **extra})

@pytest.mark.parametrize('make, says', [
    (lambda: tiny(time_embedding_type='fourier'), "refits the time embedding of sinusoids alone"),
    (lambda: UNet2DConditionModel(**TINY_SD, time_cond_proj_dim=16), "time_cond_proj_dim 16"),
    (lambda: UNet2DConditionModel(**{**TINY_SD, 'down_block_types': ('DownBlock2D', 'SimpleCrossAttnDownBlock2D'),
                                     'up_block_types': ('SimpleCrossAttnUpBlock2D', 'UpBlock2D'),
                                     'mid_block_type': 'UNetMidBlock2DSimpleCrossAttn'}),
     "cannot read the heads of a UNet2DConditionModel with SimpleCrossAttnDownBlock2D"),
])
def test_a_unet_no_diffusers_config_can_prune_is_refused_in_one_line(make, says):
    "A time embedding that is more than sinusoids, or heads a config field cannot say: refused, never approximated."
    with pytest.raises(ValueError, match=says) as e:
        prune_model(magnitude(make()), target_macs=0.5, layout='diffusers')
    assert len(str(e.value).splitlines()) == 1 and "layout='free-form'" in str(e.value)

@pytest.mark.parametrize('layout', ['free-form', 'diffusers'])
@pytest.mark.parametrize('make, says', [
    (lambda: tiny(class_embed_type='timestep'), "class_embed_type 'timestep'"),
    (lambda: UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), norm_num_groups=8,
                         layers_per_block=1, down_block_types=('SkipDownBlock2D', 'AttnSkipDownBlock2D'),
                         up_block_types=('AttnSkipUpBlock2D', 'SkipUpBlock2D'), attention_head_dim=8),
     'SkipDownBlock2D'),
])
def test_a_unet_diffprune_cannot_prune_is_refused_in_one_line_in_either_layout(make, says, layout):
    with pytest.raises(ValueError, match=says) as e: prune_model(magnitude(make()), target_macs=0.5, layout=layout)
    assert len(str(e.value).splitlines()) == 1

def test_models_that_look_unusual_still_give_a_plain_config():
    "Attention in the up blocks only, the attention's own GroupNorm groups, text_proj conditioning, a free-form input."
    up_only = tiny(add_attention=False, down_block_types=('DownBlock2D', 'DownBlock2D'))
    attn_groups = tiny(attn_norm_num_groups=32)
    ff = prune_model(magnitude(tiny()), target_macs=0.7).denoiser  # a PrunedUNet2DModel
    text_proj = UNet2DConditionModel(**TINY_SD, encoder_hid_dim=24, encoder_hid_dim_type='text_proj')
    for unet in (up_only, attn_groups, ff, text_proj):
        res = prune_model(magnitude(unet), target_macs=0.5, layout='diffusers')
        assert_plain(res.denoiser, UNet2DConditionModel if unet is text_proj else UNet2DModel)
        assert res.macs_after / res.macs_before <= 0.5
    assert res.denoiser.config.encoder_hid_dim == 24
    widths = prune_model(magnitude(attn_groups), target_macs=0.5, layout='diffusers').denoiser.config.block_out_channels
    assert widths[1] % 32 == 0  # the attention level: a multiple of the attention's 32 GroupNorm groups

def test_sdxl_time_ids_keep_their_freq_shift_and_a_poor_fit_is_said(caplog, cli, tmp_path):
    "The added time ids of SDXL share `freq_shift` with the time sinusoids, so it stays; a poor refit is a warning."
    unet = UNet2DConditionModel(**TINY_SD, addition_embed_type='text_time', addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=64)
    with caplog.at_level('WARNING', logger='diffprune'):
        res = prune_model(magnitude(unet), target_macs=0.5, layout='diffusers')
    ids = torch.tensor([[16., 16, 0, 0, 16, 16]]).flatten()
    with torch.no_grad(): assert torch.equal(res.denoiser.add_time_proj(ids), unet.add_time_proj(ids))
    assert res.denoiser.config.freq_shift == unet.config.freq_shift and res.time_fit_error > 0.01
    assert any('finetune before sampling' in r.getMessage() for r in caplog.records)
    r = cli('prune', '--method', 'magnitude', '--layout', 'diffusers', '--pruning-ratio', '0.5', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    assert "diffprune: layout='diffusers': the time embedding's first layer" in r.stderr

@pytest.mark.parametrize('args, says', [
    (['--layout', 'diffuser'], "invalid choice: 'diffuser'"),
    (['--layout', 'diffusers', '--target-macs', '0.01'], 'no diffusers config reaches 1% of the MACs'),
])
def test_bad_layout_input_exits_2_with_one_line(cli, tmp_path, args, says):
    base = ['prune', '--method', 'magnitude', '--out', tmp_path/'p']
    r = cli(*base, *(['--target-macs', '0.5'] if '--target-macs' not in args else []), *args)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path/'p').exists()

def test_run_and_demo_carry_the_layout_into_the_recipe():
    from diffprune.cli import parser, _settings, LAYOUTS
    from diffprune import prune
    assert LAYOUTS == prune.LAYOUTS  # the CLI names them without importing torch
    for cmd in (['run', '--out', 'x'], ['demo']):
        assert _settings(parser().parse_args([*cmd, '--layout', 'diffusers'])).layout == 'diffusers'
        assert _settings(parser().parse_args(cmd)).layout == 'free-form'

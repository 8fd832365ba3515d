"""Inputs real users bring, each a kind of fault found in the field: the model's objective, non-square sizes, chunked
time embeddings, the attention scale after pruning heads, frozen models, SDXL-style added conditioning, transformer
pipelines, data a method does not use, and the package's own files."""
import json, re
from pathlib import Path
from types import SimpleNamespace
import pytest, torch, torch.nn as nn
from diffusers import UNet2DModel, UNet2DConditionModel, DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffprune.checks import InputError
from diffprune.models import save_model, load_model, tiny_unet
from diffprune.diffusion import PREDICTION_TYPES, denoising_loss, ddim_sample, ddpm_sample, sample_shape
from diffprune.importance import score_model, ScoredModel, importance_criterion
from diffprune.prune import prune_model
from diffprune.unet import kept_channels
from diffprune.sizes import count_macs, example_inputs
from diffprune.finetuning import finetune
from diffprune.data import digits_split

ROOT = Path(__file__).resolve().parent.parent

def one_line_exit_2(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and 'Traceback' not in r.stderr, r.stderr

# 1. The scheduler's objective

class Oracle(nn.Module):
    "A denoiser that knows the one image `x` every sample comes from: its output is the exact target of `kind`."
    def __init__(self, x, scheduler, kind):
        super().__init__(); self.x, self.kind, self.T = x, kind, scheduler.config.num_train_timesteps
        self.abar = None if kind == 'flow_prediction' else scheduler.alphas_cumprod.float()
        self.w = nn.Parameter(torch.zeros(1))  # samplers find the device through the parameters
        self.config = SimpleNamespace(in_channels=x.shape[0], sample_size=tuple(x.shape[1:]))
    def forward(self, xt, t):
        if self.kind == 'flow_prediction':  # t is sigma * T: the velocity noise - x0 of the one line through x
            s = (t.float() / self.T).view(-1, 1, 1, 1)
            return (xt - (1 - s) * self.x) / s - self.x
        a = self.abar[t].view(-1, 1, 1, 1); eps = (xt - a.sqrt() * self.x) / (1 - a).sqrt()
        return {'epsilon': eps, 'sample': self.x.expand_as(xt), 'v_prediction': a.sqrt() * eps - (1 - a).sqrt() * self.x}[self.kind]

@pytest.mark.parametrize('kind', PREDICTION_TYPES)
def test_samplers_read_the_output_by_the_schedulers_prediction_type(kind):
    """An exact denoiser of each objective samples its image back, with DDIM and with DDPM (non-square here, 8x12); a
    flow model with Euler (DDIM's sampler for it), and DDPM's ancestral sampler refuses it."""
    x = torch.rand(1, 8, 12) * 2 - 1
    flow = kind == 'flow_prediction'
    sched = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0) if flow else
             DDPMScheduler(num_train_timesteps=100, prediction_type=kind))
    samples = [ddim_sample(Oracle(x, sched, kind), sched, 2, steps=10, progress=False)]
    if flow:
        with pytest.raises(InputError, match="DDPM's ancestral sampler"): ddpm_sample(Oracle(x, sched, kind), sched, 2)
    else: samples.append(ddpm_sample(Oracle(x, sched, kind), sched, 2, progress=False))
    for sample in samples:
        torch.testing.assert_close(sample, ((x + 1) / 2).expand(2, -1, -1, -1), atol=2e-3, rtol=0)

def test_v_prediction_loss_is_the_mse_to_diffusers_velocity():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type='v_prediction')
    u = tiny_unet(); x0 = digits_split('heldout')[0][:8]; noise = torch.randn_like(x0); t = torch.arange(8) * 120
    with torch.no_grad():
        out = u(sched.add_noise(x0, noise, t), t).sample
        torch.testing.assert_close(denoising_loss(u, sched, x0, noise, t), (out - sched.get_velocity(x0, noise, t)).pow(2).mean())

def test_finetuning_a_v_model_keeps_its_v_loss(tmp_path):
    "The field report: finetuning a v-prediction model toward the noise took its held-out v-loss from 0.17 to 0.93."
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type='v_prediction')
    v_model = finetune((tiny_unet(), sched), 'digits', steps=60, batch_size=32, lr=2e-3, seed=0, progress=False).raw
    x0 = digits_split('heldout')[0][:64]; noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2))
    held = lambda u: denoising_loss(u, sched, x0, noise, t).item()
    save_model(v_model, sched, tmp_path/'v')
    more = finetune(tmp_path/'v', 'digits', steps=40, batch_size=32, lr=2e-4, seed=1, use_ema=False, progress=False)
    assert held(more.denoiser) < 1.1 * held(v_model), (held(v_model), held(more.denoiser))
    assert more.scheduler.config.prediction_type == 'v_prediction'

def test_an_objective_diffprune_does_not_know_is_one_line(cli, tmp_path):
    save_model(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), tmp_path/'m')
    cfg = tmp_path/'m'/'scheduler'/'scheduler_config.json'
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), prediction_type='flow')))
    for args in (['analyze', '--stride', '100'], ['prune', '--pruning-ratio', '0.3', '--stride', '100'], ['finetune', '--steps', '2']):
        one_line_exit_2(cli(*args, '--model', tmp_path/'m', '--out', tmp_path/'o'), "prediction_type 'flow' is not supported")
        assert not (tmp_path/'o').exists()

# 2. Non-square models

def test_a_non_square_model_samples_prunes_and_finetunes(cli, tmp_path):
    torch.manual_seed(0)
    u = UNet2DModel(sample_size=(16, 32), in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=4,
                    down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'), layers_per_block=1)
    save_model(u, DDPMScheduler(num_train_timesteps=1000), tmp_path/'wide')
    r = cli('sample', '--model', tmp_path/'wide', '--num', '2', '--sample-steps', '3', '--out', tmp_path/'s')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'s'/'result.json').read_text())['shape'] == [1, 16, 32]
    r = cli('prune', '--model', tmp_path/'wide', '--target-macs', '0.6', '--stride', '100', '--calibration-size', '4', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    pruned = load_model(tmp_path/'p')[0]
    assert sample_shape(pruned) == (1, 16, 32) and pruned(**example_inputs(pruned)).sample.shape == (1, 1, 16, 32)
    assert cli('finetune', '--model', tmp_path/'p', '--steps', '2', '--batch-size', '4', '--out', tmp_path/'f').returncode == 0
    one_line_exit_2(cli('evaluate', '--model', tmp_path/'p', '--feature', 'digits', '--num-samples', '4', '--out', tmp_path/'e'),
                    'not 1x16x32')

# 3. Chunked time embeddings (scale and shift)

def test_scale_shift_time_embedding_prunes_both_halves_with_the_same_channels(cli, tmp_path):
    torch.manual_seed(0)
    u = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=4,
                    resnet_time_scale_shift='scale_shift', down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                    up_block_types=('AttnUpBlock2D', 'UpBlock2D'), layers_per_block=1)
    save_model(u, DDPMScheduler(num_train_timesteps=1000), tmp_path/'ss')
    r = cli('prune', '--model', tmp_path/'ss', '--method', 'magnitude', '--pruning-ratio', '0.4', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    p = load_model(tmp_path/'p')[0]
    assert p(**example_inputs(p)).sample.shape == (1, 1, 16, 16)
    checked = False
    for (name, old), new in zip(u.named_modules(), p.modules()):
        if type(old).__name__ != 'ResnetBlock2D' or new.conv1.out_channels == old.conv1.out_channels: continue
        c, k = old.conv1.out_channels, new.conv1.out_channels
        assert k % new.norm2.num_groups == 0 and new.time_emb_proj.out_features == 2 * k, name
        # the kept channels, found from conv1's biases, are kept in the scale half and in the shift half alike
        kept = [int((old.conv1.bias == b).nonzero()) for b in new.conv1.bias]
        B = old.time_emb_proj.bias
        assert torch.equal(new.time_emb_proj.bias, torch.cat([B[kept], B[[c + i for i in kept]]])), name
        checked = True
    assert checked

# 4. The attention scale after head dims shrink

def test_pruned_heads_compute_the_same_under_every_attention_processor(tmp_path):
    u = tiny_unet(head_dim=8)
    res = prune_model(ScoredModel(u, DDPMScheduler(), 'magnitude', importance_criterion('magnitude')), pruning_ratio=0.5)
    res.save(tmp_path/'m')
    for unet in (res.denoiser, load_model(tmp_path/'m')[0]):
        x = example_inputs(unet, 2)
        attns = [m for m in unet.modules() if isinstance(m, Attention)]
        with torch.no_grad():
            for m in attns: m.set_processor(AttnProcessor())
            classic = unet(**x).sample
            for m in attns: m.set_processor(AttnProcessor2_0())
            sdpa = unet(**x).sample
        torch.testing.assert_close(classic, sdpa, atol=1e-5, rtol=1e-5)

# 5. Frozen models

@pytest.mark.parametrize('method', ['diff-pruning', 'taylor', 'magnitude'])
def test_a_frozen_model_prunes_as_an_unfrozen_one_and_stays_frozen(method):
    sched = DDPMScheduler(num_train_timesteps=1000)
    kw = dict(method=method, calibration_size=8, stride=100, progress=False)
    free = kept_channels(score_model((tiny_unet(), sched), **kw), pruning_ratio=0.3)
    frozen = tiny_unet().requires_grad_(False)
    imp = score_model((frozen, sched), **kw)
    assert kept_channels(imp, pruning_ratio=0.3) == free
    res = prune_model(imp, pruning_ratio=0.3)
    assert res.params_after < res.params_before
    assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())  # the caller's model is untouched

def test_a_frozen_model_finetunes():
    frozen = tiny_unet().requires_grad_(False); before = [p.clone() for p in frozen.parameters()]
    r = finetune((frozen, DDPMScheduler(num_train_timesteps=1000)), 'digits', steps=3, batch_size=4, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, r.raw.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))

# 6. SDXL-style added conditioning

def sdxl_like():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
                                cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8, addition_embed_type='text_time',
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)

def test_sdxl_style_added_conditioning_scores_prunes_and_finetunes():
    from diffprune.latent import LatentData
    u, sched = sdxl_like(), DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    z = torch.randn(6, 4, 8, 8)
    cond = {'encoder_hidden_states': torch.randn(6, 5, 24),
            'added_cond_kwargs': {'text_embeds': torch.randn(6, 16), 'time_ids': torch.rand(6, 6) * 64}}
    macs = count_macs(u)
    res = prune_model(score_model((u, sched), z, 'diff-pruning', calibration_size=6, stride=100, cond=cond, progress=False), target_macs=0.6)
    assert res.macs_after <= 0.62 * macs and res.macs_after == count_macs(res.denoiser)
    r = finetune((res.denoiser, sched), LatentData(z, cond), steps=2, batch_size=2, progress=False)
    assert len(r.history) == 2

def test_added_conditioning_diffprune_cannot_build_is_refused_in_one_line():
    from diffprune.unet import added_cond_example
    u = sdxl_like(); u.register_to_config(addition_embed_type='image_hint')
    with pytest.raises(ValueError, match="addition_embed_type 'image_hint'"): added_cond_example(u)

# 7. Transformer pipelines

@pytest.mark.parametrize('index', [
    {'_class_name': 'WanPipeline', 'transformer': ['diffusers', 'WanTransformer3DModel'],
     'vae': ['diffusers', 'AutoencoderKLWan'], 'scheduler': ['diffusers', 'UniPCMultistepScheduler']},
    {'_class_name': 'PixelTransformerPipeline', 'transformer': ['diffusers', 'Transformer2DModel'], 'scheduler': ['diffusers', 'DDPMScheduler']},
])
def test_a_transformer_pipeline_folder_is_named_not_called_damaged(cli, tmp_path, index):
    (tmp_path/'pipe'/'transformer').mkdir(parents=True)
    (tmp_path/'pipe'/'model_index.json').write_text(json.dumps(index))
    for cmd in (['prune', '--pruning-ratio', '0.3'], ['sample']):
        r = cli(*cmd, '--model', tmp_path/'pipe', '--out', tmp_path/'o')
        one_line_exit_2(r, f"is a {index['_class_name']} folder and its denoiser is transformer/ ({index['transformer'][1]})")
        assert 'damaged' not in r.stderr

def test_a_covered_pipeline_folder_without_its_denoisers_config_is_called_damaged(cli, tmp_path):
    (tmp_path/'pipe'/'transformer').mkdir(parents=True)
    (tmp_path/'pipe'/'model_index.json').write_text(json.dumps({
        '_class_name': 'StableDiffusion3Pipeline', 'transformer': ['diffusers', 'SD3Transformer2DModel'],
        'vae': ['diffusers', 'AutoencoderKL'], 'scheduler': ['diffusers', 'FlowMatchEulerDiscreteScheduler']}))
    r = cli('prune', '--pruning-ratio', '0.3', '--model', tmp_path/'pipe', '--out', tmp_path/'o')
    one_line_exit_2(r, f"{tmp_path/'pipe'/'transformer'/'config.json'}")
    assert 'damaged' in r.stderr

# 9. The package's own files and results

def test_every_file_the_manifest_names_exists():
    for line in (ROOT/'MANIFEST.in').read_text().splitlines():
        if line.startswith('include '): assert (ROOT/line.split()[1]).exists(), line

def test_committed_benchmark_results_hold_no_machine_paths():
    for f in (ROOT/'bench'/'results').glob('*.json'):
        paths = re.findall(r'"(/(?:work|root|home|tmp|Users)/[^"]*)"', f.read_text())
        assert not paths, (f.name, paths[:3])

def test_evaluate_shows_its_sampling_progress(capsys):
    from diffprune.evaluation import evaluate
    u = tiny_unet(); s = DDPMScheduler(num_train_timesteps=1000)
    evaluate((u, s), teacher=(tiny_unet(seed=1), s), num_samples=4, sample_steps=2, repeats=1, latency_batch=2)
    assert 'DDIM-2' in capsys.readouterr().err

# Found in review

class AsV(nn.Module):
    "An epsilon UNet's predictions re-expressed as v: the same model, trained for another objective."
    def __init__(self, unet, scheduler):
        super().__init__(); self.unet, self.abar, self.config = unet, scheduler.alphas_cumprod.float(), unet.config
    def forward(self, xt, t):
        eps = self.unet(xt, t).sample; a = self.abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * eps - (1 - a).sqrt() * (xt - (1 - a).sqrt() * eps) / a.sqrt()

def test_the_threshold_rule_finds_the_same_t_prime_for_a_v_model_and_its_eps_twin():
    "L_t is measured on the noise the output stands for: a v loss (eps loss / abar_t) would keep every timestep."
    from diffprune.timesteps import analyze_timesteps
    teacher, eps_sched = load_model('digits')
    v_sched = DDPMScheduler.from_config(eps_sched.config, prediction_type='v_prediction')
    kw = dict(threshold=0.05, calibration_size=8, stride=50, progress=False)
    a_eps = analyze_timesteps((teacher, eps_sched), **kw)
    a_v = analyze_timesteps((AsV(teacher, v_sched), v_sched), **kw)
    assert a_v.t_prime == a_eps.t_prime < 900
    torch.testing.assert_close(torch.tensor(a_v.losses), torch.tensor(a_eps.losses), rtol=1e-3, atol=1e-6)

@pytest.mark.parametrize('size', [None, 16.0, [16], (16, 8, 4), 'sixteen'])
def test_a_sample_size_that_is_not_one_or_two_whole_numbers_is_one_line(cli, tmp_path, size):
    u = tiny_unet(); u.register_to_config(sample_size=size)
    save_model(u, DDPMScheduler(num_train_timesteps=1000), tmp_path/'m')
    for cmd in (['analyze', '--stride', '100'], ['prune', '--pruning-ratio', '0.3', '--method', 'taylor', '--stride', '100'], ['sample']):
        r = cli(*cmd, '--model', tmp_path/'m', '--out', tmp_path/'o')
        one_line_exit_2(r, 'sample_size')

def test_a_data_free_method_records_no_data(cli, tmp_path):
    assert cli('prune', '--method', 'magnitude', '--pruning-ratio', '0.3', '--out', tmp_path/'p').returncode == 0
    assert json.loads((tmp_path/'p'/'result.json').read_text())['data'] is None

def test_a_folder_pruned_with_the_old_scale_loads_with_the_scale_of_its_heads(tmp_path):
    res = prune_model(ScoredModel(tiny_unet(head_dim=8), DDPMScheduler(), 'magnitude', importance_criterion('magnitude')), pruning_ratio=0.5)
    res.save(tmp_path/'m')
    j = tmp_path/'m'/'unet'/'config.json'; d = json.loads(j.read_text())
    for a in d['_diffprune']['structure'].values():
        if 'scale' in a: a['scale'] = 8 ** -0.5  # what folders recorded before the scale followed the heads
    j.write_text(json.dumps(d))
    for m in load_model(tmp_path/'m')[0].modules():
        if isinstance(m, Attention): assert m.scale == pytest.approx((m.inner_dim // m.heads) ** -0.5) and m.inner_dim // m.heads < 8

def test_loading_a_latent_pipeline_shows_no_loading_bar(cli, tmp_path):
    from diffprune.latent import tiny_latent_pipeline, save_pipeline
    save_pipeline(tiny_latent_pipeline('class'), tmp_path/'pipe')
    r = cli('sample', '--model', tmp_path/'pipe', '--class-labels', '1', '--num', '1', '--sample-steps', '2', '--out', tmp_path/'s')
    assert r.returncode == 0 and 'Loading pipeline components' not in r.stderr, r.stderr

def test_scoring_interrupted_half_way_leaves_no_gradients_on_the_callers_model(monkeypatch):
    import diffprune.importance as imp
    real = imp.accumulate_gradients
    def interrupted(*a, **kw):
        real(*a, **kw)  # the gradients are in .grad now
        raise KeyboardInterrupt
    monkeypatch.setattr(imp, 'accumulate_gradients', interrupted)
    u = tiny_unet()
    with pytest.raises(KeyboardInterrupt):
        score_model((u, DDPMScheduler(num_train_timesteps=1000)), method='taylor', calibration_size=4, stride=250,
                    progress=False)
    assert all(p.grad is None for p in u.parameters())

def test_gradients_of_another_model_are_refused_in_one_line():
    sched = DDPMScheduler(num_train_timesteps=1000)
    scored = score_model((tiny_unet(), sched), method='taylor', calibration_size=4, stride=250, progress=False)
    other = prune_model(scored, pruning_ratio=0.5).denoiser
    with pytest.raises(ValueError, match='computed on another model'):
        with scored.gradients_on(other): pass
    assert all(p.grad is None for p in other.parameters())

def test_a_model_that_learns_its_variance_is_scored_finetuned_and_sampled_by_its_prediction():
    "Out channels 2C (improved DDPM, DiT): the loss is the prediction's (first C), not a broadcast over both halves."
    from diffprune.models import unet_config
    torch.manual_seed(0)
    unet = UNet2DModel(**{**unet_config(16, 1, (16, 32), (False, True), norm_groups=4), 'out_channels': 2})
    sched = DDPMScheduler(num_train_timesteps=1000)
    x0, noise, t = torch.rand(4, 1, 16, 16) * 2 - 1, torch.randn(4, 1, 16, 16), torch.tensor([1, 10, 100, 900])
    with torch.no_grad():
        both = unet(sched.add_noise(x0, noise, t), t).sample
        assert torch.allclose(denoising_loss(unet, sched, x0, noise, t), (both[:, :1] - noise).pow(2).mean())
    scored = score_model((unet, sched), x0, calibration_size=4, stride=200, progress=False)
    pruned = prune_model(scored, target_macs=0.6)
    ft = finetune((pruned.denoiser, sched), 'digits', steps=2, batch_size=4, progress=False)
    assert ddim_sample(ft.denoiser, sched, 2, steps=3, progress=False).shape == (2, 1, 16, 16)

def test_finetuning_a_flow_model_lowers_its_velocity_loss_at_logit_normal_timesteps(monkeypatch):
    "A flow model trains on `noise - x0` at timesteps drawn as diffusers' SD3 and Flux scripts draw them."
    import diffprune.finetuning as ft
    drawn, draw = [], ft.sample_timesteps
    monkeypatch.setattr(ft, 'sample_timesteps', lambda *a: drawn.append(a[-1]) or draw(*a))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    net = tiny_unet()
    x0 = digits_split('heldout')[0][:64]; noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2))
    held = lambda u: denoising_loss(u, sched, x0, noise, t).item()
    tuned = ft.finetune((net, sched), 'digits', steps=40, batch_size=16, lr=2e-3, seed=0, use_ema=False, progress=False)
    assert held(tuned.denoiser) < 0.7 * held(net), (held(net), held(tuned.denoiser))
    assert set(drawn) == {'logit_normal'} and type(tuned.scheduler) is FlowMatchEulerDiscreteScheduler
    ft.finetune((net, sched), 'digits', steps=1, batch_size=4, progress=False, timestep_density='uniform')
    assert drawn[-1] == 'uniform'

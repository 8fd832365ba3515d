"""SD3, Flux (MMDiT) and Sana (issue #29): width pruning equals silencing the units it removes, depth keeps plain
diffusers configs, and their pipelines are pruned, finetuned and sampled from the CLI and load through diffusers."""
import copy, json
import pytest, torch
from diffusers import DiffusionPipeline, SD3Transformer2DModel, FluxTransformer2DModel
from diffprune.checks import InputError, ModelError
from diffprune.models import load_model
from diffprune.family import family_of
from diffprune.latent import tiny_latent_pipeline, save_pipeline, load_pipeline, pipeline_images, text_conditioning
from diffprune.transformer import TransformerPruner, handed_on, ClassPixelPipeline

@pytest.fixture(scope='module')
def pipes(tmp_path_factory):
    d = tmp_path_factory.mktemp('mmdit')
    return {k: tiny_latent_pipeline(k, tokenizer_dir=d/'tok') for k in ('sd3', 'flux', 'sana')}

def inputs(model, seed=0):
    "Two latents, two timesteps and text conditioning for `model`'s own call (its family's `predict`)."
    g, c = torch.Generator().manual_seed(seed), model.config
    if 'caption_channels' in c: cond = dict(encoder_hidden_states=torch.randn(2, 12, c.caption_channels, generator=g))
    else: cond = dict(encoder_hidden_states=torch.randn(2, 12, c.joint_attention_dim, generator=g),
                      pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g))
    return torch.randn(2, *family_of(model).sample_shape(model), generator=g), torch.tensor([300., 800.]), cond

def output(model, seed=0):
    x, t, cond = inputs(model, seed)
    with torch.no_grad(): return family_of(model).predict(model, x, t, cond)

@pytest.mark.parametrize('kind', ['sd3', 'flux'])
def test_width_pruning_equals_the_teacher_with_the_removed_units_silenced(pipes, kind):
    tr = pipes[kind].transformer
    grads = {n: torch.randn_like(p) for n, p in tr.named_parameters()}  # any scores: the equality holds for all
    pruner = TransformerPruner(copy.deepcopy(tr), 'taylor', grads, round_to=None)
    plan = pruner.plan(pruning_ratio=0.5)
    silenced = copy.deepcopy(tr)
    same = TransformerPruner(silenced, 'taylor', grads, round_to=None)  # the same scores, over silenced's weights
    with torch.no_grad():
        for i in plan['blocks']:
            for k, (n, s) in same.units[i].items():
                drop = torch.argsort(s)[:n - plan['keep'][(i, k)]]
                for p, dim, rows in same.anatomy[i][k].parts: p.index_fill_(dim, rows[drop].flatten(), 0.)
    pruned = pruner.apply(plan)
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in tr.parameters())
    torch.testing.assert_close(output(pruned), output(silenced), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(output(pruned), output(tr), atol=1e-3)  # the silenced units did contribute

def test_depth_renumbers_sd3_second_attentions_and_loads_with_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                               caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
                               qk_norm='rms_norm', dual_attention_layers=(1, 2))
    teacher = copy.deepcopy(tr)
    pruner = TransformerPruner(tr, 'magnitude')
    with pytest.raises(InputError, match="block 3 must stay .SD3's last block"):
        pruner.plan(removes='depth', blocks=[0, 2])
    pruned = pruner.apply(pruner.plan(removes='depth', blocks=[0, 2, 3]))
    assert (pruned.config.num_layers, tuple(pruned.config.dual_attention_layers)) == (3, (1,))
    pruned.save_pretrained(tmp_path)  # a plain diffusers folder: its config builds it
    plain = SD3Transformer2DModel.from_pretrained(tmp_path)
    torch.testing.assert_close(output(plain), output(pruned))
    hook = teacher.transformer_blocks[1].register_forward_hook(handed_on, with_kwargs=True)  # the block it lost
    torch.testing.assert_close(output(teacher), output(pruned), atol=1e-5, rtol=1e-4)
    hook.remove()

def test_flux_numbers_double_then_single_blocks_and_counts_them_apart(pipes):
    tr = copy.deepcopy(pipes['flux'].transformer)  # 2 double, 2 single blocks
    pruner = TransformerPruner(tr, 'magnitude')
    assert pruner.removable == [0, 1, 2, 3]
    pruned = pruner.apply(pruner.plan(removes='depth', blocks=[1, 3]))
    assert (pruned.config.num_layers, pruned.config.num_single_layers) == (1, 1)
    hooks = [b.register_forward_hook(handed_on, with_kwargs=True) for b in
             (pipes['flux'].transformer.transformer_blocks[0], pipes['flux'].transformer.single_transformer_blocks[0])]
    try: torch.testing.assert_close(output(pipes['flux'].transformer), output(pruned), atol=1e-5, rtol=1e-4)
    finally:
        for h in hooks: h.remove()

@pytest.mark.parametrize('kind', ['sd3', 'flux', 'sana'])
def test_a_pipeline_is_pruned_finetuned_and_sampled_from_the_cli_and_loads_through_diffusers(cli, pipes, kind,
                                                                                                 tmp_path):
    teacher = save_pipeline(pipes[kind], tmp_path/'teacher')
    r = cli('prune', '--model', teacher, '--prompt', 'a photo of a cat', '--target-macs', '0.5', '--removes', 'both',
            '--sampled-timesteps', '3', '--calibration-size', '4', '--calibration-steps', '3', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/'p'/'result.json').read_text())
    assert res['macs_after'] <= 0.5 * res['macs_before'] and res['pipeline'] == type(pipes[kind]).__name__
    r = cli('finetune', '--model', tmp_path/'p', '--prompt', 'a photo of a cat', '--steps', '3', '--batch-size', '2',
            '--num-latents', '4', '--calibration-steps', '3', '--out', tmp_path/'ft')
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path/'ft'/'result.json').read_text())['history']) == 3
    r = cli('sample', '--model', tmp_path/'ft', '--prompt', 'a digit', '--num', '2', '--sample-steps', '2',
            '--out', tmp_path/'s')
    assert r.returncode == 0, r.stderr
    ours = load_pipeline(tmp_path/'ft')
    theirs = DiffusionPipeline.from_pretrained(tmp_path/'ft', trust_remote_code=True)  # diffusers' own, its own class
    assert type(theirs.transformer).__name__ == type(ours.transformer).__name__ and type(ours.transformer).__name__.startswith('Pruned')
    torch.testing.assert_close(pipeline_images(theirs, 2, 2, prompt='a digit'),
                               pipeline_images(ours, 2, 2, prompt='a digit'))

def test_bad_mmdit_input_gets_one_line(cli, pipes, tmp_path):
    flux = copy.deepcopy(pipes['flux'].transformer)
    flux.register_to_config(guidance_embeds=True)  # FLUX.1-dev's kind; the call is refused before the model runs
    x, t, cond = inputs(flux)
    with pytest.raises(InputError, match='guidance-distilled .* give a guidance value'):
        family_of(flux).predict(flux, x, t, cond)
    with pytest.raises(InputError, match="tokens long, and this pipeline's text encoder reads 16: shorten it"):
        text_conditioning(pipes['sd3'], ['a photo of a cat ' * 5])
    teacher = save_pipeline(pipes['sd3'], tmp_path/'teacher')
    r = cli('prune', '--model', teacher, '--keep-blocks', '0', '1', '--out', tmp_path/'o')
    assert r.returncode == 2 and "block 2 must stay (SD3's last block" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path/'o').exists()
    from diffusers import DDPMScheduler
    wrong = type(pipes['sd3'])(**{**pipes['sd3'].components, 'scheduler': DDPMScheduler()})
    r = cli('prune', '--model', save_pipeline(wrong, tmp_path/'wrong'), '--target-macs', '0.5', '--out', tmp_path/'o')
    assert r.returncode == 2 and 'with a flow-matching scheduler, not DDPMScheduler' in r.stderr, r.stderr
    with pytest.raises(ModelError, match='is a flow-matching model: give it the scheduler it was trained with'):
        load_model((pipes['flux'].transformer, DDPMScheduler()))  # what every step loads a pair through

def test_the_shipped_mmdit_prunes_and_its_folder_samples_through_its_pipeline(cli, tmp_path):
    "digits-mmdit (flow matching, class-conditioned) from the CLI; its folder runs in ClassPixelPipeline's Euler loop."
    r = cli('prune', '--model', 'digits-mmdit', '--method', 'magnitude', '--target-macs', '0.5', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'p'/'result.json').read_text())['macs_after'] <= 0.5 * json.loads(
        (tmp_path/'p'/'result.json').read_text())['macs_before']
    pipe = ClassPixelPipeline.from_pretrained(tmp_path/'p')  # diffusers' loading, through the pipeline it names
    assert type(pipe.transformer).__name__ == 'PrunedClassSD3Transformer2DModel'
    pipe.set_progress_bar_config(disable=True)
    x = pipe([3, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type='pt').images
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
    r = cli('sample', '--model', tmp_path/'p', '--class-labels', '3', '--num', '2', '--sample-steps', '4',
            '--out', tmp_path/'s')
    assert r.returncode == 0 and (tmp_path/'s'/'samples.png').exists(), r.stderr

def test_a_flux_with_fused_projections_prunes_as_the_unfused_one(pipes):
    "diffusers' fuse_qkv_projections on Flux's attention: taken apart before the cut, so the same model comes out."
    from diffprune.importance import ScoredModel, importance_criterion
    from diffprune.prune import prune_model
    plain, fused = copy.deepcopy(pipes['flux'].transformer), copy.deepcopy(pipes['flux'].transformer)
    fused.fuse_qkv_projections()
    out = [prune_model(ScoredModel(m, pipes['flux'].scheduler, 'magnitude', importance_criterion('magnitude')),
                       pruning_ratio=0.5).denoiser for m in (plain, fused)]
    torch.testing.assert_close(output(out[1]), output(out[0]))

def test_flux_latents_of_an_odd_side_are_refused_in_one_line(pipes):
    x, t, cond = inputs(pipes['flux'].transformer)
    with pytest.raises(InputError, match='must be even, not 7x8'):
        family_of(pipes['flux'].transformer).predict(pipes['flux'].transformer, x[:, :, :7], t, cond)

"""Issue #19: Diff-Pruning for diffusion transformers (DiT, PixArt): whole heads, MLP units and whole blocks; width,
depth or both to a MACs target; pickle-free folders diffusers loads; conditioning checked; bad input in one line."""
import json, subprocess, sys
import pytest, torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, DDPMScheduler
from diffprune import ClassPixelPipeline
from diffprune.models import dit_config, save_model, load_model
from diffprune.diffusion import model_output, ddim_sample
from diffprune.importance import ScoredModel, importance_criterion, score_model
from diffprune.prune import prune_model
from diffprune.sizes import count_macs
from diffprune.transformer import TransformerPruner, head_rows, mlp_rows
from diffprune.finetuning import finetune

SCHED = DDPMScheduler(num_train_timesteps=1000)

def tiny_dit(layers=4, seed=0, **kw):
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(**{**dit_config(heads=4, head_dim=8, layers=layers), **kw})
    for p in m.parameters(): p.data.normal_(0, 0.05)  # adaLN-zero starts at zero: give every block some work
    return m.eval()

def tiny_pixart(layers=3, seed=0):
    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=layers, sample_size=16, patch_size=2, cross_attention_dim=32,
                                 caption_channels=16)
    for p in m.parameters(): p.data.normal_(0, 0.05)
    return m.eval()

def text_cond(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'encoder_hidden_states': torch.randn(n, 5, 16, generator=g),
            'added_cond_kwargs': {'resolution': None, 'aspect_ratio': None}}

def magnitude(m): return ScoredModel(m, SCHED, 'magnitude', importance_criterion('magnitude'))

def out(m, cond=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([4, 300, 900])
    with torch.no_grad():
        return model_output(m, x, t, cond if cond is not None else {'class_labels': torch.tensor([0, 4, 9])})

def zero_units(m, block, heads=(), units=(), whole=False):
    "Zero the weights of heads / MLP units of one block (or all of it): removing them must change nothing."
    b = m.transformer_blocks[block]
    with torch.no_grad():
        if whole:
            for p in b.parameters(): p.zero_()
            return
        a, rows = b.attn1, head_rows(b.attn1, list(heads))
        for l in (a.to_q, a.to_k, a.to_v):
            l.weight[rows] = 0
            l.bias[rows] = 0
        a.to_out[0].weight[:, rows] = 0
        r = mlp_rows(b.ff, list(units))
        b.ff.net[0].proj.weight[r] = 0
        b.ff.net[0].proj.bias[r] = 0
        b.ff.net[2].weight[:, list(units)] = 0

@pytest.mark.parametrize('activation', ['gelu-approximate', 'geglu'])
def test_width_pruning_removes_exactly_the_zero_heads_and_units(activation):
    "Heads and MLP units whose weights are zero score lowest by magnitude; cutting them leaves the output as it was."
    m = tiny_dit(activation_fn=activation)
    zero_units(m, 1, heads=[2], units=range(0, 64, 2))  # block 1: head 2 and a quarter of the MLP (even units)
    for i in (0, 2, 3): zero_units(m, i, heads=[0], units=range(32))
    r = prune_model(magnitude(m), pruning_ratio=0.25, round_to=None)
    b = r.denoiser.transformer_blocks[1]
    assert b.attn1.heads == 3 and b.attn1.to_q.out_features == 24 and b.ff.net[2].in_features == 96
    torch.testing.assert_close(out(r.denoiser), out(m), atol=1e-6, rtol=1e-5)
    assert r.macs_after == count_macs(r.denoiser) < r.macs_before and type(r.denoiser).__name__ == 'PrunedDiTTransformer2DModel'

def test_depth_pruning_removes_the_zero_block_and_keeps_dit_block_0():
    "An all-zero adaLN-zero block hands its input on: removing it changes nothing; DiT's block 0 never goes."
    m = tiny_dit()
    zero_units(m, 2, whole=True)
    with torch.no_grad():  # block 0 is the smallest by far, yet its embedding feeds the final layer
        for p in m.transformer_blocks[0].parameters(): p.mul_(1e-3)
    r = prune_model(magnitude(m), pruning_ratio=0.25, removes='depth')
    assert r.blocks_kept == [0, 1, 3] and r.denoiser.config.num_layers == 3 and r.removes == 'depth'
    torch.testing.assert_close(out(r.denoiser), out(m), atol=1e-6, rtol=1e-5)
    assert type(r.denoiser) is DiTTransformer2DModel  # its config builds it: plain diffusers loads it

@pytest.mark.parametrize('prune', ['width', 'depth', 'both'])
def test_a_macs_target_is_a_ceiling_and_the_estimate_is_exact(prune):
    "Each kind reaches the target from below; the plan's predicted MACs are the pruned model's counted MACs."
    m = tiny_dit(layers=6)
    s = score_model((m, SCHED), 'digits', calibration_size=8, sampled_timesteps=4, progress=False)
    for target in (0.7, 0.5):
        r = prune_model(s, target_macs=target, removes=prune)
        assert r.macs_after <= target * r.macs_before, (prune, target)
        pr = TransformerPruner(m, 'diff-pruning', s.gradients)
        assert abs(pr.estimate(pr.plan(target_macs=target, removes=prune)) - r.macs_after) < 1e-6 * r.macs_before
        assert r.macs_after > (target - 0.2) * r.macs_before  # close to it, not far below

def test_pruned_dits_save_and_load_through_diffusers_and_the_pipeline(tmp_path):
    "Width-pruned: the diffprune class loads it, plain diffusers refuses it in words; depth-pruned: plain diffusers."
    m = tiny_dit()
    for prune in ('width', 'depth'):
        r = prune_model(magnitude(m), pruning_ratio=0.5, removes=prune)
        r.save(tmp_path/prune)
        idx = json.loads((tmp_path/prune/'model_index.json').read_text())
        assert idx['_class_name'] == 'ClassPixelPipeline' and 'transformer' in idx and 'unet' not in idx
        back, _ = load_model(tmp_path/prune)
        torch.testing.assert_close(out(back), out(r.denoiser))
        pipe = ClassPixelPipeline.from_pretrained(tmp_path/prune)
        imgs = pipe([1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type='pt').images
        assert imgs.shape == (2, 1, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1
    code = ("import sys; sys.modules['diffprune'] = None\nfrom diffusers import DiTTransformer2DModel as D\n"
            "m = D.from_pretrained(sys.argv[1] + '/depth/transformer'); print(m.config.num_layers)\n"
            "try: D.from_pretrained(sys.argv[1] + '/width/transformer')\nexcept Exception as e: print(e)")
    r = subprocess.run([sys.executable, '-I', '-c', code, str(tmp_path)], capture_output=True, text=True)
    assert r.stdout.splitlines()[0] == '2', r.stderr[-800:]
    assert 'pip install diffprune' in r.stdout, r.stdout  # the width-pruned folder says what it needs

def test_pixart_is_scored_with_its_text_and_pruned_both_ways(tmp_path):
    "The text embeddings travel with every calibration sample; both self- and cross-attention lose heads."
    m, cond = tiny_pixart(), text_cond(6)
    x0 = torch.rand(6, 1, 16, 16) * 2 - 1
    s = score_model((m, SCHED), x0, cond=cond, sampled_timesteps=4, progress=False)
    r = prune_model(s, target_macs=0.6, removes='both')
    b = r.denoiser.transformer_blocks[0]
    assert r.macs_after <= 0.6 * r.macs_before and b.attn2.to_k.in_features == 32
    c3 = text_cond(3, seed=5)
    save_model(r.denoiser, SCHED, tmp_path/'p')
    back, _ = load_model(tmp_path/'p')
    torch.testing.assert_close(out(back, c3), out(r.denoiser, c3))
    with pytest.raises(ValueError, match='takes no class labels'):
        score_model((m, SCHED), x0, cond={'class_labels': torch.zeros(6, dtype=torch.long)})
    with pytest.raises(ValueError, match='is text-conditioned'): score_model((m, SCHED), x0)
    with pytest.raises(ValueError, match='rows for 4 samples'):
        score_model((m, SCHED), x0[:4], cond=cond)

def test_class_labels_travel_with_calibration_and_finetuning_and_are_checked():
    "A class DiT draws labelled digits; missing or out-of-range labels are refused; finetuning is seeded (dropout)."
    m = tiny_dit()
    with pytest.raises(ValueError, match=r'class labels must be in \[0, 10\)'):
        score_model((m, SCHED), torch.zeros(2, 1, 16, 16), cond={'class_labels': torch.tensor([3, 10])})
    with pytest.raises(ValueError, match='is class-conditional'): score_model((m, SCHED), torch.zeros(2, 1, 16, 16))
    a, b = (finetune((m, SCHED), 'digits', steps=3, batch_size=8, progress=False, seed=1) for _ in range(2))
    for p, q in zip(a.raw.parameters(), b.raw.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert a.history != finetune((m, SCHED), 'digits', steps=3, batch_size=8, progress=False, seed=2).history

def test_the_cli_prunes_samples_finetunes_and_evaluates_the_shipped_dit(cli, tmp_path):
    r = cli('prune', '--model', 'digits-dit', '--target-macs', '0.5', '--removes', 'both', '--sampled-timesteps', '4',
            '--calibration-size', '8', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr[-1500:]
    assert 'blocks kept:' in r.stdout and 'PrunedDiTTransformer2DModel' in r.stdout
    res = json.loads((tmp_path/'p'/'result.json').read_text())
    assert res['removes'] == 'both' and res['macs_fraction'] <= 0.5 and len(res['blocks_kept']) < 8
    r = cli('sample', '--model', tmp_path/'p', '--num', '4', '--sample-steps', '2', '--class-labels', '3', '7',
            '--out', tmp_path/'s')
    assert r.returncode == 0 and json.loads((tmp_path/'s'/'result.json').read_text())['class_labels'] == [3, 7]
    r = cli('finetune', '--model', tmp_path/'p', '--steps', '2', '--batch-size', '8', '--out', tmp_path/'f')
    assert r.returncode == 0, r.stderr[-1500:]
    assert (tmp_path/'f'/'transformer'/'config.json').exists() and not (tmp_path/'f'/'unet').exists()
    r = cli('evaluate', '--model', tmp_path/'f', '--teacher', 'digits-dit', '--num-samples', '8', '--sample-steps', '2',
            '--out', tmp_path/'e')
    assert r.returncode == 0, r.stderr[-1500:]
    ev = json.loads((tmp_path/'e'/'result.json').read_text())
    assert ev['macs'] < ev['teacher']['macs'] and ev['macs_reduction'] > 1.9

@pytest.mark.parametrize('args, needle', [
    (['prune', '--model', 'digits-dit', '--target-macs', '0.05', '--removes', 'depth', '--method', 'magnitude'],
     'depth pruning cannot go below'),
    (['prune', '--model', 'digits-dit', '--target-macs', '0.01', '--method', 'magnitude'], 'width pruning cannot go below'),
    (['prune', '--model', 'digits', '--target-macs', '0.5', '--removes', 'depth', '--method', 'magnitude'],
     'depth pruning cannot go below 90% of the MACs'),
    (['prune', '--model', 'digits-dit', '--pruning-ratio', '0.3', '--layout', 'diffusers', '--method', 'magnitude'],
     "use removes='depth' (--removes depth), or layout='free-form'"),
    (['sample', '--model', 'digits-dit', '--class-labels', '12'], r'class labels must be in [0, 10)'),
    (['sample', '--model', 'digits', '--class-labels', '1'], 'takes no class labels'),
    (['prune', '--model', 'digits-dit', '--pruning-ratio', '0.3', '--data', 'my-images'], 'has no class labels'),
])
def test_bad_transformer_input_gets_one_line_and_exit_2(cli, tmp_path, args, needle):
    r = cli(*args, '--out', tmp_path/'o')
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-1200:]
    assert not (tmp_path/'o').exists()

@pytest.mark.parametrize('kind', ['dit', 'pixart'])
def test_latent_transformer_pipelines_prune_finetune_and_sample_from_folders(cli, tmp_path, kind):
    "A DiTPipeline (class labels) and a PixArtAlphaPipeline (prompt embeddings and mask) folder, through the CLI."
    from diffprune.latent import tiny_latent_pipeline, save_pipeline, load_pipeline, denoiser
    save_pipeline(tiny_latent_pipeline(kind, tokenizer_dir=tmp_path/'tok'), tmp_path/'teacher')
    r = cli('prune', '--model', tmp_path/'teacher', '--target-macs', '0.6', '--removes', 'both', '--sampled-timesteps',
            '2', '--calibration-size', '4', '--calibration-steps', '2', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr[-1500:]
    idx = json.loads((tmp_path/'p'/'model_index.json').read_text())
    assert idx['transformer'][0] == 'diffprune' and 'blocks kept' in r.stdout
    r = cli('finetune', '--model', tmp_path/'p', '--steps', '2', '--batch-size', '2', '--num-latents', '4',
            '--calibration-steps', '2', '--out', tmp_path/'f')
    assert r.returncode == 0, r.stderr[-1500:]
    r = cli('sample', '--model', tmp_path/'f', '--num', '2', '--sample-steps', '2', '--out', tmp_path/'s',
            *(['--prompt', 'a 3'] if kind == 'pixart' else ['--class-labels', '3']))
    assert r.returncode == 0 and (tmp_path/'s'/'samples.png').exists(), r.stderr[-1500:]
    net = denoiser(load_pipeline(tmp_path/'f'))
    assert type(net).__name__.startswith('Pruned') and count_macs(net) <= 0.6 * count_macs(
        denoiser(load_pipeline(tmp_path/'teacher')))

# Found in review

def test_hub_checkpoints_that_name_their_transformer_transformer2dmodel_load(tmp_path):
    "facebook/DiT-XL-2-256 and PixArt-XL-2 record `Transformer2DModel`: diffusers (and diffprune) pick the class by norm_type."
    from diffprune.latent import tiny_latent_pipeline, load_pipeline, latent_folder, denoiser
    tiny_latent_pipeline('dit').save_pretrained(tmp_path/'p')
    for f in (tmp_path/'p'/'transformer'/'config.json', tmp_path/'p'/'model_index.json'):
        f.write_text(f.read_text().replace('"DiTTransformer2DModel"', '"Transformer2DModel"'))
    assert latent_folder(tmp_path/'p') == tmp_path/'p'
    assert type(denoiser(load_pipeline(tmp_path/'p'))) is DiTTransformer2DModel

def test_both_never_goes_below_a_target_width_alone_meets_and_training_mode_scores_the_same():
    m = tiny_dit(layers=6)
    r = prune_model(magnitude(m), target_macs=0.95, removes='both')
    assert r.blocks_kept == list(range(6)) and 0.9 < r.macs_after / r.macs_before <= 0.95
    m.train()  # DiT drops class labels at random in training mode: scoring is in eval mode, and the mode comes back
    x0, y = torch.rand(4, 1, 16, 16) * 2 - 1, {'class_labels': torch.tensor([1, 2, 3, 4])}
    grads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        grads.append(score_model((m, SCHED), x0, cond=y, sampled_timesteps=2, progress=False).gradients)
    assert m.training and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

def test_a_compiled_dit_keeps_block_0_and_a_wrapped_pixart_takes_its_text():
    r = prune_model(magnitude(torch.compile(tiny_dit(), backend='eager')), target_macs=0.5, removes='depth')
    assert r.blocks_kept[0] == 0
    m, c = tiny_pixart(), text_cond(3)
    torch.testing.assert_close(out(torch.nn.DataParallel(m), c), out(m, c))

@pytest.mark.parametrize('labels, needle', [
    (torch.tensor(3), 'shape (n,)'), ([1, 2], 'not list'), (torch.tensor([1., 2.]), 'torch.float32'),
    (torch.tensor([[1], [2]]), 'shape (2, 1)'), (torch.tensor([3, 11]), r'in [0, 10)'), (torch.tensor([1, 2, 3]), 'rows for 2')])
def test_class_labels_of_the_wrong_kind_are_refused_before_sampling(labels, needle):
    with pytest.raises(ValueError) as e: ddim_sample(tiny_dit(layers=1), SCHED, 2, steps=2, cond={'class_labels': labels}, progress=False)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1

def test_round_to_is_checked_and_auto_rounding_is_for_macs_targets_only():
    m = tiny_dit()
    for bad in (0, -8, 3.5, 'x'):
        with pytest.raises(ValueError, match="round_to must be 'auto' or a whole number"): prune_model(magnitude(m), pruning_ratio=0.5, round_to=bad)
    with pytest.raises(ValueError, match='use a smaller round_to'): prune_model(magnitude(m), pruning_ratio=0.5, round_to=1000)
    r = prune_model(magnitude(m), pruning_ratio=0.05)  # 'auto': any width for a ratio, as for UNets
    assert r.macs_after < r.macs_before and r.round_to is None
    with pytest.raises(ValueError, match='no whole block of 1 goes'): prune_model(magnitude(tiny_dit(layers=1)), pruning_ratio=0.5, removes='depth')

def test_prune_kind_and_layout_are_refused_before_scoring(cli, tmp_path, monkeypatch):
    import diffprune.importance
    monkeypatch.setattr(diffprune.importance, 'score_model', lambda *a, **k: pytest.fail('scored before refusing'))
    r = cli('prune', '--model', 'digits', '--prune', 'depth', '--remove-units', 'nope', '--out', tmp_path/'o')
    assert r.returncode == 2 and "this UNet has no unit 'nope'" in r.stderr
    assert 'diffprune: --prune is now --removes' in r.stderr  # the old flag (until 0.6) works, and says so

def test_a_torchvision_style_dataset_is_refused_in_words_and_the_pixel_pipeline_gives_pil(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.zeros(8, 1, 16, 16), torch.full((8,), 3))  # (image, label tensor) items
    with pytest.raises(ValueError, match='wrap labelled images in diffprune.data.LabelledImages'):
        finetune((tiny_dit(), SCHED), ds, steps=1, batch_size=4, progress=False)
    save_model(tiny_dit(), SCHED, tmp_path/'m')
    imgs = ClassPixelPipeline.from_pretrained(tmp_path/'m')([1, 2], num_inference_steps=2, output_type='pil').images
    assert len(imgs) == 2 and imgs[0].size == (16, 16)

def test_a_depth_pruned_dit_built_with_default_num_layers_rebuilds_from_its_config():
    "diffusers drops the arguments a model was built with by default from `from_config`: the pruned count must stay."
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(sample_size=8, in_channels=1, out_channels=1, num_attention_heads=2,
                                attention_head_dim=8, patch_size=2, num_embeds_ada_norm=10)  # num_layers: 28, by default
    res = prune_model(ScoredModel(dit, DDPMScheduler(), 'magnitude', importance_criterion('magnitude')),
                      keep_blocks=[0, 1, 2])
    assert len(DiTTransformer2DModel.from_config(res.denoiser.config).transformer_blocks) == 3

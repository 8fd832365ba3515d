"""The forms a model arrives in (issue 28): compiled or data-parallel, in half precision, with fused projections, with
a scheduler diffprune does not know; blocks chosen elsewhere and the map to the teacher's blocks; a DiT whose config
leaves `out_channels` unset. Each is pruned as the plain model is, or refused in one line."""
import json, re
import pytest, torch, torch.nn as nn
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, DiTTransformer2DModel
from diffprune.checks import InputError, ModelError
from diffprune.models import load_model, save_model, folder_record, BLOCK_MAP, is_fused
from diffprune.importance import score_model
from diffprune.prune import prune_model, jaccard
from diffprune.latent import tiny_latent_pipeline, denoiser, save_pipeline, load_pipeline
from diffprune.sizes import example_inputs

def one_line_exit_2(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and 'Traceback' not in r.stderr, r.stderr

def scored(model, data='digits', method='diff-pruning', **kw):
    return score_model(model, data, method, sampled_timesteps=4, calibration_size=8, progress=False, **kw)

@pytest.fixture(scope='module')
def dit(): return load_model('digits-dit')

@pytest.fixture(scope='module')
def sd():
    "A tiny text-to-image pipeline (UNet2DConditionModel) and a calibration batch of its latents and prompt states."
    pipe = tiny_latent_pipeline('text')
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe, z, {'encoder_hidden_states': torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))}

def same_gradients(a, b):
    assert a.gradients.keys() == b.gradients.keys() and a.gradients
    for k in a.gradients: torch.testing.assert_close(b.gradients[k], a.gradients[k], msg=k)

# 1-2. Compiled and data-parallel models: scored by the model inside, keyed by its own names

WRAPS = {'compiled': lambda m: torch.compile(m, backend='eager'), 'DataParallel': nn.DataParallel}

@pytest.mark.parametrize('wrap', WRAPS)
def test_a_wrapped_dit_is_scored_and_pruned_as_the_plain_one(dit, wrap):
    net, sched = dit
    plain, wrapped = scored((net, sched)), scored((WRAPS[wrap](net), sched))
    same_gradients(plain, wrapped)
    for removes in ('depth', 'width'):
        a, b = (prune_model(s, target_macs=0.6, removes=removes) for s in (plain, wrapped))
        assert (a.blocks_kept, a.widths_after, a.macs_after) == (b.blocks_kept, b.widths_after, b.macs_after)
    assert type(b.denoiser).__name__ == 'PrunedDiTTransformer2DModel'  # the model, not its wrapper, is pruned

@pytest.mark.parametrize('wrap', WRAPS)
def test_a_wrapped_unet_is_scored_and_pruned_as_the_plain_one(wrap):
    net, sched = load_model('digits')
    plain, wrapped = scored((net, sched), method='taylor'), scored((WRAPS[wrap](net), sched), method='taylor')
    same_gradients(plain, wrapped)
    a, b = (prune_model(s, target_macs=0.5) for s in (plain, wrapped))
    assert a.widths_after == b.widths_after and a.macs_after == b.macs_after

def test_a_distributed_data_parallel_model_is_unwrapped(dit, tmp_path):
    "DistributedDataParallel (what `accelerator.prepare` gives under a multi-process launch), one gloo process."
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0, world_size=1)
    try:
        net, sched = dit
        ddp = nn.parallel.DistributedDataParallel(net)
        a, b = (prune_model(scored(m, method='magnitude'), target_macs=0.6, removes='depth') for m in ((net, sched), (ddp, sched)))
        assert a.blocks_kept == b.blocks_kept and a.macs_after == b.macs_after
    finally: dist.destroy_process_group()

def test_a_wrapped_unet_is_pruned_by_depth_as_the_unet_itself():
    net, sched = load_model('digits')
    a, b = (prune_model(scored((m, sched), method='magnitude'), target_macs=0.95, removes='depth')
            for m in (net, nn.DataParallel(net)))
    assert a.units_removed == b.units_removed and a.macs_after == b.macs_after

# 3. Half precision: the forward pass in the model's dtype, the gradients summed in float32

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('method', ['diff-pruning', 'taylor'])
def test_a_half_precision_dit_scores_by_gradient(dit, dtype, method):
    "digits-dit in bf16 / fp16: its heads and MLP units ranked as float32 ranks them (Jaccard >= 0.85 of the top half)."
    net, sched = dit
    runs = {}
    try:
        for d in (torch.float32, dtype):
            s = scored((net.to(d), sched), method=method)
            runs[d] = (s, prune_model(s, target_macs=0.6), top_half_units(s))
    finally: net.float()
    (s32, w32, u32), (s16, w16, u16) = runs[torch.float32], runs[dtype]
    assert {g.dtype for g in s16.gradients.values()} == {torch.float32} and s16.gradients.keys() == s32.gradients.keys()
    assert next(w16.denoiser.parameters()).dtype == dtype  # pruned in its own dtype
    assert w16.macs_after == pytest.approx(w32.macs_after, rel=0.05)
    assert jaccard(u16, u32) >= 0.85, jaccard(u16, u32)

def top_half_units(s) -> set:
    "`(block, kind, unit)` of the better-scored half of each block's heads and MLP units."
    from diffprune.transformer import TRANSFORMER
    pr = TRANSFORMER.pruner(s.denoiser, s)
    return {(i, k, int(j)) for i, u in enumerate(pr.units) for k, (n, sc) in u.items()
            for j in sc.argsort(descending=True)[:n // 2]}

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_a_half_precision_text_unet_scores_and_prunes(sd, dtype):
    "A UNet2DConditionModel in bf16 / fp16: diff-pruning's kept channels agree with float32 scoring (Jaccard >= 0.8)."
    pipe, z, cond = sd
    unet = pipe.unet
    runs = {}
    try:
        for d in (torch.float32, dtype):
            s = scored((unet.to(d), pipe.scheduler), data=z, cond=cond)
            runs[d] = (s, prune_model(s, pruning_ratio=0.3))
    finally: unet.float()
    (s32, r32), (s16, r16) = runs[torch.float32], runs[dtype]
    assert {g.dtype for g in s16.gradients.values()} == {torch.float32}
    assert r16.macs_after == r32.macs_after  # a ratio: the same widths
    from diffprune.unet import kept_channels
    k32, k16 = (kept_channels(s, pruning_ratio=0.3) for s in (s32, s16))
    assert jaccard(k32, k16) >= 0.8, jaccard(k32, k16)

# 4. Fused projections (diffusers' `fuse_qkv_projections`): scored and pruned as unfused, saved unfused

@pytest.mark.parametrize('kind', ['text', 'pixart'])
def test_a_fused_model_prunes_as_the_unfused_one_and_saves_loadably(kind, tmp_path):
    pipe = tiny_latent_pipeline(kind)
    net = denoiser(pipe)
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {'encoder_hidden_states': torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))}
    if kind == 'pixart': cond['added_cond_kwargs'] = {'resolution': None, 'aspect_ratio': None}
    plain_scores = scored((net, pipe.scheduler), data=z, cond=cond)
    plain = prune_model(plain_scores, pruning_ratio=0.3)
    net.fuse_qkv_projections()
    assert is_fused(net)
    fused_scores = scored((net, pipe.scheduler), data=z, cond=cond)
    fused = prune_model(fused_scores, pruning_ratio=0.3)
    assert is_fused(net)  # the caller's model is left as it was
    assert fused.widths_after == plain.widths_after and fused.macs_after == plain.macs_after
    if kind == 'text':  # the channels a plan keeps, asked without pruning, are the unfused model's too
        from diffprune.unet import kept_channels
        assert kept_channels(fused_scores, pruning_ratio=0.3) == kept_channels(plain_scores, pruning_ratio=0.3)
    x = example_inputs(plain.denoiser, 2)
    with torch.no_grad(): torch.testing.assert_close(fused.denoiser(**x)[0], plain.denoiser(**x)[0])
    save_model(net, pipe.scheduler, tmp_path/'m')  # a fused teacher saves as its unfused self
    back, _ = load_model(tmp_path/'m')
    assert type(back) is type(net) and not is_fused(back)
    with torch.no_grad(): torch.testing.assert_close(back(**x)[0], net(**x)[0])

# 5. Schedulers: a flow-matching one noises and samples by its sigmas, in a pipeline only where the pipeline can; a
# saved one keeps its class

def test_a_flow_matching_unet_runs_every_step_by_its_sigmas(cli, tmp_path):
    "The digits UNet under SD3's scheduler: each subcommand runs, as flow matching, and keeps the scheduler's class."
    net, _ = load_model('digits')
    save_model(net, FlowMatchEulerDiscreteScheduler(shift=3.0), tmp_path/'flow')
    small = ['--stride', '100', '--calibration-size', '4']
    for name, cmd in (('a', ['analyze', *small]), ('p', ['prune', '--target-macs', '0.6', *small]),
                      ('s', ['sample', '--num', '2', '--sample-steps', '3']), ('f', ['finetune', '--steps', '2', '--batch-size', '4']),
                      ('e', ['evaluate', '--num-samples', '2', '--sample-steps', '2'])):
        r = cli(*cmd, '--model', tmp_path/'flow', '--out', tmp_path/name)
        assert r.returncode == 0, (cmd, r.stderr)
    assert json.loads((tmp_path/'a'/'result.json').read_text())['t_prime'] >= 0
    for name in ('p', 'f'): assert type(load_model(tmp_path/name)[1]) is FlowMatchEulerDiscreteScheduler
    refused = {('sample', '--sampler', 'ddpm'): "DDPM's ancestral sampler is for DDPM-style schedulers",
               ('sample', '--spacing', 'quad'): "spacing 'quad' is DDIM's", ('evaluate', '--spacing', 'quad'): "spacing 'quad' is DDIM's",
               ('run', '--spacing', 'quad', '--steps', '2'): "spacing 'quad' is DDIM's"}  # before any step of the run
    for cmd, needle in refused.items():
        one_line_exit_2(cli(*cmd, '--model', tmp_path/'flow', '--out', tmp_path/'o'), needle)
        assert not (tmp_path/'o').exists()

def test_a_dit_pipeline_with_a_flow_matching_scheduler_is_one_line(cli, tmp_path):
    pipe = tiny_latent_pipeline('dit')
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    pipe.save_pretrained(tmp_path/'pipe')
    for cmd in (['prune', '--target-macs', '0.5', '--method', 'magnitude'], ['prune', '--target-macs', '0.5'],
                ['sample', '--num', '2', '--sample-steps', '2']):
        r = cli(*cmd, '--model', tmp_path/'pipe', '--out', tmp_path/'o')
        one_line_exit_2(r, '(FlowMatchEulerDiscreteScheduler) is a flow-matching one: give the pipeline the scheduler')
        assert 'teacher latents' not in r.stderr and not (tmp_path/'o').exists()  # refused before any work

def test_a_saved_scheduler_keeps_its_class(tmp_path):
    net, sched = load_model('digits')
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False)
    prune_model(scored((net, ddim), method='magnitude'), target_macs=0.5).save(tmp_path/'p')
    cfg = json.loads((tmp_path/'p'/'scheduler'/'scheduler_config.json').read_text())
    assert cfg['_class_name'] == 'DDIMScheduler' and cfg['clip_sample'] is False
    assert type(load_model(tmp_path/'p')[1]) is DDIMScheduler

# 6-7. Blocks chosen elsewhere, and the map to the teacher's blocks

def test_chosen_blocks_give_a_normal_result_and_folder(dit, cli, tmp_path):
    r = cli('prune', '--model', 'digits-dit', '--method', 'magnitude', '--keep-blocks', '0', '2', '3',
            '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    record = folder_record(tmp_path/'p')
    assert record['source'] == 'digits-dit' and record['prune']['blocks_kept'] == [0, 2, 3]
    assert '| teacher_blocks | [0, 2, 3] |' in (tmp_path/'p'/'README.md').read_text()
    net, _ = load_model(tmp_path/'p')
    assert len(net.transformer_blocks) == 3 and net.config[BLOCK_MAP] == [0, 2, 3]
    # finetuning with distillation finds its teacher from the folder
    r = cli('finetune', '--model', tmp_path/'p', '--steps', '2', '--batch-size', '4', '--distill',
            '--out', tmp_path/'f')
    assert r.returncode == 0 and '--teacher' not in r.stderr, r.stderr

@pytest.mark.parametrize('args, needle', [
    (['--keep-blocks', '0', '9'], 'blocks to keep must be some of 0..7'),
    (['--keep-blocks', '1', '2'], 'block 0 must stay'),
    (['--keep-blocks', '0', '1', '--target-macs', '0.5'], '--keep-blocks is the plan'),
])
def test_chosen_blocks_that_cannot_be_kept_are_one_line_before_scoring(cli, tmp_path, args, needle, monkeypatch):
    import diffprune.importance
    monkeypatch.setattr(diffprune.importance, 'score_model', lambda *a, **k: pytest.fail('scored before the check'))
    r = cli('prune', '--model', 'digits-dit', *args, '--out', tmp_path/'p')
    one_line_exit_2(r, needle)
    assert not (tmp_path/'p').exists()

@pytest.mark.parametrize('blocks, needle', [(3, 'a list of block indices, not 3'), ([], 'some of 0..7, not []'),
                                            ([0, 0, 1], 'named twice'), ([0, True], 'whole numbers'),
                                            ('03', 'a list of block indices')])
def test_chosen_blocks_from_python_are_one_line(dit, blocks, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        prune_model(scored(dit, method='magnitude'), keep_blocks=blocks)

def test_a_unet_asked_for_chosen_blocks_is_told_it_has_none():
    with pytest.raises(InputError, match="a UNet2DModel's blocks cannot be chosen"):
        prune_model(scored(load_model('digits'), method='magnitude'), keep_blocks=[0])

def test_a_unet_has_no_blocks_to_choose(cli, tmp_path):
    one_line_exit_2(cli('prune', '--model', 'digits', '--method', 'magnitude', '--keep-blocks', '0',
                        '--out', tmp_path/'p'), "a UNet2DModel's blocks cannot be chosen")

def test_the_block_map_travels_with_the_weights_and_composes(dit, tmp_path):
    net, sched = dit
    first = prune_model(scored((net, sched), method='magnitude'), keep_blocks=[0, 1, 3])
    assert first.teacher_blocks == [0, 1, 3]
    save_model(first.denoiser, sched, tmp_path/'a')  # saved by the plain save, not the result's own
    loaded, _ = load_model(tmp_path/'a')
    assert loaded.config[BLOCK_MAP] == [0, 1, 3]
    save_model(loaded, sched, tmp_path/'b')  # load, then save: kept
    again, _ = load_model(tmp_path/'b')
    second = prune_model(scored((again, sched), method='magnitude'), keep_blocks=[0, 2])
    assert second.blocks_kept == [0, 2] and second.teacher_blocks == [0, 3]  # indices into the first teacher
    assert second.denoiser.config[BLOCK_MAP] == [0, 3]

# 8. A DiT that leaves `out_channels` unset (diffusers' default: as many as it takes in)

def test_a_dit_with_out_channels_unset_prunes_and_its_pipeline_samples(cli, tmp_path):
    pipe = tiny_latent_pipeline('dit')
    c = dict(pipe.transformer.config)
    pipe.transformer = DiTTransformer2DModel(**{k: v for k, v in c.items() if not k.startswith('_') and k != 'out_channels'})
    assert pipe.transformer.config.out_channels is None
    pipe.save_pretrained(tmp_path/'pipe')
    r = cli('prune', '--model', tmp_path/'pipe', '--target-macs', '0.6', '--method', 'magnitude', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    assert load_pipeline(tmp_path/'p').transformer.config.out_channels == 4
    r = cli('sample', '--model', tmp_path/'p', '--num', '2', '--sample-steps', '2', '--out', tmp_path/'s')
    assert r.returncode == 0, r.stderr
    from diffprune.latent import pipeline_images  # and the teacher pipeline as built, never saved
    assert pipeline_images(pipe, 2, 2).shape == (2, 3, 16, 16)

"Finetuning: exact resume after SIGKILL, two processes under torchrun, bad input."
import os, sys, time, json, signal, subprocess, shutil
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from conftest import DIFFPRUNE

def weights(folder): return load_file(Path(folder)/'unet'/'diffusion_pytorch_model.safetensors')

def ft_args(model, out, steps=30, *extra):
    return [DIFFPRUNE, 'finetune', '--model', str(model), '--steps', str(steps), '--batch-size', '16', '--lr', '5e-4',
            '--checkpoint-every', '5', '--seed', '3', '--out', str(out), *extra]

@pytest.mark.slow  # the default tier kills the recipe's finetune between checkpoints instead (tests/test_resume.py)
def test_resume_after_sigkill_matches_uninterrupted_run(pruned, tmp_path):
    "`diffprune finetune --resume` after SIGKILL: the same weights and loss history as a run never stopped."
    env = dict(os.environ, OMP_NUM_THREADS='1')
    full = subprocess.run(ft_args(pruned, tmp_path/'full'), capture_output=True, text=True, env=env, timeout=900)
    assert full.returncode == 0, full.stderr
    p = subprocess.Popen(ft_args(pruned, tmp_path/'killed'), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ck = tmp_path/'killed'/'checkpoints'
    deadline = time.time() + 600
    while time.time() < deadline and not (ck.exists() and any((c/'state.json').exists() for c in ck.glob('step_*'))): time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (tmp_path/'killed'/'result.json').exists()  # killed mid-way, nothing final written
    steps_done = max(json.loads((c/'state.json').read_text())['step'] for c in ck.glob('step_*') if (c/'state.json').exists())
    assert steps_done < 30
    r = subprocess.run(ft_args(pruned, tmp_path/'killed', 30, '--resume'), capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    a, b = weights(tmp_path/'full'), weights(tmp_path/'killed')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d/'result.json').read_text()) for d in (tmp_path/'full', tmp_path/'killed'))
    assert ra['history'] == rb['history']

def test_two_processes_end_identical_and_match_one_process(tmp_path):
    "2 processes under torchrun (gloo on CPU) vs 1 process, same global batch of 16, 10 steps at lr 1e-3."
    worker = Path(__file__).parent/'ddp_worker.py'
    torchrun = str(Path(sys.executable).parent/'torchrun')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    (tmp_path/'two').mkdir(); (tmp_path/'one').mkdir()
    r = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2', str(worker), str(tmp_path/'two'), '16', '10'],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(worker), str(tmp_path/'one'), '16', '10'], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    r0, r1, one = (load_file(tmp_path/d/f'rank{i}.safetensors') for d, i in (('two', 0), ('two', 1), ('one', 0)))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the processes in lockstep
    # the same global batch split in two: equal up to the order of float reductions (measured ~3e-5)
    assert max((r0[k] - one[k]).abs().max().item() for k in r0) < 1e-3
    assert any(not torch.equal(r0[k], one[k]) for k in r0)  # it really ran split (not the same batch twice)

@pytest.mark.parametrize('extra, needle', [
    (['--steps', '0'], '--steps'), (['--steps', '-3'], '--steps'), (['--lr', '0'], '--lr'), (['--lr', '-1e-4'], '--lr'),
    (['--resume'], 'no checkpoint'), (['--distill', '--alpha', '1.5'], '--alpha'),
    (['--distill', '--alpha-feature', '-1'], '--alpha-feature must be in [0, 100]'),
])
def test_bad_finetune_input_is_one_line_exit_2(cli, pruned, tmp_path, extra, needle):
    r = cli('finetune', '--model', pruned, '--out', tmp_path/'o', *extra)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(pruned, tmp_path):
    from diffprune.finetuning import finetune, FinetuneError, latest_checkpoint
    ck = tmp_path/'ck'
    finetune(pruned, steps=4, batch_size=8, checkpoint_dir=ck, checkpoint_every=2, progress=False)
    good = latest_checkpoint(ck)
    with pytest.raises(FinetuneError, match=r'at step \d+.*last good checkpoint'):
        finetune(pruned, steps=50, batch_size=8, lr=1e8, grad_clip=0, checkpoint_dir=ck, checkpoint_every=1000, progress=False)
    assert latest_checkpoint(ck) == good

def test_distillation_leaves_the_callers_teacher_trainable():
    "A teacher passed as a (unet, scheduler) pair is used through a copy: it can still be scored and pruned afterwards."
    from diffusers import DDPMScheduler
    from diffprune.models import tiny_unet
    from diffprune.finetuning import finetune
    teacher = (tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    student = (tiny_unet(seed=1), teacher[1])
    finetune(student, 'digits', steps=2, batch_size=4, teacher=teacher, alpha=0.5, progress=False)
    assert all(p.requires_grad for p in teacher[0].parameters())

def test_dropout_is_set_on_the_trained_copy_only():
    "The paper finetunes with dropout 0.1: `finetune(dropout=)` sets every nn.Dropout of the copy it trains."
    from diffusers import DDPMScheduler
    from diffprune.finetuning import finetune
    from diffprune.models import tiny_unet
    net = tiny_unet()
    r = finetune((net, DDPMScheduler(num_train_timesteps=1000)), steps=1, batch_size=4, dropout=0.3, progress=False)
    ps = lambda m: {x.p for x in m.modules() if isinstance(x, torch.nn.Dropout)}
    assert ps(r.raw) == {0.3} and ps(net) == {0.0}

@pytest.mark.skipif(torch.cuda.is_available(), reason='a machine without a GPU')
def test_a_gpu_asked_for_where_there_is_none_is_refused_before_training():
    from diffusers import DDPMScheduler
    from diffprune.checks import InputError
    from diffprune.finetuning import finetune
    from diffprune.models import tiny_unet
    with pytest.raises(InputError, match='no GPU'):
        finetune((tiny_unet(), DDPMScheduler(num_train_timesteps=1000)), steps=1, device='cuda', progress=False)

def test_gradient_checkpointing_changes_memory_not_the_result():
    "diffusers' checkpointing recomputes each block's activations in backward: the same steps, to float rounding."
    from diffusers import DiTTransformer2DModel, DDPMScheduler
    from diffprune.finetuning import finetune
    from diffprune.models import dit_config
    from diffprune.checks import InputError
    torch.manual_seed(0)
    pair = (DiTTransformer2DModel(**dit_config(heads=2, head_dim=8, layers=2)), DDPMScheduler(num_train_timesteps=1000))
    runs = [finetune(pair, steps=3, batch_size=4, lr=1e-3, device='cpu', progress=False, gradient_checkpointing=g)
            for g in (False, True)]
    assert [r.raw.gradient_checkpointing for r in runs] == [False, True]  # it really recomputed
    a, b = (r.raw.state_dict() for r in runs)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and runs[0].history == pytest.approx(runs[1].history)
    pair[0]._supports_gradient_checkpointing = False  # as a class diffusers gives no checkpointing
    with pytest.raises(InputError, match='has no gradient checkpointing in diffusers: finetune without it'):
        finetune(pair, steps=1, batch_size=4, device='cpu', progress=False, gradient_checkpointing=True)

def test_feature_distillation_pairs_kept_blocks_with_their_teacher_blocks_and_refuses_narrowed_ones(pruned):
    "BK-SDM's feature distillation: each kept block's output against the teacher block it came from (04e, 04b)."
    from diffprune.finetuning import finetune, feature_pairs
    from diffprune.importance import score_model
    from diffprune.prune import prune_model
    from diffprune.models import load_model
    from diffprune.checks import InputError
    teacher = load_model('digits')
    deep = prune_model(score_model('digits', method='magnitude', progress=False), target_macs=0.95, removes='depth')
    pairs = feature_pairs(deep.denoiser, teacher[0])
    assert [n for n, _, _ in pairs] == ['down_blocks.0', 'down_blocks.1', 'down_blocks.2', 'up_blocks.0', 'up_blocks.1',
                                        'up_blocks.2'] and deep.denoiser.mid_block is None  # the mid-block went
    runs = [finetune((deep.denoiser, deep.scheduler), steps=3, batch_size=8, teacher='digits', alpha=0.5, progress=False,
                     device='cpu', alpha_feature=f) for f in (0., 1.)]
    assert runs[1].history[0] > runs[0].history[0]  # the same first batch: the feature term adds to the loss
    dit = load_model('digits-dit')
    kept = prune_model(score_model('digits-dit', method='magnitude', progress=False), keep_blocks=[0, 2, 5])
    assert [t for _, _, t in feature_pairs(kept.denoiser, dit[0])] == [dit[0].transformer_blocks[i] for i in (0, 2, 5)]
    with pytest.raises(InputError, match="width pruning narrowed them; distil the output alone"):
        finetune(pruned, steps=1, batch_size=4, teacher='digits', alpha_feature=1., progress=False, device='cpu')

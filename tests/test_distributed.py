"""Issue #32: several processes do one job. Scoring under torchrun splits its work (exact mode the calibration batch,
fast mode the sampled timesteps; sharded, the batch), and every process prunes what one process prunes; FSDP
finetuning equals DDP's and resumes exactly."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
TORCHRUN = str(Path(sys.executable).parent/'torchrun')
ENV = dict(os.environ, OMP_NUM_THREADS='1')

def launch(script, n:int, *args, cwd, **env) -> subprocess.CompletedProcess:
    "`script` on `n` CPU processes under torchrun (gloo), or alone for `n=1`, with `env` added to the environment."
    cmd = ([TORCHRUN, '--standalone', '--nproc_per_node', str(n)] if n > 1 else [sys.executable]) + [str(script)]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env={**ENV, **env}, timeout=900,
                          cwd=cwd)

CONFIGS = ['exact', 'fast', 'fast:fsdp', 'exact:skew']  # exact mode sharded is the CLI's run below

@pytest.fixture(scope='module')
def one_process(tmp_path_factory) -> Path:
    "Exact and fast scoring in this process: the reference."
    import runpy
    d, score = tmp_path_factory.mktemp('one'), runpy.run_path(str(HERE/'score_worker.py'))['score']
    for mode in ('exact', 'fast'): score(d, mode)
    return d

def test_two_scoring_processes_share_the_work_and_prune_what_one_process_prunes(one_process, tmp_path):
    """Unsharded (exact mode shares the batch, fast mode the timesteps), or sharded by FSDP2 (the whole model stays on
    the CPU to be pruned, each process takes a share of the batch, the gradients are gathered); and with processes
    that would choose different pass sizes (they take the least, so that they run the same passes)."""
    r = launch(HERE/'score_worker.py', 2, tmp_path, *CONFIGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for config in CONFIGS:
        name, mode = config.replace(':', '-'), config.split(':')[0]
        one = load_file(one_process/f'grads0-{mode}.safetensors')
        cut = json.loads((one_process/f'cut0-{mode}.json').read_text())
        scale = max(g.abs().max().item() for g in one.values())  # float sums in another order: off by rounding alone
        for rank in (0, 1):
            two = load_file(tmp_path/f'grads{rank}-{name}.safetensors')
            mine = json.loads((tmp_path/f'cut{rank}-{name}.json').read_text())
            assert two.keys() == one.keys(), config
            for n in one: torch.testing.assert_close(two[n], one[n], rtol=1e-3, atol=1e-5 * scale)
            assert mine['kept'] == cut['kept'] and mine['t_prime'] == cut['t_prime'], config
            assert mine['timesteps'] == cut['timesteps']  # the record: every timestep the gradients cover
            # each does half the work: half the images in each pass (exact, sharded), half the timesteps (fast)
            assert mine['passes'] == (cut['passes'] + 1) // 2 and cut['passes'] > 2, config

def test_a_batch_the_processes_cannot_share_is_refused_before_any_work(monkeypatch):
    import diffprune.distributed as dd
    from diffprune.checks import InputError
    from diffprune.importance import score_model
    monkeypatch.setattr(dd, 'processes', lambda: (0, 3))  # as the first of three processes
    with pytest.raises(InputError, match='the calibration batch of 8 does not divide over 3 processes'):
        score_model('digits', calibration_size=8, progress=False)
    with pytest.raises(InputError, match='batch of 8 does not divide'):  # sharded fast mode shares the batch too
        score_model('digits', calibration_size=8, sampled_timesteps=4, fsdp=True, progress=False)
    with pytest.raises(InputError, match='batch of 4 does not divide'):  # a tensor is used whole: its own length
        score_model('digits', torch.zeros(4, 1, 16, 16), calibration_size=6, progress=False)
    import diffprune.report as report
    monkeypatch.setattr(report, 'processes', lambda: (0, 3))  # its own name for it
    with pytest.raises(InputError, match='the recipe runs in one process'):
        report.run_recipe(recipe='digits-cpu')

def finals(folder) -> dict: return load_file(folder/'final.safetensors')

def test_fsdp_finetune_equals_ddp_and_resumes_exactly_after_sigkill(tmp_path):
    "A tiny DiT, 6 steps with distillation, EMA, clipping and checkpoints every 2 steps, on two CPU processes."
    r = launch(HERE/'fsdp_worker.py', 2, tmp_path/'full', 'ddp,fsdp', 6, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(HERE/'fsdp_worker.py', 2, tmp_path/'killed', 'fsdp', 6, cwd=tmp_path, KILL_AT='5')
    assert r.returncode != 0
    ck = sorted(p.name for p in (tmp_path/'killed'/'fsdp'/'ck').iterdir())
    assert ck == ['step_00000002', 'step_00000004'], ck  # killed at step 5: two complete checkpoints, no half one
    assert sorted(p.name for p in (tmp_path/'killed'/'fsdp'/'ck'/ck[-1]).iterdir()) == [
        'shard_0.safetensors', 'shard_1.safetensors', 'state.json']
    r = launch(HERE/'fsdp_worker.py', 2, tmp_path/'killed', 'fsdp', 6, cwd=tmp_path, RESUME='1')
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, fsdp, resumed = (finals(tmp_path/d/m) for d, m in (('full', 'ddp'), ('full', 'fsdp'), ('killed', 'fsdp')))
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)  # the kill changed nothing
    assert (tmp_path/'killed'/'fsdp'/'history.txt').read_text() == (tmp_path/'full'/'fsdp'/'history.txt').read_text()
    # sharded and data-parallel runs differ only in the order of float reductions (measured 7e-6 of weights up to 3.8)
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) < 1e-4
    assert any(not torch.equal(ddp[k], fsdp[k]) for k in ddp)  # really another code path

def test_sharding_one_process_or_in_fp16_is_refused_in_one_line(cli, console, pruned, tmp_path):
    r = cli('finetune', '--model', pruned, '--out', tmp_path/'o', '--steps', '2', '--fsdp')
    assert r.returncode == 2 and 'fsdp shards over several processes and this is one' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path/'o').exists()
    # in a process of its own: Accelerate keeps its first mixed precision for the life of a process
    r = console('finetune', '--model', pruned, '--out', tmp_path/'o', '--steps', '2', '--fsdp', '--mixed-precision', 'fp16')
    assert r.returncode == 2 and "trains in bf16 or fp32 (fp16's loss scaler is not sharded)" in r.stderr, r.stderr

def test_a_sharded_checkpoint_is_not_resumed_unsharded(pruned, tmp_path):
    from diffprune.checks import InputError
    from diffprune.distributed import save_shards
    from diffprune.finetuning import finetune
    save_shards(tmp_path/'step_00000002', {'model.w': torch.ones(2)}, dict(step=2, history=[1., 1.]))
    with pytest.raises(InputError, match='written by a sharded run: resume it with fsdp'):
        finetune(pruned, steps=4, batch_size=4, checkpoint_dir=tmp_path, resume=True, progress=False)

def test_a_shard_checkpoint_resumes_only_on_as_many_processes(tmp_path):
    from diffprune.checks import InputError
    from diffprune.distributed import save_shards, load_shards
    save_shards(tmp_path/'step_00000002', {'w': torch.zeros(2)}, dict(step=2))
    save_shards(tmp_path/'step_00000002', {'w': torch.ones(2)}, dict(step=2))  # a run started again: replaced
    assert load_shards(tmp_path/'step_00000002')[0]['w'].tolist() == [1., 1.]
    (tmp_path/'step_00000002'/'state.json').write_text(json.dumps(dict(step=2, processes=4)))  # as four wrote it
    with pytest.raises(InputError, match='written by 4 processes: resume it on 4 \\(this run has 1\\)'):
        load_shards(tmp_path/'step_00000002')

def test_prune_under_torchrun_with_fsdp_writes_once_what_one_process_writes(cli, tmp_path):
    "The console script under torchrun: every process scores its share of a sharded copy; the first writes the folder."
    args = ['prune', '--calibration-size', '8', '--stride', '50', '--target-macs', '0.6']
    r = launch(Path(sys.executable).parent/'diffprune', 2, *args, '--fsdp', '--out', tmp_path/'two', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('wrote the pruned model') == 1  # one process wrote
    assert cli(*args, '--out', tmp_path/'one').returncode == 0
    one, two = (load_file(tmp_path/d/'unet'/'diffusion_pytorch_model.safetensors') for d in ('one', 'two'))
    assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)  # the same channels cut
    assert all(torch.equal(one[k], two[k]) for k in one)  # and the same weights kept

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

@pytest.fixture(scope='module')
def one_process(tmp_path_factory) -> Path:
    "Exact and fast scoring in one process: the reference."
    d = tmp_path_factory.mktemp('one')
    for mode in ('exact', 'fast'):
        (d/mode).mkdir()
        r = launch(HERE/'score_worker.py', 1, d/mode, mode, cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
    return d

@pytest.mark.parametrize('mode', ['exact', 'fast'])
@pytest.mark.parametrize('fsdp', [False, True])
def test_two_scoring_processes_share_the_work_and_prune_what_one_process_prunes(one_process, tmp_path, mode, fsdp):
    "Unsharded, or sharded by FSDP2 (then the whole model stays on the CPU to be pruned, the gradients gathered)."
    (tmp_path/'2').mkdir()
    r = launch(HERE/'score_worker.py', 2, tmp_path/'2', mode, *(['fsdp'] if fsdp else []), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one, cut = load_file(one_process/mode/'grads0.safetensors'), json.loads((one_process/mode/'cut0.json').read_text())
    scale = max(g.abs().max().item() for g in one.values())  # float sums in another order: off by rounding alone
    cuts = [json.loads((tmp_path/'2'/f'cut{r}.json').read_text()) for r in (0, 1)]
    for rank in (0, 1):
        two = load_file(tmp_path/'2'/f'grads{rank}.safetensors')
        assert two.keys() == one.keys()
        for n in one: torch.testing.assert_close(two[n], one[n], rtol=1e-3, atol=1e-5 * scale)
        assert cuts[rank]['kept'] == cut['kept'] and cuts[rank]['t_prime'] == cut['t_prime']
        assert cuts[rank]['timesteps'] == cut['timesteps']  # the record: every timestep the gradients cover
        # each process does half the work: half the images in each pass (exact, sharded), half the timesteps (fast)
        assert cuts[rank]['passes'] == (cut['passes'] + 1) // 2 and cut['passes'] > 2

def test_a_batch_the_processes_cannot_share_is_refused_in_one_line(tmp_path):
    r = launch(HERE/'score_worker.py', 3, tmp_path, 'exact', cwd=tmp_path)
    assert r.returncode != 0 and 'the calibration batch of 8 does not divide over 3 processes' in r.stderr

def finals(folder) -> dict: return load_file(folder/'final.safetensors')

def test_fsdp_finetune_equals_ddp_and_resumes_exactly_after_sigkill(tmp_path):
    "A tiny DiT, 6 steps with distillation, EMA, clipping and checkpoints every 2 steps, on two CPU processes."
    runs = {'ddp': ('ddp', {}), 'fsdp': ('fsdp', {}), 'killed': ('fsdp', dict(KILL_AT='5'))}
    for name, (mode, env) in runs.items():
        (tmp_path/name).mkdir()
        r = launch(HERE/'fsdp_worker.py', 2, tmp_path/name, mode, 6, cwd=tmp_path, **env)
        assert (r.returncode == 0) == (name != 'killed'), r.stderr[-3000:]
    ck = sorted(p.name for p in (tmp_path/'killed'/'ck').iterdir())
    assert ck == ['step_00000002', 'step_00000004'], ck  # killed at step 5: two complete checkpoints, no half one
    assert sorted(p.name for p in (tmp_path/'killed'/'ck'/ck[-1]).iterdir()) == [
        'shard_0.safetensors', 'shard_1.safetensors', 'state.json']
    r = launch(HERE/'fsdp_worker.py', 2, tmp_path/'killed', 'fsdp', 6, cwd=tmp_path, RESUME='1')
    assert r.returncode == 0, r.stderr[-3000:]
    bad = launch(HERE/'fsdp_worker.py', 2, tmp_path/'ddp', 'fsdp', 8, cwd=tmp_path, RESUME='1')  # a DDP run's checkpoints
    assert bad.returncode != 0 and "was written by an unsharded run: resume it without fsdp" in bad.stderr
    ddp, fsdp, resumed = (finals(tmp_path/n) for n in ('ddp', 'fsdp', 'killed'))
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)  # the kill changed nothing
    assert (tmp_path/'killed'/'history.txt').read_text() == (tmp_path/'fsdp'/'history.txt').read_text()
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

def test_a_shard_checkpoint_resumes_only_on_as_many_processes(tmp_path):
    from diffprune.checks import InputError
    from diffprune.distributed import save_shards, load_shards
    save_shards(tmp_path/'step_00000002', {'w': torch.ones(2)}, dict(step=2))
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

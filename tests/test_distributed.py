"""Issue #32: several processes do one job. Scoring under torchrun splits its work (exact mode the calibration batch,
fast mode the sampled timesteps), and every process prunes what one process prunes; FSDP finetuning equals DDP's."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
TORCHRUN = str(Path(sys.executable).parent/'torchrun')
ENV = dict(os.environ, OMP_NUM_THREADS='1')

def launch(script, n:int, *args, cwd) -> subprocess.CompletedProcess:
    "`script` on `n` CPU processes under torchrun (gloo), or alone for `n=1`."
    cmd = ([TORCHRUN, '--standalone', '--nproc_per_node', str(n)] if n > 1 else [sys.executable]) + [str(script)]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=900, cwd=cwd)

@pytest.mark.parametrize('mode', ['exact', 'fast'])
def test_two_scoring_processes_share_the_work_and_prune_what_one_process_prunes(tmp_path, mode):
    for n in (1, 2):
        (tmp_path/str(n)).mkdir()
        r = launch(HERE/'score_worker.py', n, tmp_path/str(n), mode, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    one, cut = load_file(tmp_path/'1'/'grads0.safetensors'), json.loads((tmp_path/'1'/'cut0.json').read_text())
    scale = max(g.abs().max().item() for g in one.values())  # float sums in another order: off by rounding alone
    cuts = [json.loads((tmp_path/'2'/f'cut{r}.json').read_text()) for r in (0, 1)]
    for rank in (0, 1):
        two = load_file(tmp_path/'2'/f'grads{rank}.safetensors')
        assert two.keys() == one.keys()
        for n in one: torch.testing.assert_close(two[n], one[n], rtol=1e-3, atol=1e-5 * scale)
        assert cuts[rank]['kept'] == cut['kept'] and cuts[rank]['t_prime'] == cut['t_prime']
        assert cuts[rank]['timesteps'] == cut['timesteps']  # the record: every timestep the gradients cover
        # each process does half the work: half the images in each pass (exact), half the timesteps (fast)
        assert cuts[rank]['passes'] == (cut['passes'] + 1) // 2 and cut['passes'] > 2

def test_a_batch_the_processes_cannot_share_is_refused_in_one_line(tmp_path):
    r = launch(HERE/'score_worker.py', 3, tmp_path, 'exact', cwd=tmp_path)
    assert r.returncode != 0 and 'the calibration batch of 8 does not divide over 3 processes' in r.stderr

"`diffprune analyze` and `diffprune prune`: outputs, and bad input as one line with exit code 2."
import json
import pytest
import torch.nn as nn
from diffprune.models import load_model
from diffprune.data import save_images, digits_split

def test_analyze_writes_losses_threshold_and_kept_timesteps(cli, tmp_path):
    r = cli('analyze', '--stride', '20', '--calibration-size', '16', '--threshold', '0.05', '--out', tmp_path/'a')
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/'a'/'result.json').read_text())
    assert len(res['losses']) == len(res['timesteps']) == 50
    assert res['kept_timesteps'] == [t for t in res['timesteps'] if t <= res['t_prime']] and res['threshold'] == 0.05
    assert (tmp_path/'a'/'losses.png').stat().st_size > 0

def test_prune_output_is_a_model_for_the_other_subcommands(cli, tmp_path):
    r = cli('prune', '--method', 'diff-pruning', '--target-macs', '0.5', '--stride', '20', '--calibration-size', '16', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/'p'/'result.json').read_text())
    for k in ('method', 'params_before', 'params_after', 'macs_before', 'macs_after', 'pruning_ratio', 't_prime', 'kept_timesteps'): assert k in res
    assert abs(res['macs_after'] / res['macs_before'] - 0.5) < 0.03
    assert cli('sample', '--model', tmp_path/'p', '--num', '2', '--sample-steps', '2', '--out', tmp_path/'s').returncode == 0
    assert cli('analyze', '--model', tmp_path/'p', '--stride', '100', '--calibration-size', '4', '--out', tmp_path/'a').returncode == 0

def test_prune_on_an_image_folder(cli, tmp_path):
    save_images(digits_split('heldout')[0][:20], tmp_path/'imgs'/'deep')
    r = cli('prune', '--data', tmp_path/'imgs', '--pruning-ratio', '0.3', '--stride', '100', '--out', tmp_path/'p', '--calibration-size', '8')
    assert r.returncode == 0, r.stderr

def test_round_to_keeps_every_pruned_width_a_multiple(cli, tmp_path):
    r = cli('prune', '--method', 'magnitude', '--target-macs', '0.5', '--round-to', '16', '--out', tmp_path/'p')
    assert r.returncode == 0, r.stderr
    unet = load_model(tmp_path/'p')[0]; orig = load_model('digits')[0]
    new = {n: m.weight.shape[0] for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    old = {n: m.weight.shape[0] for n, m in orig.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    changed = {n: w for n, w in new.items() if w != old[n]}
    assert changed and all(w % 16 == 0 for w in changed.values()), changed

@pytest.mark.parametrize('args, needle', [
    (['prune', '--pruning-ratio', '0.3', '--method', 'magnitude', '--round-to', '0'], '--round-to'),
    (['prune', '--pruning-ratio', '0.3', '--method', 'magnitude', '--round-to', '4096'], 'smaller round_to'),
    (['prune', '--pruning-ratio', '1.0'], '--pruning-ratio'),
    (['prune', '--pruning-ratio', '-0.1'], '--pruning-ratio'),
    (['prune', '--pruning-ratio', '0.3', '--threshold', '1.5'], '--threshold'),
    (['analyze', '--threshold', '-0.2'], '--threshold'),
    (['prune', '--target-macs', '0.001', '--method', 'magnitude'], 'no pruning ratio reaches'),
    (['prune', '--pruning-ratio', '0.3', '--data', '/nonexistent/folder'], 'does not exist'),
    (['prune', '--pruning-ratio', '0.3', '--data', 'EMPTY'], 'no images'),
    (['prune', '--pruning-ratio', '0.3', '--model', 'NOTAMODEL'], 'not a diffusion model'),
    (['prune'], 'one of --pruning-ratio and --target-macs'),
    (['prune', '--pruning-ratio', '0.3', '--method', 'magnitude', '--data', 'digits'], 'drop --data'),
    (['prune', '--pruning-ratio', '0.3', '--method', 'random', '--data', 'EMPTY'], 'drop --data'),
])
def test_bad_input_is_one_line_exit_2_and_no_output(cli, tmp_path, args, needle):
    (tmp_path/'empty').mkdir(); (tmp_path/'notamodel').mkdir(); (tmp_path/'notamodel'/'x.txt').write_text('x')
    args = [str(tmp_path/'empty') if a == 'EMPTY' else str(tmp_path/'notamodel') if a == 'NOTAMODEL' else a for a in args]
    r = cli(*args, '--out', tmp_path/'o')
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'o').exists()

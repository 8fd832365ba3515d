"""`diffprune sample`, and the console script's contracts, which only a real process shows: it starts without importing
torch, exit codes, one-line errors on stderr."""
import json, subprocess, sys
from PIL import Image

def test_sample_writes_grid_and_result_through_the_console_script(console, tmp_path):
    r = console('sample', '--model', 'digits', '--num', '8', '--sample-steps', '5', '--out', tmp_path/'s')
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/'s'/'result.json').read_text())
    assert res['num'] == 8 and res['sample_steps'] == 5 and res['shape'] == [1, 16, 16]
    assert Image.open(tmp_path/'s'/'samples.png').size[0] > 16

def test_console_help_lists_the_subcommands(console):
    r = console('--help')
    assert r.returncode == 0 and all(c in r.stdout for c in ('analyze', 'prune', 'finetune', 'evaluate', 'sample', 'demo')), r.stdout

def test_help_and_argument_checks_import_no_torch():
    "`diffprune --help` and refused arguments answer before torch, diffusers or matplotlib load."
    probe = ("import sys; from diffprune.cli import main; codes = [main(['--help']), main(['prune', '--pruning-ratio', '2', '--out', 'x'])]; "
             "print(codes, [m for m in ('torch', 'diffusers', 'matplotlib') if m in sys.modules])")
    r = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == '[0, 2] []', r.stdout + r.stderr

def test_same_seed_gives_same_grid(cli, tmp_path):
    for name in 'ab': assert cli('sample', '--num', '4', '--sample-steps', '3', '--seed', '7', '--out', tmp_path/name).returncode == 0
    assert (tmp_path/'a'/'samples.png').read_bytes() == (tmp_path/'b'/'samples.png').read_bytes()

def test_unknown_model_offline_fails_with_one_line_exit_2(console, tmp_path):
    r = console('sample', '--model', 'nonexistent/model', '--out', tmp_path/'o')
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and 'nonexistent/model' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'o').exists()

def test_bad_argument_is_one_line_exit_2(console, tmp_path):
    r = console('sample', '--num', 'many', '--out', tmp_path/'o')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and '--num' in r.stderr, r.stderr

def test_output_folder_with_other_files_is_refused_unless_overwrite(cli, tmp_path):
    (tmp_path/'o').mkdir(); (tmp_path/'o'/'keep.txt').write_text('mine')
    r = cli('sample', '--num', '2', '--sample-steps', '2', '--out', tmp_path/'o')
    assert r.returncode == 2 and '--overwrite' in r.stderr
    assert (tmp_path/'o'/'keep.txt').read_text() == 'mine'
    assert cli('sample', '--num', '2', '--sample-steps', '2', '--out', tmp_path/'o', '--overwrite').returncode == 0
    assert (tmp_path/'o'/'result.json').exists() and not (tmp_path/'o'/'keep.txt').exists()

def test_quad_spacing_samples_other_timesteps_and_is_recorded(cli, tmp_path):
    "`--spacing quad` is the paper's DDIM spacing (dense at low noise): other images from the same seed, said in result.json."
    for sp in ('uniform', 'quad'):
        r = cli('sample', '--num', '2', '--sample-steps', '4', '--spacing', sp, '--out', tmp_path/sp)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path/sp/'result.json').read_text())['spacing'] == sp
    assert (tmp_path/'uniform'/'samples.png').read_bytes() != (tmp_path/'quad'/'samples.png').read_bytes()
    r = cli('sample', '--num', '2', '--sampler', 'ddpm', '--spacing', 'quad', '--out', tmp_path/'ddpm')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and '--spacing' in r.stderr, r.stderr
    assert not (tmp_path/'ddpm').exists()

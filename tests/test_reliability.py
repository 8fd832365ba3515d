"""Bad input, untrusted files and interruptions: one line, exit code 2 (130 for Ctrl-C), nothing half-written.

The table of bad inputs (also in the README's troubleshooting section). Rows covered in other files are named there:

| bad input | where tested |
|---|---|
| ratio or MACs target outside its range | test_cli_method.py |
| threshold outside [0, 1] | test_cli_method.py |
| unknown model id offline | test_cli_sample.py |
| a folder that is not a diffusion model | test_cli_method.py |
| a pruned-model folder with a missing or truncated safetensors file | here |
| a JSON whose shapes do not match the weights | here |
| a pickle file offered as weights, checkpoint or cache | here |
| images the model cannot take (1-channel digits for a 3-channel model) | here |
| an empty data folder | test_cli_method.py |
| zero steps, learning rate <= 0, --resume with no checkpoint | test_finetune.py |
| an unwritable output folder | here |
| an output folder that holds another run (refused unless --overwrite) | test_cli_sample.py, here |
| Ctrl-C | here |
| an objective (prediction_type) diffprune does not know, a teacher of another objective | test_field_faults.py, 05_finetuning |
| a pipeline whose denoiser diffprune cannot prune (SD3, a generic Transformer2DModel) | test_field_faults.py |
| a transformer MACs target below one block or one head, --removes depth on a UNet, --layout diffusers with width | test_transformer.py |
| class labels a model does not take, lacks or cannot index; text a model does not take; unlabelled data | test_transformer.py |
| --data with a method that does not use it | test_cli_method.py |
| added conditioning diffprune cannot build | test_field_faults.py |
| a feature network that cannot take the model's images | test_field_faults.py, test_evaluate.py |
"""
import json, os, pickle, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from conftest import DIFFPRUNE

def copy_of(src, dst): shutil.copytree(src, dst); return dst

def one_line_exit_2(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and 'Traceback' not in r.stderr, r.stderr

class Touch:
    "Unpickling this creates a file: the proof that something was unpickled."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (Path.touch, (Path(self.path),))

def evil(path, marker):
    path.write_bytes(pickle.dumps({'weight': Touch(marker)}))

def test_truncated_weights(cli, pruned, tmp_path):
    m = copy_of(pruned, tmp_path/'m'); w = m/'unet'/'diffusion_pytorch_model.safetensors'
    w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
    one_line_exit_2(cli('sample', '--model', m, '--out', tmp_path/'o'), 'truncated')
    assert not (tmp_path/'o').exists()

def test_missing_weights(cli, pruned, tmp_path):
    m = copy_of(pruned, tmp_path/'m'); (m/'unet'/'diffusion_pytorch_model.safetensors').unlink()
    one_line_exit_2(cli('sample', '--model', m, '--out', tmp_path/'o'), 'no weights')

def test_structure_json_that_does_not_match_the_weights(cli, pruned, tmp_path):
    m = copy_of(pruned, tmp_path/'m'); j = m/'unet'/'config.json'; d = json.loads(j.read_text())
    d['_diffprune']['structure']['conv_in']['out_channels'] += 4  # the record of the widths, where loading reads it
    j.write_text(json.dumps(d))
    one_line_exit_2(cli('sample', '--model', m, '--out', tmp_path/'o'), 'do not fit')

def test_pickle_as_model_weights_is_refused_and_never_unpickled(cli, pruned, tmp_path):
    marker = tmp_path/'UNPICKLED'
    for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'):
        m = copy_of(pruned, tmp_path/name); (m/'unet'/'diffusion_pytorch_model.safetensors').unlink()
        evil(m/'unet'/name, marker)
        r = cli('sample', '--model', m, '--out', tmp_path/f'o{name}')
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not marker.exists()

def test_pickle_as_checkpoint_is_refused_and_never_unpickled(pruned, tmp_path):
    from diffprune.finetuning import finetune
    marker = tmp_path/'UNPICKLED'; ck = tmp_path/'ck'
    finetune(pruned, steps=2, batch_size=8, checkpoint_dir=ck, checkpoint_every=2, progress=False)
    for f in ('optimizer.safetensors', 'ema.safetensors'):
        evil(next(ck.glob('step_*'))/f, marker)
        with pytest.raises(Exception): finetune(pruned, steps=4, batch_size=8, checkpoint_dir=ck, checkpoint_every=2, resume=True, progress=False)
        assert not marker.exists()

def test_pickle_in_the_fid_cache_is_never_unpickled(tmp_path, monkeypatch):
    import diffprune.metrics as ev
    monkeypatch.setattr(ev, 'CACHE', tmp_path/'cache')
    x = (torch.rand(16, 1, 16, 16))
    f1 = ev.fid_score(x, 'digits:heldout')
    marker = tmp_path/'UNPICKLED'
    for p in (tmp_path/'cache'/'fid').glob('*.safetensors'): evil(p, marker)
    assert ev.fid_score(x, 'digits:heldout') == pytest.approx(f1)  # recomputed, not read
    assert not marker.exists()

def test_no_pickle_loading_in_the_library():
    src = ''.join(p.read_text() for p in (Path(__file__).parent.parent/'diffprune').glob('*.py'))
    assert 'import pickle' not in src and 'torch.load(' not in src

def test_data_the_model_cannot_take(cli, tmp_path):
    from diffprune.models import save_model, tiny_unet
    from diffusers import DDPMScheduler
    save_model(tiny_unet(channels=3), DDPMScheduler(num_train_timesteps=1000), tmp_path/'rgb')
    one_line_exit_2(cli('prune', '--model', tmp_path/'rgb', '--data', 'digits', '--pruning-ratio', '0.3', '--out', tmp_path/'o'), '1-channel')

def test_unwritable_output_folder(cli, tmp_path):
    (tmp_path/'afile').write_text('x')
    one_line_exit_2(cli('analyze', '--stride', '100', '--out', tmp_path/'afile'/'out'), 'not writable')

def test_output_folder_of_another_run_is_kept_without_overwrite(cli, tmp_path):
    assert cli('analyze', '--stride', '200', '--calibration-size', '4', '--out', tmp_path/'a').returncode == 0
    before = (tmp_path/'a'/'result.json').read_text()
    one_line_exit_2(cli('analyze', '--stride', '100', '--calibration-size', '4', '--out', tmp_path/'a'), '--overwrite')
    assert (tmp_path/'a'/'result.json').read_text() == before

def wait_for_progress(p, timeout=120) -> str:
    "Read the child's stderr until a progress bar shows it is into the work; returns what it printed."
    seen, deadline = '', time.time() + timeout
    while '%|' not in seen:
        if time.time() > deadline or p.poll() is not None: raise AssertionError(f'no progress bar: {seen[-500:]!r}')
        seen += os.read(p.stderr.fileno(), 4096).decode(errors='replace')
    return seen

@pytest.mark.parametrize('cmd', [['demo'], ['prune', '--pruning-ratio', '0.3']])
def test_ctrl_c_stops_with_one_line_exit_130_and_no_partial_output(tmp_path, cmd):
    # the child starts with Ctrl-C's default action even where the test runner was started in the background (nohup,
    # `&`), which makes a shell ignore SIGINT for it and for everything it starts
    p = subprocess.Popen([DIFFPRUNE, *cmd, '--out', str(tmp_path/'o')], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = wait_for_progress(p)  # past start-up, into the work
    p.send_signal(signal.SIGINT)
    err = seen + p.communicate(timeout=120)[1].decode(errors='replace')
    assert p.returncode == 130, err[-1500:]
    lines = err.replace('\r', '\n').splitlines()  # progress bars redraw with carriage returns
    assert f'diffprune {cmd[0]}: interrupted; no partial output was left' in lines and 'Traceback' not in err, err[-1500:]
    assert not (tmp_path/'o').exists() and not [q for q in tmp_path.iterdir() if q.name.startswith('.o')]

def test_ctrl_c_in_finetune_keeps_its_checkpoints_and_says_how_to_go_on(tmp_path, pruned):
    p = subprocess.Popen([DIFFPRUNE, 'finetune', '--model', str(pruned), '--steps', '400', '--batch-size', '8', '--checkpoint-every', '2',
                          '--out', str(tmp_path/'ft')], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ck, deadline = tmp_path/'ft'/'checkpoints', time.time() + 120
    while not any((c/'state.json').exists() for c in ck.glob('step_*')) and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1].decode(errors='replace')
    assert p.returncode == 130, err[-1500:]
    assert any('interrupted' in l and 'add --resume' in l for l in err.replace('\r', '\n').splitlines()), err[-1500:]
    assert any((c/'state.json').exists() for c in ck.glob('step_*'))

# The error contract: the user's errors in one line, everything else with its traceback

def test_a_diverging_finetune_is_one_line_exit_2(cli, pruned, tmp_path):
    r = cli('finetune', '--model', pruned, '--steps', '40', '--lr', '1e8', '--batch-size', '8', '--checkpoint-every', '1000',
            '--out', tmp_path/'o')
    last = r.stderr.replace('\r', '\n').strip().splitlines()[-1]  # after the progress bar of the steps it ran
    assert r.returncode == 2 and last.startswith('diffprune finetune: error: the loss became') and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'o').exists()  # it diverged before any checkpoint: nothing is left

def test_a_bug_is_not_disguised_as_bad_input(cli, tmp_path, monkeypatch):
    "A ValueError from inside torch or diffusers is not the user's to fix: it propagates (a traceback, exit 1)."
    import diffprune.timesteps as ts
    def broken(*args, **kw): raise ValueError('operands could not be broadcast together')
    monkeypatch.setattr(ts, 'analyze_timesteps', broken)
    with pytest.raises(ValueError, match='broadcast'): cli('analyze', '--out', tmp_path/'o')

@pytest.mark.parametrize('switch', ['--debug', 'DIFFPRUNE_DEBUG=1'])
def test_debug_shows_an_input_error_with_its_cause(cli, tmp_path, monkeypatch, switch):
    from diffprune.models import ModelError
    if switch.startswith('DIFFPRUNE_DEBUG'): monkeypatch.setenv('DIFFPRUNE_DEBUG', '1')
    with pytest.raises(ModelError, match='cannot find model') as e:
        cli('sample', '--model', 'nonexistent/model', '--out', tmp_path/'o', *([switch] if switch == '--debug' else []))
    assert e.value.__cause__ is not None  # kept, not dropped with `from None`

def test_debug_prints_the_traceback_through_the_console_script(console, tmp_path):
    r = console('sample', '--model', 'nonexistent/model', '--debug', '--out', tmp_path/'o')
    assert r.returncode == 1 and 'Traceback' in r.stderr and 'The above exception was the direct cause' in r.stderr, r.stderr[-800:]

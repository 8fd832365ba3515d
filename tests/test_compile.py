"""Compiled sampling (`--compile`, `compile=True`): the compile time is reported apart from the sampling time, the
images are the eager ones, and a backend that fails leaves one line and the eager UNet."""
import json
import pytest

@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory):
    "A model folder with a tiny UNet (16x16, one channel): seconds to compile, not the teacher's half minute."
    from diffusers import DDPMScheduler
    from diffprune.models import tiny_unet, save_model
    d = tmp_path_factory.mktemp('tiny')/'m'
    save_model(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), d)
    return d

def test_sample_compile_reports_compile_time_apart(cli, tiny_folder, tmp_path):
    r = cli('sample', '--model', tiny_folder, '--num', '3', '--sample-steps', '2', '--compile', '--out', tmp_path/'c')
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/'c'/'result.json').read_text())
    assert res['compile'] == 'default' and res['compiled'] and res['compile_s'] > 0
    assert 'ms per image; compiling took' in r.stdout

def test_failing_compiler_falls_back_to_eager_with_one_line(cli, tiny_folder, tmp_path, monkeypatch):
    "A backend that raises (as inductor does on a machine without a C++ compiler) costs one line, not the run."
    import torch
    def no_compiler(gm, example_inputs): raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
    real = torch.compile
    def broken(*args, **kw): return real(*args, **{**kw, 'backend': no_compiler})  # whatever backend is asked for
    eager = cli('sample', '--model', tiny_folder, '--num', '2', '--sample-steps', '2', '--out', tmp_path/'e')
    monkeypatch.setattr(torch, 'compile', broken)
    r = cli('sample', '--model', tiny_folder, '--num', '2', '--sample-steps', '2', '--compile', '--out', tmp_path/'c')
    assert eager.returncode == 0 and r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if 'torch.compile' in l]
    assert len(lines) == 1 and 'eagerly' in lines[0] and 'No working C++ compiler found' in lines[0], r.stderr
    res = json.loads((tmp_path/'c'/'result.json').read_text())
    assert res['compile_s'] == 0 and res['compiled'] is False
    assert (tmp_path/'c'/'samples.png').read_bytes() == (tmp_path/'e'/'samples.png').read_bytes()

def test_compile_mode_is_checked_before_any_work(cli, tmp_path):
    r = cli('sample', '--compile', 'fastest', '--out', tmp_path/'o')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and '--compile' in r.stderr, r.stderr
    assert not (tmp_path/'o').exists()

@pytest.mark.slow
def test_evaluate_compiled_matches_eager(tmp_path):
    "The digits teacher evaluated compiled and eager from the same seed: the same images, compile time apart."
    from diffprune.evaluation import evaluate
    kw = dict(num_samples=32, sample_steps=10, repeats=2, latency_batch=16, progress=False)
    e, c = evaluate('digits', **kw), evaluate('digits', compile=True, **kw)
    assert (c.samples - e.samples).abs().max() < 1e-4
    assert c.metrics['compile_s'] > 0 and 'compile_s' not in e.metrics
    assert c.settings['sampling_batch'] == 16

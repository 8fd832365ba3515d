"The same seed gives the same kept channels, samples and metrics on CPU: every subcommand run twice and compared."
import json
from pathlib import Path
import torch
from safetensors.torch import load_file

TIMING = {'seconds', 'latency_ms', 'sampling_ms', 'speedup', 'speedup_low', 'speedup_high', 'speedup_range', 'step_seconds', 'model'}  # wall clock, and the input's path

def strip(d):
    "A result without its wall-clock fields."
    if isinstance(d, dict): return {k: strip(v) for k, v in d.items() if k not in TIMING}
    if isinstance(d, list): return [strip(v) for v in d]
    return d

def result(folder): return strip(json.loads((Path(folder)/'result.json').read_text()))
def weights(folder): return load_file(Path(folder)/'unet'/'diffusion_pytorch_model.safetensors')
def same_weights(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_every_subcommand_twice_with_one_seed_gives_the_same_outputs(cli, tmp_path):
    runs = {
        'analyze': ['analyze', '--stride', '25', '--calibration-size', '8', '--seed', '5'],
        'prune': ['prune', '--method', 'diff-pruning', '--target-macs', '0.5', '--stride', '25', '--calibration-size', '8', '--seed', '5'],
    }
    for name, args in runs.items():
        for i in (1, 2): assert cli(*args, '--out', tmp_path/f'{name}{i}').returncode == 0
        assert result(tmp_path/f'{name}1') == result(tmp_path/f'{name}2'), name
    assert same_weights(weights(tmp_path/'prune1'), weights(tmp_path/'prune2'))
    for i in (1, 2):
        assert cli('finetune', '--model', tmp_path/'prune1', '--steps', '4', '--batch-size', '8', '--seed', '5',
                   '--out', tmp_path/f'ft{i}').returncode == 0
        assert cli('evaluate', '--model', tmp_path/f'ft{i}', '--teacher', 'digits', '--num-samples', '8',
                   '--sample-steps', '4', '--seed', '5',
                   '--out', tmp_path/f'ev{i}').returncode == 0
        assert cli('sample', '--model', tmp_path/'ft1', '--num', '4', '--sample-steps', '4', '--seed', '5', '--out', tmp_path/f's{i}').returncode == 0  # the title names the model
    assert same_weights(weights(tmp_path/'ft1'), weights(tmp_path/'ft2'))
    assert result(tmp_path/'ft1') == result(tmp_path/'ft2')
    assert result(tmp_path/'ev1') == result(tmp_path/'ev2')
    assert (tmp_path/'s1'/'samples.png').read_bytes() == (tmp_path/'s2'/'samples.png').read_bytes()
    # and another seed changes what is kept
    assert cli(*runs['prune'][:-1], '6', '--out', tmp_path/'prune3').returncode == 0
    assert not same_weights(weights(tmp_path/'prune1'), weights(tmp_path/'prune3'))

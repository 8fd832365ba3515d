"""Latent pipelines through the CLI: `diffprune prune` and `diffprune sample` on tiny offline pipelines saved to folders."""
import json
import pytest
from diffprune.latent import tiny_latent_pipeline, save_pipeline, load_pipeline, pipeline_images
from diffprune.sizes import count_params

@pytest.fixture(scope='module')
def pipes(tmp_path_factory):
    d = tmp_path_factory.mktemp('pipes')
    return {k: save_pipeline(tiny_latent_pipeline(k, tokenizer_dir=d/'tok'), d/k) for k in ('text', 'class')}

def test_prune_and_sample_text_pipeline(cli, pipes, tmp_path):
    r = cli('prune', '--model', pipes['text'], '--prompt', 'a digit', '--target-macs', '0.5', '--stride', '50',
            '--calibration-size', '8', '--calibration-steps', '3', '--out', tmp_path/'pruned')
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/'pruned'/'result.json').read_text())
    assert res['pipeline'] == 'StableDiffusionPipeline' and res['macs_after'] <= 0.5 * res['macs_before'] * 1.02
    m = res['pipeline_macs']  # the UNet's MACs shrink; the decoder and text encoder are untouched
    assert m['pruned']['unet (per step)'] < m['teacher']['unet (per step)']
    assert m['pruned']['decoder (once)'] == m['teacher']['decoder (once)'] and m['pruned']['text encoder (once)'] == m['teacher']['text encoder (once)']
    back = load_pipeline(tmp_path/'pruned')
    assert count_params(back.unet) == res['params_after'] and count_params(back.unet) < count_params(load_pipeline(pipes['text']).unet)
    # finetune on the teacher pipeline's latents (the folder records where it was pruned from), then sample through it
    r = cli('finetune', '--model', tmp_path/'pruned', '--prompt', 'a digit', '--steps', '3', '--batch-size', '4', '--num-latents', '8',
            '--calibration-steps', '3', '--out', tmp_path/'ft')
    assert r.returncode == 0, r.stderr
    ft = json.loads((tmp_path/'ft'/'result.json').read_text())
    assert ft['latents'] == 'teacher samples' and ft['num_latents'] == 8 and len(ft['history']) == 3
    tuned = load_pipeline(tmp_path/'ft')
    assert count_params(tuned.unet) == count_params(back.unet)
    assert any((p1 != p2).any() for p1, p2 in zip(tuned.unet.parameters(), back.unet.parameters())), "finetuning changed nothing"
    r = cli('sample', '--model', tmp_path/'ft', '--prompt', 'a digit', '--num', '2', '--sample-steps', '3', '--out', tmp_path/'s')
    assert r.returncode == 0, r.stderr
    assert (tmp_path/'s'/'samples.png').exists()
    r = cli('sample', '--model', tmp_path/'ft', '--spacing', 'quad', '--num', '2', '--out', tmp_path/'q')
    assert r.returncode == 2 and '--spacing' in r.stderr and not (tmp_path/'q').exists()  # its scheduler's own steps
    # the CLI's samples are the pipeline's own, seeded
    assert json.loads((tmp_path/'s'/'result.json').read_text())['shape'] == list(pipeline_images(tuned, 2, 3, prompt='a digit').shape[1:])

def test_class_pipeline_from_teacher_latents(cli, pipes, tmp_path):
    r = cli('prune', '--model', pipes['class'], '--class-labels', '3', '7', '--pruning-ratio', '0.3', '--stride', '50', '--calibration-size', '8',
            '--calibration-steps', '3', '--out', tmp_path/'pruned')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'pruned'/'result.json').read_text())['pipeline'] == 'ClassLatentPipeline'
    r = cli('sample', '--model', tmp_path/'pruned', '--class-labels', '1', '--num', '2', '--sample-steps', '3', '--out', tmp_path/'s')
    assert r.returncode == 0, r.stderr

@pytest.mark.parametrize('args, message', [
    (['prune', '--model', 'CLASS', '--class-labels', '12', '--pruning-ratio', '0.3'], 'class labels must be'),
    (['prune', '--model', 'TEXT', '--class-labels', '1', '--pruning-ratio', '0.3'], 'drop the class labels'),
    (['prune', '--model', 'TEXT', '--pruning-ratio', '0.3', '--calibration-steps', '0'], '--calibration-steps must be at least 1'),
    (['prune', '--model', 'digits', '--prompt', 'x', '--pruning-ratio', '0.3'], "prune takes a pixel model's labels from its data"),
    (['sample', '--model', 'CLASS', '--prompt', 'x'], 'drop the prompt'),
])
def test_bad_conditioning_is_one_line_exit_2(cli, pipes, tmp_path, args, message):
    args = [str(pipes['class']) if a == 'CLASS' else str(pipes['text']) if a == 'TEXT' else a for a in args]
    r = cli(*args, '--out', tmp_path/'o')
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path/'o').exists()

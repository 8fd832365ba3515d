"""Issue #31: a free-form pruned folder carries its own class (`diffprune.py`), so diffusers alone loads it with
`trust_remote_code=True`, locally and from a Hub repository, to the same bits as `load_model`; kept in step with the
library's classes."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest, torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
import diffprune
from diffprune.family import families, family_of
from diffprune.importance import ScoredModel, importance_criterion
from diffprune.latent import tiny_latent_pipeline, save_pipeline, prune_pipeline
from diffprune.models import REMOTE_CODE, REMOTE_CLASSES, load_model, save_model, load_denoiser, denoiser_folder
from diffprune.prune import prune_model
from diffprune.sizes import example_inputs
from diffprune.unet_depth import depth_units

def magnitude(model): return ScoredModel(model, DDPMScheduler(num_train_timesteps=1000), 'magnitude',
                                         importance_criterion('magnitude'))

def in_plain_diffusers(code: str, tmp: Path, **env) -> list:
    "Run `code` where diffprune cannot be imported (as where it is not installed); its printed lines."
    code = "import sys; sys.modules['diffprune'] = None\nimport torch, json\n" + code
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'HF_MODULES_CACHE': str(tmp/'modules'), **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split('\n')

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    "A pruned pipeline folder of every kind whose class the file ships: `{name: folder}`."
    d, out = tmp_path_factory.mktemp('remote'), {}
    teacher, sched = load_model('digits')
    units = [u.name for u in depth_units(teacher)]  # a ResNet pair (layers cut from lists) and the mid-block
    for name, kw in {'unet-width': dict(target_macs=0.6), 'unet-depth': dict(remove_units=units)}.items():
        save_model(prune_model(magnitude(teacher), **kw).denoiser, sched, d/name)
        out[name] = d/name
    for kind in ('text', 'dit', 'pixart', 'sd3', 'flux', 'sana'):
        pipe = tiny_latent_pipeline(kind, tokenizer_dir=d/'tok')
        cond = dict(class_labels=[1, 2]) if kind == 'dit' else dict(prompts='a photo of a cat')
        pruned, _, _ = prune_pipeline(pipe, calibration_size=2, calibration_steps=1, method='magnitude',
                                      target_macs=0.6, removes='width' if kind == 'text' else 'both',
                                      progress=False, **cond)
        save_pipeline(pruned, d/kind)
        out[kind] = d/kind
    return out

def test_the_shipped_file_defines_the_pruned_class_of_every_family_with_a_diffusers_pipeline():
    "Kept in step with the library: one class per pruned class whose folder diffusers' own pipeline loads."
    ours = {c.__name__ for f in families() for c in f.pruned.values()}
    assert set(REMOTE_CLASSES) <= ours and 'PrunedClassSD3Transformer2DModel' not in REMOTE_CLASSES
    assert ours - set(REMOTE_CLASSES) == {'PrunedClassSD3Transformer2DModel'}  # diffprune's own class, own pipeline
    text = REMOTE_CODE.read_text()
    imported = set(re.findall(r'^(?:from|import) (\w+)', text, re.M))
    assert imported <= {'json', 'shutil', 'pathlib', 'torch', 'diffusers', 'safetensors', 'huggingface_hub'}, imported
    assert max(len(l) for l in text.splitlines()) <= 120 and len(text.splitlines()) < 150  # small and readable

def test_every_pruned_folder_loads_with_diffusers_alone_bit_for_bit(folders, tmp_path):
    inputs, expected, jobs = {}, {}, []
    for name, folder in folders.items():
        part = denoiser_folder(folder)
        assert (part/'diffprune.py').read_text() == REMOTE_CODE.read_text(), name
        assert json.loads((part/'config.json').read_text())['auto_map']['AutoModel'].startswith('diffprune.Pruned')
        ref = load_denoiser(part)
        x = example_inputs(ref, 2)
        torch.save(x, tmp_path/f'{name}-in.pt')  # tensors and PixArt's dict of them (None values)
        with torch.no_grad(): expected[name] = ref(**x)[0]
        jobs.append((name, str(folder), part.name))
    lines = in_plain_diffusers(f"""
from diffusers import DiffusionPipeline, AutoModel
from safetensors.torch import load_file, save_file
for name, folder, part in {jobs!r}:
    x = torch.load({str(tmp_path)!r} + f'/{{name}}-in.pt', weights_only=True)
    models = [AutoModel.from_pretrained(folder + '/' + part, trust_remote_code=True),
              getattr(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), part)]
    with torch.no_grad(): outs = [m(**x)[0].contiguous() for m in models]
    models[0].save_pretrained({str(tmp_path)!r} + f'/{{name}}-again')  # saved again by the folder's own class
    save_file({{str(i): o for i, o in enumerate(outs)}}, {str(tmp_path)!r} + f'/{{name}}-out.safetensors')
    print(name, *[type(m).__name__ for m in models])
""", tmp_path)
    for name in folders:
        got = load_file(tmp_path/f'{name}-out.safetensors')
        assert len(got) == 2 and all(torch.equal(o, expected[name]) for o in got.values()), name
    assert sum(l.startswith(tuple(folders)) for l in lines) == len(folders), lines
    for name, folder in folders.items():  # what adapters read survives a save by the folder's own class
        first, again = denoiser_folder(folder), tmp_path/f'{name}-again'
        records = lambda f: {k: v for k, v in json.loads((f/'config.json').read_text()).items()  # noqa: E731
                             if k.startswith('_diffprune')}
        assert records(again) == records(first), name
        assert json.loads((again/'diffprune.json').read_text()) == json.loads((first/'diffprune.json').read_text())
    assert '_diffprune_kept_layers' in records(tmp_path/'unet-depth-again')  # a depth record among them

def test_a_hub_repository_loads_with_diffusers_alone_and_saves_again(folders, tmp_path):
    "From a Hub repository (a local stand-in: the Hub cache, offline), then saved by diffusers and loaded again."
    folder = folders['unet-width']
    rev, cache = 'a' * 40, tmp_path/'hub'
    repo = cache/'models--someone--digits-pruned'
    shutil.copytree(folder, repo/'snapshots'/rev)
    (repo/'refs').mkdir()
    (repo/'refs'/'main').write_text(rev)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 500])
    lines = in_plain_diffusers(f"""
from diffusers import DiffusionPipeline
x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 500])
try: DiffusionPipeline.from_pretrained('someone/digits-pruned')
except ValueError as e: print('refused:', 'trust_remote_code=True' in str(e))
pipe = DiffusionPipeline.from_pretrained('someone/digits-pruned', trust_remote_code=True)
pipe.save_pretrained({str(tmp_path/'again')!r})  # diffusers' own save, as a user who edits the pipeline does
again = DiffusionPipeline.from_pretrained({str(tmp_path/'again')!r}, trust_remote_code=True)
with torch.no_grad(): print(torch.equal(pipe.unet(x, t).sample, again.unet(x, t).sample))
""", tmp_path, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1')
    assert lines[:2] == ['refused: True', 'True'], lines
    assert json.loads((tmp_path/'again'/'model_index.json').read_text())['unet'] == ['diffprune', 'PrunedUNet2DModel']
    ref = load_model(folder)[0]
    with torch.no_grad(): assert torch.equal(load_model(tmp_path/'again')[0](x, t).sample, ref(x, t).sample)

def test_an_unpruned_folder_ships_no_code_and_a_folder_saved_over_loses_it(folders, tmp_path):
    teacher, sched = load_model('digits')
    save_model(teacher, sched, tmp_path/'t')
    assert not (tmp_path/'t'/'unet'/'diffprune.py').exists()
    assert 'auto_map' not in json.loads((tmp_path/'t'/'unet'/'config.json').read_text())
    dit, sched = load_model('digits-dit')  # its pipeline is diffprune's own (ClassPixelPipeline), which loads it
    save_model(prune_model(magnitude(dit), target_macs=0.5, removes='both').denoiser, sched, tmp_path/'dit')
    assert not (tmp_path/'dit'/'transformer'/'diffprune.py').exists()
    from diffprune.transformer import ClassPixelPipeline, PrunedDiTTransformer2DModel
    assert type(ClassPixelPipeline.from_pretrained(tmp_path/'dit').transformer) is PrunedDiTTransformer2DModel
    shutil.copytree(folders['unet-width']/'unet', tmp_path/'u')
    diffprune.models.save_denoiser(teacher, tmp_path/'u')  # an unpruned model written over a pruned one
    assert not (tmp_path/'u'/'diffprune.py').exists()

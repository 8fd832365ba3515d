"""Issue #17: every folder diffprune writes loads through diffusers' own entry points, bit for bit as `load_model`
loads it, and plain diffusers without diffprune refuses a pruned folder with a line that names diffprune."""
import json, subprocess, sys
import pytest, torch
from diffusers import DDPMPipeline, DDIMPipeline, DiffusionPipeline, StableDiffusionPipeline, LDMPipeline
import diffprune
from diffprune import quiet_loading
from diffprune.models import load_model, save_model, tiny_unet, is_pruned
from diffprune.latent import tiny_latent_pipeline, prune_pipeline, save_pipeline, load_pipeline

def same_output(a, b, **cond) -> bool:
    c = a.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    x, t = torch.randn(2, c.in_channels, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 500])
    with torch.no_grad(): return torch.equal(a(x, t, **cond).sample, b(x, t, **cond).sample)

def test_a_pruned_pixel_folder_loads_through_every_diffusers_entry_point(pruned):
    ref, _ = load_model(pruned)
    assert is_pruned(ref) and json.loads((pruned/'model_index.json').read_text())['unet'] == ['diffprune', 'PrunedUNet2DModel']
    for cls in (DiffusionPipeline, DDPMPipeline, DDIMPipeline):
        with quiet_loading(): pipe = cls.from_pretrained(pruned)
        assert type(pipe.unet).__name__ == 'PrunedUNet2DModel' and same_output(pipe.unet, ref), cls.__name__
    assert same_output(diffprune.PrunedUNet2DModel.from_pretrained(pruned, subfolder='unet'), ref)

def test_an_unpruned_folder_stays_a_plain_diffusers_folder(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel
    save_model(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), tmp_path/'m')
    assert json.loads((tmp_path/'m'/'model_index.json').read_text())['unet'] == ['diffusers', 'UNet2DModel']
    assert same_output(UNet2DModel.from_pretrained(tmp_path/'m', subfolder='unet'), load_model(tmp_path/'m')[0])

@pytest.mark.parametrize('kind, cls', [('text', StableDiffusionPipeline), ('unconditional', LDMPipeline)])
def test_a_pruned_latent_pipeline_loads_through_its_own_diffusers_class(kind, cls, tmp_path):
    pipe = tiny_latent_pipeline(kind, tokenizer_dir=tmp_path/'tok')
    prompts = 'a digit' if kind == 'text' else None
    pp, _, _ = prune_pipeline(pipe, calibration_size=4, stride=200, target_macs=0.6, calibration_steps=2,
                              prompts=prompts, progress=False)
    save_pipeline(pp, tmp_path/kind)
    ref = load_pipeline(tmp_path/kind).unet
    with quiet_loading(): loaded = cls.from_pretrained(tmp_path/kind).unet
    cond = dict(encoder_hidden_states=torch.randn(2, 4, ref.config.cross_attention_dim)) if kind == 'text' else {}
    assert is_pruned(loaded) and same_output(loaded, ref, **cond)

def test_without_diffprune_diffusers_refuses_a_pruned_folder_naming_diffprune(pruned):
    "No route builds the config's widths and fills them with random weights, even with diffusers' own advice."
    code = f"""
import sys; sys.modules['diffprune'] = None  # as if not installed
from diffusers import DDPMPipeline, UNet2DModel
for load in (lambda: DDPMPipeline.from_pretrained({str(pruned)!r}),
             lambda: UNet2DModel.from_pretrained({str(pruned)!r}, subfolder='unet', low_cpu_mem_usage=False,
                                                 ignore_mismatched_sizes=True)):
    try: load(); print('LOADED')
    except Exception as e: print(type(e).__name__, 'diffprune' in str(e))
"""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300).stdout.split('\n')
    assert out[:2] == ['ValueError True', 'ValueError True'], out

def test_a_saved_folder_carries_a_hub_model_card(pruned):
    card = (pruned/'README.md').read_text()
    head = card.split('---')[1]
    assert 'library_name: diffusers' in head and '- diff-pruning' in head and 'pipeline_tag: unconditional-image-generation' in head
    assert 'base_model' not in head  # the shipped teacher is no hub id
    assert '| method | magnitude |' in card and '| params |' in card and 'import diffprune' in card

class StandIn:
    "huggingface_hub's HfApi as far as push_to_hub uses it, writing the repository to a local folder."
    def __init__(self, root): self.root, self.calls = root, []
    def create_repo(self, repo_id, **kw): self.calls.append(('create_repo', repo_id, kw))
    def upload_folder(self, repo_id, folder_path, **kw):
        import shutil
        self.calls.append(('upload_folder', repo_id, kw))
        shutil.copytree(folder_path, self.root/repo_id)

def test_push_uploads_the_folder_and_its_card_through_huggingface_hub_and_it_loads_back(pruned, tmp_path, monkeypatch):
    import shutil
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)  # the stand-in is local; a real push needs the network
    from diffprune.models import push_to_hub
    folder = tmp_path/'m'
    shutil.copytree(pruned, folder)
    hub = StandIn(tmp_path/'hub')
    assert push_to_hub(folder, 'someone/digits-pruned', private=True, api=hub) == 'https://huggingface.co/someone/digits-pruned'
    assert [c[0] for c in hub.calls] == ['create_repo', 'upload_folder'] and hub.calls[0][2]['private']
    repo = tmp_path/'hub'/'someone'/'digits-pruned'
    assert "from_pretrained('someone/digits-pruned')" in (repo/'README.md').read_text()
    with quiet_loading(): pipe = DiffusionPipeline.from_pretrained(repo)  # what a user who downloads it gets
    assert same_output(pipe.unet, load_model(pruned)[0])

def test_push_refuses_in_one_line_what_cannot_work(cli, pruned, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    r = cli('push', pruned, 'someone/x')
    assert r.returncode == 2 and 'HF_HUB_OFFLINE is set' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.delenv('HF_HUB_OFFLINE')
    monkeypatch.setenv('HF_TOKEN', '')
    monkeypatch.setenv('HF_HOME', str(tmp_path/'hf'))  # no stored token either
    r = cli('push', pruned, 'someone/x')
    assert r.returncode == 2 and 'no Hugging Face token' in r.stderr
    r = cli('push', tmp_path, 'someone/x')
    assert r.returncode == 2 and 'not a model folder' in r.stderr

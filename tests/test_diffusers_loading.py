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
    "diffprune is imported here: diffusers takes its class, flag or not; without diffprune, see test_remote_code.py."
    ref, _ = load_model(pruned)
    assert is_pruned(ref) and json.loads((pruned/'model_index.json').read_text())['unet'] == ['diffprune', 'PrunedUNet2DModel']
    for cls in (DiffusionPipeline, DDPMPipeline, DDIMPipeline):
        for flag in ({}, dict(trust_remote_code=True)):
            with quiet_loading(): pipe = cls.from_pretrained(pruned, **flag)
            assert type(pipe.unet) is diffprune.PrunedUNet2DModel and same_output(pipe.unet, ref), (cls.__name__, flag)
    assert same_output(diffprune.PrunedUNet2DModel.from_pretrained(pruned, subfolder='unet'), ref)
    with quiet_loading(): pipe = DDPMPipeline.from_pretrained(pruned, unet=load_model(pruned)[0])  # code not run
    assert same_output(pipe.unet, ref) and same_output(load_pipeline(pruned).unet, ref)

@pytest.mark.parametrize('first', ['diffprune', 'diffusers'])
def test_after_import_diffprune_diffusers_loads_a_pruned_folder_without_running_its_file(pruned, first):
    "In either import order, as before #31: diffusers finds `diffusers.pipelines.diffprune` before the folder's file."
    imports = ['import diffprune', 'from diffusers import DiffusionPipeline']
    code = '\n'.join(imports if first == 'diffprune' else imports[::-1]) + f"""
import sys
pipe = DiffusionPipeline.from_pretrained({str(pruned)!r})
print(type(pipe.unet).__name__, sorted(m for m in sys.modules if m.startswith('diffusers_modules')))"""
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split('\n')[-2] == 'PrunedUNet2DModel []'  # diffprune's class; the folder's file not imported

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
    with quiet_loading(): loaded = cls.from_pretrained(tmp_path/kind, trust_remote_code=True).unet
    cond = dict(encoder_hidden_states=torch.randn(2, 4, ref.config.cross_attention_dim)) if kind == 'text' else {}
    assert type(loaded).__name__ == type(ref).__name__ and same_output(loaded, ref, **cond)

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

def test_a_saved_folder_carries_a_hub_model_card_with_valid_metadata(pruned, tmp_path):
    from huggingface_hub import ModelCard
    from diffprune.hub import hub_card
    card = ModelCard((pruned/'README.md').read_text())  # the Hub's own parser
    assert card.data.library_name == 'diffusers' and card.data.pipeline_tag == 'unconditional-image-generation'
    assert 'pruning' in card.data.tags and 'diff-pruning' not in card.data.tags  # pruned by magnitude
    assert card.data.base_model is None  # the shipped teacher is no hub id
    assert '| method | magnitude |' in card.text and '| params |' in card.text and 'trust_remote_code=True' in card.text
    from diffprune.models import load_model, block_widths
    widths = block_widths(load_model(pruned)[0])  # the card's widths are the pruned UNet's, e.g. '24, 24 of 32'
    assert all(f'| widths {b} | {w} |' in card.text for b, w in widths.items()) and len(widths) >= 3
    assert any(int(w.split(' of ')[0].split(', ')[0]) < int(w.split(' of ')[1]) for w in widths.values())  # narrowed
    odd = ModelCard(hub_card(dict(source='x/y: z #c', prune=dict(method='diff-pruning')), pruned=True))
    assert odd.data.base_model is None and 'diff-pruning' in odd.data.tags  # an odd name is no base_model
    assert ModelCard(hub_card(dict(source='google/ddpm-cifar10-32'), pruned=False)).data.base_model == 'google/ddpm-cifar10-32'

class StandIn:
    "huggingface_hub's HfApi as far as push_to_hub uses it, writing the repository to a local folder."
    def __init__(self, root): self.root, self.calls = root, []
    def create_repo(self, repo_id, **kw): self.calls.append(('create_repo', repo_id, kw))
    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(('create_commit', repo_id, kw))
        for op in operations:
            dest = self.root/repo_id/op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = op.path_or_fileobj
            dest.write_bytes(src if isinstance(src, bytes) else open(src, 'rb').read())

def test_push_uploads_the_folder_and_its_card_through_huggingface_hub_and_it_loads_back(pruned, tmp_path, monkeypatch):
    import shutil
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)  # the stand-in is local; a real push needs the network
    from diffprune.hub import push_to_hub
    folder = tmp_path/'m'
    shutil.copytree(pruned, folder)
    hub = StandIn(tmp_path/'hub')
    assert push_to_hub(folder, 'someone/digits-pruned', private=True, api=hub) == 'https://huggingface.co/someone/digits-pruned'
    (folder/'checkpoints').mkdir()
    (folder/'checkpoints'/'state.safetensors').write_bytes(b'x')
    assert push_to_hub(folder, 'someone/digits-pruned', api=hub)
    assert [c[0] for c in hub.calls] == ['create_repo', 'create_commit'] * 2 and hub.calls[0][2]['private']
    repo = tmp_path/'hub'/'someone'/'digits-pruned'
    assert "from_pretrained('someone/digits-pruned', trust_remote_code=True)" in (repo/'README.md').read_text()
    assert 'THIS_REPO' in (folder/'README.md').read_text() and not (repo/'checkpoints').exists()
    with quiet_loading(): pipe = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)  # as from the Hub
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
    r = cli('push', pruned, 'bad id!!')
    assert r.returncode == 2 and 'not a Hub repository id' in r.stderr

def test_a_pruned_pipeline_saved_again_by_diffusers_loads_again(pruned, tmp_path):
    with quiet_loading(): pipe = DDPMPipeline.from_pretrained(pruned, unet=load_model(pruned)[0])
    pipe.save_pretrained(tmp_path/'again')  # diffusers' own save, as a user who edits the pipeline does
    assert json.loads((tmp_path/'again'/'model_index.json').read_text())['unet'] == ['diffprune', 'PrunedUNet2DModel']
    with quiet_loading(): again = DiffusionPipeline.from_pretrained(tmp_path/'again', trust_remote_code=True)
    assert same_output(again.unet, load_model(pruned)[0])

def test_from_pretrained_takes_a_dtype_by_name_and_refuses_what_it_cannot_do(pruned):
    u = diffprune.PrunedUNet2DModel.from_pretrained(pruned, subfolder='unet', torch_dtype='float64')
    assert next(u.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match='loads without quantization_config'):
        diffprune.PrunedUNet2DModel.from_pretrained(pruned, subfolder='unet', quantization_config=object())
    with pytest.raises(ValueError, match="loads whole on one device: device_map='cuda' or 'cpu', not 'auto'"):
        diffprune.PrunedUNet2DModel.from_pretrained(pruned, subfolder='unet', device_map='auto')

def test_an_unpruned_unet_is_not_taken_for_a_pruned_one():
    from diffusers import UNet2DConditionModel
    u = tiny_unet(head_dim=8)
    next(m for m in u.modules() if hasattr(m, 'scale_qk')).scale = 0.5  # a scale is no width
    sd = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                              cross_attention_dim=8, attention_head_dim=4,
                              down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                              up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
    sd.fuse_qkv_projections()  # an inference optimisation, not pruning
    assert not is_pruned(u) and not is_pruned(sd) and not is_pruned(torch.compile(tiny_unet()))

def test_a_folder_written_by_diffprune_0_1_still_loads(pruned, tmp_path):
    "0.1 kept the widths only in unet/diffprune.json, with the diffusers class name and the real block types."
    import shutil
    old = tmp_path/'old'
    shutil.copytree(pruned, old)
    cfg = json.loads((old/'unet'/'config.json').read_text())
    record = cfg.pop('_diffprune')
    cfg.update(record['config'], _class_name='UNet2DModel')
    (old/'unet'/'config.json').write_text(json.dumps(cfg))
    (old/'unet'/'diffprune.json').write_text(json.dumps(dict(format=1, structure=record['structure'])))
    assert same_output(load_model(old)[0], load_model(pruned)[0])

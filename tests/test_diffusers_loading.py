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

"""Offline stand-ins for the flow-matching pipelines of issue #29: tiny SD3, Flux and Sana pipelines built in code (small
CLIP, T5 and Gemma encoders, word-level tokenizers), run through diffusers' own pipeline classes. Each has a
family (tests/test_flow_transformers.py)."""
import numpy as np, pytest, torch
from diffusers import DiffusionPipeline
from diffprune.latent import tiny_latent_pipeline
from diffprune.models import is_flow

@pytest.mark.parametrize('kind,cls', [('sd3', 'StableDiffusion3Pipeline'), ('flux', 'FluxPipeline'),
                                      ('sana', 'SanaPipeline')])
def test_a_tiny_flow_pipeline_samples_offline_and_reloads(kind, cls, tmp_path):
    pipe = tiny_latent_pipeline(kind)
    assert type(pipe).__name__ == cls and is_flow(pipe.scheduler)
    side = 32 if kind == 'sana' else 16  # Sana's pipeline takes sides in multiples of 32
    extra = dict(complex_human_instruction=None, use_resolution_binning=False) if kind == 'sana' else {}
    def images(p):
        p.set_progress_bar_config(disable=True)
        return p('a digit', num_inference_steps=2, height=side, width=side, output_type='np', max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), **extra).images
    first = images(pipe)
    assert first.shape == (1, side, side, 3) and np.isfinite(first).all()
    pipe.save_pretrained(tmp_path/'p')
    np.testing.assert_allclose(images(DiffusionPipeline.from_pretrained(tmp_path/'p')), first, atol=1e-5)  # float order

"""Memory of scoring and finetuning FLUX.1-dev and SD3.5 Large: small configs measured here, scaled to the real ones.

What a pass holds besides the parameters is what autograd saves for the backward pass (the activations). It is
measured exactly here, tensor by tensor (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once), on
Flux- and SD3-shaped transformers with the real head widths (Flux 128, SD3 64), few heads and few blocks, a few
hundred tokens and `--images` images, fp32, for Diff-Pruning's loss (the flow objective's noise error, 01a).

How it scales. Saved bytes are fitted as `images x tokens x width x (a x double or joint blocks + b x single blocks)`
plus a constant over the measured configs (`fit_error` says how well), and carried to the real width, block counts
and tokens (1024 px: 4096 image tokens, with 512 T5 tokens for Flux and 333 CLIP+T5 tokens for SD3), at half the
size in bf16. With activation checkpointing (diffusers' `enable_gradient_checkpointing`) a block keeps only its
inputs (both streams: tokens x width) and one block's saved tensors are rebuilt at a time; that is how `+ckpt` is
computed, not measured. Parameter memory is bytes per parameter times parameters: scoring holds bf16 weights and
gradients and fp32 sums of the gradients over timesteps (8 bytes a parameter, exact and fast mode alike: fast mode
saves passes, not memory); finetuning as diffprune runs it with Accelerate's bf16 mixed precision holds fp32
weights, gradients, AdamW moments and EMA (20 bytes a parameter), plus a bf16 teacher for distillation. A GPU
"fits" a phase with 10% to spare. These are estimates from CPU measurements, not GPU measurements.

    python bench/flow_memory.py           # about a minute on two CPU cores
    python bench/flow_memory.py --quick   # seconds: the plumbing, not the result
"""
import numpy as np, torch
from common import parser, write, table

REAL = {  # the models scaled to: width, blocks (double or joint, single), parameters, tokens at 1024 px (image, text)
    'FLUX.1-dev': dict(family='flux', width=3072, blocks=(19, 38), params=11.9e9, tokens=4096 + 512),
    'SD3.5 Large': dict(family='sd3', width=2432, blocks=(38, 0), params=8.1e9, tokens=4096 + 333),
}
GPUS = {'24 GB': 24, '80 GB (H100)': 80, '141 GB (H200)': 141}

def build(family:str, heads:int, blocks:tuple):
    "A small transformer of `family` with the real head width, `heads` heads and `blocks` (double/joint, single)."
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(0)
    if family == 'flux':
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1],
                                      attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096,
                                      pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=blocks[0],
                                 attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=4096,
                                 caption_projection_dim=heads * 64, pooled_projection_dim=2048, pos_embed_max_size=32,
                                 qk_norm='rms_norm')

def saved_mib(model, family:str, images:int, text:int) -> float:
    "MiB autograd saves for the backward pass of Diff-Pruning's loss on `images` images (each storage counted once)."
    from diffprune.family import family_of
    from diffprune.diffusion import eps_loss
    from diffusers import FlowMatchEulerDiscreteScheduler
    g, c = torch.Generator().manual_seed(0), model.config
    x0 = torch.randn(images, *(family_of(model).sample_shape(model) if family == 'sd3' else (16, 32, 32)), generator=g)
    cond = dict(encoder_hidden_states=torch.randn(images, text, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(images, c.pooled_projection_dim, generator=g))
    seen = {}
    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = eps_loss(model, FlowMatchEulerDiscreteScheduler(shift=3.0), x0, torch.randn(x0.shape, generator=g),
                        torch.full((images,), 500), cond=cond)
    loss.backward()
    return sum(seen.values()) / 2**20

def measure(family:str, heads:int, blocks:tuple, images:int, text:int) -> dict:
    "Saved MiB of one small config, and its parameters and tokens."
    model = build(family, heads, blocks).train()
    return dict(family=family, width=heads * (128 if family == 'flux' else 64), blocks=list(blocks), images=images,
                tokens=32 * 32 // 4 + text,  # 16x16 latents of 16 channels in 2x2 patches (SD3) or packed (Flux)
                params=sum(p.numel() for p in model.parameters()), saved_mib=saved_mib(model, family, images, text))

def fit(rows:list) -> dict:
    "`a`, `b` (saved MiB per image x token x width x block, by kind), `c` (MiB per image x token), relative error."
    X = np.array([[r['images'] * r['tokens'] * r['width'] * r['blocks'][0],
                   r['images'] * r['tokens'] * r['width'] * r['blocks'][1], r['images'] * r['tokens']] for r in rows])
    y, used = np.array([r['saved_mib'] for r in rows]), X.any(0)
    coef = np.zeros(3)
    coef[used] = np.linalg.lstsq(X[:, used], y, rcond=None)[0]
    err = float(np.max(np.abs(X @ coef - y) / y))
    return dict(a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), fit_error=err)

def estimate(fits:dict, images:int=1) -> list:
    """GiB each phase needs for the real models in bf16, and the GPUs of `GPUS` it fits on (with 10% to spare).
    Scoring is of the teacher; finetuning of the whole model, and of a student pruned to half its parameters (its
    activations taken as the teacher's: the residual width stays), alone or with a bf16 teacher to distil from."""
    rows = []
    for name, m in REAL.items():
        f, P, n, w = fits[m['family']], m['params'], images * m['tokens'], m['width']
        per_block = (f['a'], f['b'])
        full = (n * w * sum(k * nb for k, nb in zip(per_block, m['blocks'])) + f['c'] * n) / 2 / 1024  # GiB, bf16
        kept = (n * w * sum(m['blocks']) * 2 / 2**30  # each block's inputs (image and text tokens), bf16
                + n * w * max(per_block) / 2 / 1024 + f['c'] * n / 2 / 1024)  # one block rebuilt at a time
        for phase, per, share, distil in [('score', 8, 1., False), ('finetune all', 20, 1., False),
                                          ('finetune half', 20, .5, False),
                                          ('finetune half +distillation', 20, .5, True)]:
            for ckpt, act in ((False, full), (True, kept)):
                params = (per * share * P + (2 * P if distil else 0)) / 2**30
                rows.append(dict(model=name, phase=phase + (' +ckpt' if ckpt else ''), images=images, params_gib=params,
                                 activations_gib=act, total_gib=params + act,
                                 fits=', '.join(g for g, cap in GPUS.items() if params + act <= 0.9 * cap) or 'none'))
    return rows

def configs(quick:bool) -> list:
    "`(family, heads, blocks)` measured: two widths, and block counts that separate Flux's two kinds."
    if quick: return [('flux', 1, (1, 1)), ('flux', 1, (1, 2)), ('sd3', 1, (2, 0)), ('sd3', 1, (3, 0))]
    return [('flux', 2, (1, 2)), ('flux', 2, (2, 2)), ('flux', 2, (1, 4)), ('flux', 4, (1, 2)),
            ('sd3', 4, (2, 0)), ('sd3', 4, (4, 0)), ('sd3', 8, (2, 0))]

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--images', type=int, default=2, help="images per pass measured")
    a = p.parse_args()
    text = 16 if a.quick else 128
    rows = []
    for family, heads, blocks in configs(a.quick):
        rows.append(measure(family, heads, blocks, a.images, text))
        print(table(rows[-1:], ['family', 'width', 'blocks', 'tokens', 'params', 'saved_mib']), flush=True)
    fits = {family: fit([r for r in rows if r['family'] == family]) for family in ('flux', 'sd3')}
    est = estimate(fits)
    print(table([dict(family=k, **v) for k, v in fits.items()], ['family', 'a', 'b', 'c', 'fit_error']))
    print(table(est, ['model', 'phase', 'params_gib', 'activations_gib', 'total_gib', 'fits']))
    write(a.out, 'flow_memory' + ('_quick' if a.quick else ''), dict(rows=rows, fits=fits, estimates=est,
                                                                   gpus=GPUS, real=REAL, args=vars(a)))

"""What each process holds when scoring and finetuning are sharded (issue #32): weights, gradients, AdamW's moments,
the EMA weights and a distillation teacher, counted on a transformer alone (unsharded) and on two CPU processes
(FSDP2 through diffprune's `shard_model`), then scaled by parameter count to the largest denoisers on 1, 2 and 8 GPUs.

Counted: every tensor's local storage (a shard's `to_local()`), each storage once, as bytes per parameter of the whole
model. Not in the table, and on top: activations (they depend on resolution and batch, not on sharding: counted below
per image on this transformer, and bench/memory.py measures the peak of a UNet's), and the unit being computed, gathered whole for its forward and backward (one block, or
the root's unit with the embeddings and each list's first block). On CUDA (bench/gpu.sh) a FLUX.1-wide transformer of
three blocks is counted in one process and the count is checked against `torch.cuda.memory_allocated`. Activations
are counted once, alone, per image, with and without diffusers' gradient checkpointing (`finetune(...,
gradient_checkpointing=True)`): the bytes autograd keeps for backward.

    python bench/fsdp_memory.py                 # about a minute on two CPU cores
    python bench/fsdp_memory.py --quick         # a tinier transformer, seconds
    python bench/fsdp_memory.py --device cuda   # bench/gpu.sh: the FLUX.1-wide check on one GPU
"""
import copy, json, os, subprocess, sys, tempfile
from pathlib import Path
import torch
from common import parser, write, table

# parameters of the denoisers (diffusers' configs): the UNet or transformer only, no text encoders or VAE
MODELS = {'SD 1.5 UNet': 0.86e9, 'SDXL UNet': 2.57e9, 'SD3.5 Medium': 2.47e9, 'SD3.5 Large': 8.06e9,
          'FLUX.1-dev': 11.9e9}
GPU_GB = 80

def held(tensors) -> int:
    "Bytes of the distinct storages behind `tensors` (a shard counts its local part)."
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, 'to_local') else t
        s = t.untyped_storage()
        if s.data_ptr() in seen or not s.nbytes(): continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total

def model(quick:bool, device):
    torch.manual_seed(0)
    if torch.device(device).type == 'cuda':  # FLUX.1-dev's widths (24 heads of 128, 4096-wide text), 1 + 2 blocks
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
                                      joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64)
    from diffusers import DiTTransformer2DModel
    from diffprune.models import dit_config
    return DiTTransformer2DModel(**dit_config(heads=4, head_dim=16 if quick else 48, layers=2 if quick else 6))

def saved_bytes(net, x:dict, checkpointing:bool) -> int:
    "Bytes autograd keeps for backward through one forward of `x`: the activations (distinct storages, weights not)."
    (net.enable_gradient_checkpointing if checkpointing else net.disable_gradient_checkpointing)()
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights: kept[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net.train()(**x)[0].float().pow(2).mean()
    loss.backward()
    net.zero_grad(set_to_none=True)
    return sum(kept.values())

def measure(quick:bool, device) -> dict:
    "Bytes per parameter this process holds at each stage (its shards where several processes run)."
    from diffprune.distributed import processes, shard_model
    from diffprune.sizes import example_inputs
    rank, world = processes()
    net = model(quick, 'cpu' if world > 1 else device)
    n = sum(p.numel() for p in net.parameters())
    batch = 4
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in example_inputs(net, batch).items()}
    acts = {} if world > 1 else {  # activations do not shard: counted alone, per image
        f'activations per image{" (checkpointed)" if c else ""}': saved_bytes(net.to(device), x, c) / batch
        for c in (False, True)}
    net.disable_gradient_checkpointing()
    place = (lambda m: shard_model(m, device)) if world > 1 else (lambda m: m.to(device))
    work, ema, teacher = place(copy.deepcopy(net)), place(copy.deepcopy(net)), place(copy.deepcopy(net))
    teacher.requires_grad_(False)
    work(**x)[0].float().pow(2).mean().backward()  # the gradients are what any loss leaves: one per parameter
    params, grads = list(work.parameters()), [p.grad for p in work.parameters()]
    opt = torch.optim.AdamW(work.parameters(), 1e-4)
    opt.step()  # AdamW's moments exist after the first step
    moments = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    stages = {'scoring (weights, gradients)': held(params + grads),
              'finetuning (+ AdamW, EMA)': held(params + grads + moments + list(ema.parameters())),
              'finetuning + distillation': held(params + grads + moments + list(ema.parameters())
                                                + list(teacher.parameters()))}
    out = dict(params=n, processes=world, bytes_per_param={k: v / n for k, v in stages.items()}, activation_bytes=acts)
    if torch.device(device).type == 'cuda':  # the count against the allocator's (less what is not ours)
        out['allocated_per_param'] = torch.cuda.memory_allocated() / n
    return out

def scaled(bpp:dict) -> list:
    "GB per GPU of each stage's state for each model on 1, 2 and 8 GPUs, the state sharded evenly."
    rows = []
    for name, n in MODELS.items():
        for stage, b in bpp.items():
            row = dict(model=name, stage=stage)
            for g in (1, 2, 8):
                gb = b * n / g / 1e9
                row[f'{g} GPU'] = f"{gb:.0f} GB" + ('' if gb < GPU_GB else ' (no)')
            rows.append(row)
    return rows

def main():
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--device', default='cpu')
    p.add_argument('--worker', help='(internal) run one process, writing its count here')
    a = p.parse_args()
    if a.worker:  # one process of a run, under torchrun
        r = measure(a.quick, a.device)
        if r['processes'] == 1 or int(os.environ.get('RANK', 0)) == 0: Path(a.worker).write_text(json.dumps(r))
        return
    runs, tmp = {}, Path(tempfile.mkdtemp())
    counts = (1,) if a.device == 'cuda' else (1, 2)
    for n in counts:
        cmd = ([str(Path(sys.executable).parent/'torchrun'), '--standalone', '--nproc_per_node', str(n)]
               if n > 1 else [sys.executable])
        extra = ['--quick'] if a.quick else []
        subprocess.run(cmd + [__file__, '--worker', str(tmp/f'{n}.json'), '--device', a.device, *extra], check=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
        runs[n] = json.loads((tmp/f'{n}.json').read_text())
    bpp = runs[1]['bytes_per_param']
    rows = [dict(stage=k, **{f'{n} process': round(runs[n]['bytes_per_param'][k], 2) for n in counts}) for k in bpp]
    print(f"bytes per parameter held by each process ({runs[1]['params']:,} parameters, fp32):")
    print(table(rows, ['stage', *[f'{n} process' for n in counts]]))
    for k, v in runs[1]['activation_bytes'].items(): print(f"{k}: {v / 2**20:.2f} MiB")
    if 'allocated_per_param' in runs[1]:
        print(f"CUDA allocator: {runs[1]['allocated_per_param']:.2f} bytes per parameter")
    print(f"\nstate per GPU of {GPU_GB} GB, activations on top ('no': does not fit):")
    print(table(scaled(bpp), ['model', 'stage', '1 GPU', '2 GPU', '8 GPU']))
    name = 'fsdp_memory' + ('_cuda' if a.device == 'cuda' else '') + ('_quick' if a.quick else '')
    write(a.out, name, dict(runs={str(k): v for k, v in runs.items()}, measured=rows, scaled=scaled(bpp)))

if __name__ == '__main__':
    main()

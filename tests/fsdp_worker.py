"""Run by tests under torchrun: finetune a tiny DiT with distillation, EMA, clipping and checkpoints, data-parallel
(`ddp`) or sharded (`fsdp`); the main process saves the final raw and EMA weights. `KILL_AT=N` SIGKILLs the main
process at step N; `RESUME=1` resumes from the checkpoints."""
import os, signal, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from diffusers import DiTTransformer2DModel, DDPMScheduler
from diffprune.models import dit_config
from diffprune.finetuning import finetune

out, modes, steps = Path(sys.argv[1]), sys.argv[2].split(','), int(sys.argv[3])  # modes: 'ddp', 'fsdp' or both
kill_at, resume = int(os.environ.get('KILL_AT', 0)), os.environ.get('RESUME') == '1'
torch.set_num_threads(1)

def die(step, history):
    if step == kill_at: os.kill(os.getpid(), signal.SIGKILL)

for mode in modes:  # one launch runs each, in its own folder
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000)
    net, teacher = (DiTTransformer2DModel(**dit_config(heads=2, head_dim=8, layers=3)) for _ in range(2))
    r = finetune((net, sched), 'digits', steps=steps, batch_size=8, lr=1e-3, seed=3, device='cpu', progress=False,
                 fsdp=mode == 'fsdp', teacher=(teacher, sched), alpha=0.5, checkpoint_dir=out/mode/'ck',
                 checkpoint_every=2, resume=resume, callback=die if kill_at else None, callback_every=1)
    if int(os.environ.get('RANK', 0)) == 0:
        save_file({**{f'raw.{k}': v.contiguous() for k, v in r.raw.state_dict().items()},
                   **{f'ema.{k}': v.contiguous() for k, v in r.ema.state_dict().items()}}, out/mode/'final.safetensors')
        (out/mode/'history.txt').write_text(' '.join(map(str, r.history)))

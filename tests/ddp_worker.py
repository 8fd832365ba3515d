"Run by tests under torchrun: finetune a tiny UNet and save this process's final weights."
import sys, os, torch
from pathlib import Path
from safetensors.torch import save_file
from diffusers import DDPMScheduler
from diffprune.models import tiny_unet
from diffprune.finetuning import finetune

out = Path(sys.argv[1]); batch = int(sys.argv[2]); steps = int(sys.argv[3])
torch.set_num_threads(1)
r = finetune((tiny_unet(), DDPMScheduler(num_train_timesteps=1000)), 'digits', steps=steps, batch_size=batch, lr=1e-3,
             seed=3, device='cpu', progress=False)
rank = int(os.environ.get('RANK', 0))
save_file({k: v.contiguous() for k, v in r.raw.state_dict().items()}, out/f'rank{rank}.safetensors')

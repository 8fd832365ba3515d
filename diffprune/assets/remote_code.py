"""The class of a denoiser pruned by diffprune, for diffusers without diffprune.

diffprune (https://github.com/diffprune/diffprune) removed channels, attention heads or layers from this model, so its
layers are narrower, or fewer, than its `config.json` builds. This file builds the model from the config, cuts and
reshapes it as the record diffprune wrote into `config.json` says (`_diffprune`: the widths of every layer;
`_diffprune_kept_layers`: the layers kept where the config cannot count them), then loads the weights strictly, so no
weight is left random.

diffusers imports this file only when asked to, because it runs code from the repository:
`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`, or for the denoiser alone
`AutoModel.from_pretrained(folder_or_repo, subfolder=..., trust_remote_code=True)`. It needs torch, diffusers,
safetensors and huggingface_hub (diffusers' own dependencies), nothing else. diffprune's tests load every kind of
pruned folder through this file and through `diffprune.load_model`, and require the same outputs bit for bit.
"""
import json, shutil
from pathlib import Path
import torch
from torch import nn
import diffusers
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import RMSNorm
from safetensors.torch import load_file, save_file

RECORD, KEPT_LAYERS = '_diffprune', '_diffprune_kept_layers'

def rebuilt(m, a: dict):
    "Layer `m` with the widths `a` records: a new layer of that shape (its weights are loaded after), or `m` updated."
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(a['in_channels'], a['out_channels'], m.kernel_size, m.stride, m.padding, m.dilation,
                         a.get('groups', m.groups), m.bias is not None)
    if isinstance(m, nn.Linear): return nn.Linear(a['in_features'], a['out_features'], m.bias is not None)
    if isinstance(m, nn.GroupNorm): return nn.GroupNorm(a['num_groups'], a['num_channels'], m.eps, m.affine)
    if isinstance(m, nn.LayerNorm): return nn.LayerNorm(a['normalized_shape'], m.eps, m.elementwise_affine)
    if isinstance(m, RMSNorm): return RMSNorm(a['dim'], m.eps, m.elementwise_affine, bias=m.bias is not None)
    if isinstance(m, nn.Embedding): return nn.Embedding(a['num_embeddings'], a['embedding_dim'], m.padding_idx)
    for k, v in a.items(): setattr(m, k, v)  # attention heads and widths, up/downsampler widths, Flux's MLP width
    if isinstance(m, Attention): m.sliceable_head_dim = m.heads  # attention slicing splits by the heads it has
    return m

def _plain(v): return list(v) if isinstance(v, tuple) else v

def cut_and_reshape(model, record: dict, kept: dict):
    "Cut `model` to the layers `kept` names (teacher's indices; None: gone), then give each layer its recorded widths."
    mods = dict(model.named_modules())
    for path, idx in kept.items():
        parent, _, child = path.rpartition('.')
        setattr(mods[parent] if parent else model, child,
                None if idx is None else nn.ModuleList([mods[path][i] for i in idx]))
    mods = dict(model.named_modules())
    for name, a in record.get('structure', {}).items():
        m = mods[name]
        if all(_plain(getattr(m, k, None)) == v for k, v in a.items()): continue  # as the config builds it
        new = rebuilt(m, a)
        if new is not m:
            parent, _, child = name.rpartition('.')
            setattr(mods[parent] if parent else model, child, new)
    for m in model.modules():
        if isinstance(m, Attention) and m.scale_qk: m.scale = (m.inner_dim // m.heads) ** -0.5  # SDPA's own scale
        if hasattr(m, 'proj_mlp') and hasattr(m, 'mlp_hidden_dim'):  # Flux's single blocks: their MLP width and
            m.mlp_hidden_dim = m.proj_mlp.out_features                # how proj_out's input splits
            m.proj_out._tp_packed_row_blocks = [m.attn.to_q.out_features, m.mlp_hidden_dim]
    return model

def _folder(name_or_path, subfolder, kwargs: dict) -> Path:
    "A local folder, or the files of a Hub repository (huggingface_hub's cache), with `subfolder` inside."
    path = Path(str(name_or_path)).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download
        names = ('cache_dir', 'revision', 'token', 'local_files_only')
        hub = {k: kwargs[k] for k in names if kwargs.get(k) is not None}
        files = [f'{subfolder}/*' if subfolder else '*']
        path = Path(snapshot_download(str(name_or_path), allow_patterns=files, **hub))
    return path/subfolder if subfolder else path

class PrunedModelMixin:
    "diffusers' `from_pretrained` and `save_pretrained` for a pruned denoiser, with the record of its widths."
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, torch_dtype=None, **kwargs):
        if kwargs.get('quantization_config') is not None or kwargs.get('variant'):
            raise ValueError('a pruned model loads without quantization_config or variant: load it, then quantize it')
        folder = _folder(pretrained_model_name_or_path, subfolder, kwargs)
        saved = json.loads((folder/'config.json').read_text())
        record = saved.get(RECORD, {})
        cfg = {**saved, **record.get('config', {})}  # the keys config.json spoils so diffusers alone refuses it
        model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith('_') and k != 'auto_map'})
        kept = cfg.get(KEPT_LAYERS) or {}
        cut_and_reshape(model, record, kept)
        # the records of which teacher layers and blocks these are (for adapters), kept for a later save
        model.register_to_config(**{k: v for k, v in cfg.items() if k.startswith('_diffprune_')})
        if model.config.get('out_channels', 0) is None and hasattr(model, 'out_channels'):
            model.register_to_config(out_channels=model.out_channels)  # a DiT's default: DiTPipeline reads it
        model.load_state_dict(load_file(folder/'diffusion_pytorch_model.safetensors'), strict=True)
        model._diffprune_saved = {RECORD: record, **{k: saved[k] for k in record.get('config', {})}}  # to save
        run = folder/'diffprune.json'  # the channels each layer kept, and the run's settings
        model._diffprune_run = run.read_text() if run.exists() else None
        device = kwargs.get('device_map')
        if isinstance(device, str) and device in ('auto', 'balanced', 'balanced_low_0', 'sequential'):
            raise ValueError(f"a pruned model loads whole on one device: device_map='cuda' or 'cpu', not {device!r}")
        device = device if isinstance(device, (str, torch.device)) else None
        if isinstance(torch_dtype, str): torch_dtype = getattr(torch, torch_dtype)
        return (model if device is None and torch_dtype is None else model.to(device=device, dtype=torch_dtype)).eval()

    def save_pretrained(self, save_directory, is_main_process=True, **kwargs):
        "Write the folder `from_pretrained` reads: the config with the same record, the weights, and this file."
        if kwargs.get('push_to_hub') or kwargs.get('variant'):
            raise ValueError('a pruned model saves without push_to_hub or variant: save it, then upload the folder')
        if not is_main_process: return
        folder = Path(save_directory)
        weights = self.state_dict()
        if any(type(v) not in (torch.Tensor, nn.Parameter) for v in weights.values()):  # torchao's quantized ones
            raise ValueError('a quantized model saves as the model it was quantized from: save it before quantizing')
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  folder/'diffusion_pytorch_model.safetensors')
        cfg = {**json.loads(self.to_json_string()), **getattr(self, '_diffprune_saved', {}),
               '_class_name': type(self).__name__,
               'auto_map': {'AutoModel': f'diffprune.{type(self).__name__}'}}
        (folder/'config.json').write_text(json.dumps(cfg, indent=2, sort_keys=True) + '\n')
        if getattr(self, '_diffprune_run', None): (folder/'diffprune.json').write_text(self._diffprune_run)
        shutil.copyfile(__file__, folder/'diffprune.py')

class PrunedUNet2DModel(PrunedModelMixin, diffusers.UNet2DModel): pass
class PrunedUNet2DConditionModel(PrunedModelMixin, diffusers.UNet2DConditionModel): pass
class PrunedDiTTransformer2DModel(PrunedModelMixin, diffusers.DiTTransformer2DModel): pass
class PrunedPixArtTransformer2DModel(PrunedModelMixin, diffusers.PixArtTransformer2DModel): pass
class PrunedSD3Transformer2DModel(PrunedModelMixin, diffusers.SD3Transformer2DModel): pass
class PrunedFluxTransformer2DModel(PrunedModelMixin, diffusers.FluxTransformer2DModel): pass
class PrunedSanaTransformer2DModel(PrunedModelMixin, diffusers.SanaTransformer2DModel): pass

for _cls in (PrunedUNet2DModel, PrunedUNet2DConditionModel, PrunedDiTTransformer2DModel,
             PrunedPixArtTransformer2DModel, PrunedSD3Transformer2DModel, PrunedFluxTransformer2DModel,
             PrunedSanaTransformer2DModel):
    # `model_index.json` names these classes' library `diffprune`; diffusers writes a component's module name back
    # when it saves a pipeline, so the name it finds must be that one
    _cls.__module__ = 'diffprune'

"""Issue #31: a LoRA made for the teacher, remapped to a pruned folder (renumbered by its depth records, cut to the
channels each layer kept), gives the pruned model what the teacher with the LoRA merged gives once pruned the same way:
UNets (free-form and diffusers layout), DiT, Flux (blocks in two lists), SD3 and Sana."""
import copy
import pytest, torch
from torch import nn
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from diffprune.adapters import remap_adapter, teacher_layers, block_residuals, _folder_records
from diffprune.checks import InputError, ModelError
from diffprune.importance import ScoredModel, importance_criterion
from diffprune.latent import tiny_latent_pipeline
from diffprune.models import load_model, save_model, kept_channels, BLOCK_MAP, BLOCK_NAMES
from diffprune.prune import prune_model
from diffprune.sizes import example_inputs
from diffprune.unet_depth import depth_units

R = 4
SCHED = DDPMScheduler(num_train_timesteps=1000)

def magnitude(m, sched=SCHED): return ScoredModel(m, sched, 'magnitude', importance_criterion('magnitude'))

def adapter_for(model, prefix: str, seed=0) -> dict:
    "A random LoRA (rank R) on every plain Linear and Conv2d of `model`'s blocks, in diffusers' pipeline keys."
    g, sd = torch.Generator().manual_seed(seed), {}
    for n, m in model.named_modules():
        if not n.startswith(('down_blocks', 'mid_block', 'up_blocks', 'transformer_blocks', 'single_transformer_blocks')):
            continue
        if isinstance(m, nn.Linear): a, b = (R, m.in_features), (m.out_features, R)
        elif isinstance(m, nn.Conv2d) and m.groups == 1: a, b = (R, m.in_channels, *m.kernel_size), (m.out_channels, R, 1, 1)
        else: continue
        sd[f'{prefix}{n}.lora_A.weight'] = torch.randn(*a, generator=g) / 10
        sd[f'{prefix}{n}.lora_B.weight'] = torch.randn(*b, generator=g) / 10
    return sd

def with_lora(model, sd: dict, prefix: str):
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    cfg = LoraConfig(r=R, lora_alpha=R, target_modules=sorted({k.rsplit('.', 2)[0] for k in sd}))
    model = inject_adapter_in_model(cfg, copy.deepcopy(model))
    assert not set_peft_model_state_dict(model, sd).unexpected_keys
    return model

def cut_like(teacher, pruned, folder):
    "`pruned` with each Linear/Conv2d's weight taken from `teacher`'s layer it came from, cut to the channels it kept."
    _, config, _ = _folder_records(folder)
    to_pruned = teacher_layers(config)
    origin = {p: t for t in dict(teacher.named_modules()) if (p := to_pruned(t)) is not None}
    out, kept, tm = copy.deepcopy(pruned), kept_channels(pruned), dict(teacher.named_modules())
    with torch.no_grad():
        for n, m in out.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                c, w = kept.get(n, {}), tm[origin[n]].weight
                m.weight.copy_(w[c.get('out', slice(None))][:, c.get('in', slice(None))])
    return out

def merged(teacher, sd: dict, prefix: str):
    "The teacher with the LoRA's deltas `B @ A` (scale 1) added to its weights."
    out = copy.deepcopy(teacher)
    with torch.no_grad():
        for n, m in out.named_modules():
            if (a := sd.get(f'{prefix}{n}.lora_A.weight')) is not None:
                m.weight += (sd[f'{prefix}{n}.lora_B.weight'].flatten(1) @ a.flatten(1)).reshape(m.weight.shape)
    return out

def outputs(model, x):
    with torch.no_grad(): return model(**x)[0]

@pytest.fixture(scope='module')
def tok(tmp_path_factory): return tmp_path_factory.mktemp('tok')

def pipe_parts(kind, tok):
    p = tiny_latent_pipeline(kind, tokenizer_dir=tok)
    return p.transformer, p.scheduler

CASES = {'unet-both': lambda tok: (*load_model('digits'), dict(target_macs=0.5, removes='both')),
         'unet-depth-diffusers-layout': lambda tok: (*load_model('digits'),
                                                     dict(remove_units=['mid_block'], layout='diffusers')),
         'dit-both': lambda tok: (*load_model('digits-dit'), dict(target_macs=0.5, removes='both')),
         **{k: (lambda tok, k=k: (*pipe_parts(k, tok), dict(target_macs=0.6, removes='both')))
            for k in ('flux', 'sd3', 'sana')}}

@pytest.mark.parametrize('case', CASES)
def test_a_remapped_lora_gives_the_teacher_merged_then_pruned_the_same_way(case, tok, tmp_path):
    teacher, sched, how = CASES[case](tok)
    teacher.eval()
    prefix = 'unet.' if 'unet' in case else 'transformer.'
    sd = adapter_for(teacher, prefix)
    save_model(prune_model(magnitude(teacher, sched), **how).denoiser, sched, tmp_path/'p')
    pruned, _ = load_model(tmp_path/'p')
    x = example_inputs(pruned, 2)
    # the records map every kept layer to its teacher layer and channels: cut from the teacher, it is the pruned model
    torch.testing.assert_close(outputs(cut_like(teacher, pruned, tmp_path/'p'), x), outputs(pruned, x), rtol=0, atol=0)
    remapped = remap_adapter(sd, tmp_path/'p')
    want = outputs(cut_like(merged(teacher, sd, prefix), pruned, tmp_path/'p'), x)
    got = outputs(with_lora(pruned, remapped.state_dict, prefix), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - outputs(pruned, x)).abs().max() > 1e-2  # the LoRA does change the output
    kept_layers = {k.rsplit('.', 2)[0] for k in remapped.state_dict}
    assert len(kept_layers) + len(remapped.dropped) == len(sd) // 2  # every teacher layer kept or dropped, once
    assert remapped.sliced or 'depth' in case

def test_flux_records_its_blocks_by_name_in_both_lists(tok, tmp_path):
    flux, sched = pipe_parts('flux', tok)
    n, s = len(flux.transformer_blocks), len(flux.single_transformer_blocks)
    p = prune_model(magnitude(flux, sched), keep_blocks=[1, n + 0, n + s - 1]).denoiser
    assert p.config[BLOCK_NAMES] == ['transformer_blocks.1', 'single_transformer_blocks.0',
                                     f'single_transformer_blocks.{s - 1}']
    again = prune_model(magnitude(p, sched), keep_blocks=[0, 2]).denoiser  # composed with the first pruning's names
    assert again.config[BLOCK_NAMES] == ['transformer_blocks.1', f'single_transformer_blocks.{s - 1}']
    save_model(again, sched, tmp_path/'p')
    f = teacher_layers(_folder_records(tmp_path/'p')[1])
    assert (f(f'single_transformer_blocks.{s - 1}.proj_out'), f('single_transformer_blocks.0.proj_out'),
            f('transformer_blocks.0.attn.to_q')) == ('single_transformer_blocks.0.proj_out', None, None)

def test_bad_adapters_and_folders_get_one_line(tmp_path):
    teacher, sched = load_model('digits')
    save_model(teacher, sched, tmp_path/'t')  # unpruned: a LoRA for it passes as it is
    sd = adapter_for(teacher, 'unet.')
    assert remap_adapter(sd, tmp_path/'t').state_dict.keys() == sd.keys()
    dit = adapter_for(load_model('digits-dit')[0], 'transformer.')
    with pytest.raises(InputError, match='the pruned model does not have: the LoRA was made for another model'):
        remap_adapter(dit, tmp_path/'t')
    wide = {k: torch.zeros(v.shape[0], v.shape[1] + 1, *v.shape[2:]) if 'lora_A' in k else v for k, v in sd.items()}
    with pytest.raises(InputError, match='does not fit the pruned model .* made for another model'):
        remap_adapter(wide, tmp_path/'t')
    with pytest.raises(InputError, match='is not a LoRA key diffusers or peft writes'):
        remap_adapter({'lora_unet_conv_in.lora_down.weight': torch.zeros(1)}, tmp_path/'t')
    with pytest.raises(ModelError, match='is not a model folder'):
        remap_adapter(sd, tmp_path)
    with pytest.raises(InputError, match='no LoRA at'):
        remap_adapter(tmp_path/'lora.bin', tmp_path/'t')
    with pytest.raises(InputError, match='is not a LoRA key'):  # a bias of A is no LoRA diffusers writes
        remap_adapter({**sd, 'unet.conv_in.lora_A.bias': torch.zeros(4)}, tmp_path/'t')
    with pytest.raises(InputError, match='holds no layers'):
        remap_adapter({}, tmp_path/'t')
    # a pipeline's LoRA with its text encoder's layers: those pass as they are; peft's own prefix is kept too
    text = {'text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight': torch.zeros(4, 8)}
    assert remap_adapter({**sd, **text}, tmp_path/'t').state_dict.keys() == {**sd, **text}.keys()
    peft_keys = {k.replace('unet.', 'base_model.model.', 1): v for k, v in sd.items()}
    assert remap_adapter(peft_keys, tmp_path/'t').state_dict.keys() == peft_keys.keys()

def test_a_lora_remapped_twice_is_refused_and_a_folder_prefers_diffusers_file_name(tmp_path):
    teacher, sched = load_model('digits')
    save_model(prune_model(magnitude(teacher), target_macs=0.5).denoiser, sched, tmp_path/'p')
    once = remap_adapter(adapter_for(teacher, 'unet.'), tmp_path/'p').state_dict
    with pytest.raises(InputError, match='remapped already'):
        remap_adapter(once, tmp_path/'p')
    from safetensors.torch import save_file
    (tmp_path/'lora').mkdir()
    save_file(adapter_for(teacher, 'unet.'), tmp_path/'lora'/'pytorch_lora_weights.safetensors')
    save_file({'x': torch.zeros(1)}, tmp_path/'lora'/'a_first_by_name.safetensors')
    assert remap_adapter(tmp_path/'lora', tmp_path/'p').state_dict.keys() == once.keys()

def test_a_diffusers_layout_cut_then_a_free_form_one_compose(tmp_path):
    "Depth in the diffusers layout (its config counts it), then free-form depth on the model that config builds."
    teacher, sched = load_model('digits')
    save_model(prune_model(magnitude(teacher), remove_units=['mid_block'], layout='diffusers').denoiser, sched,
               tmp_path/'a')
    first, _ = load_model(tmp_path/'a')
    pair = next(u for u in depth_units(first) if u.kind == 'pair')
    save_model(prune_model(magnitude(first), remove_units=[pair.name]).denoiser, sched, tmp_path/'b')
    pruned, _ = load_model(tmp_path/'b')
    f = teacher_layers(_folder_records(tmp_path/'b')[1])
    assert f('mid_block.resnets.0.conv1') is None and f(pair.layers[0] + '.conv1') is None, pair.layers
    sd = adapter_for(teacher, 'unet.')
    x = example_inputs(pruned, 2)
    torch.testing.assert_close(outputs(cut_like(teacher, pruned, tmp_path/'b'), x), outputs(pruned, x), rtol=0, atol=0)
    got = outputs(with_lora(pruned, remap_adapter(sd, tmp_path/'b').state_dict, 'unet.'), x)
    torch.testing.assert_close(got, outputs(cut_like(merged(teacher, sd, 'unet.'), pruned, tmp_path/'b'), x),
                               rtol=1e-4, atol=1e-4)

def test_flux_residual_rules_with_and_without_repeat():
    "FLUX.1 reads block t's residual at t // ceil(N / n), or with XLabs' `controlnet_blocks_repeat` at t % n."
    cfg = {'_class_name': 'FluxTransformer2DModel', BLOCK_NAMES: ['transformer_blocks.1', 'transformer_blocks.3']}
    samples = [torch.tensor(float(j)) for j in range(3)]
    assert [float(r) for r in block_residuals(samples, cfg, 4)] == [0., 1.]  # 1 // 2, 3 // 2
    assert [float(r) for r in block_residuals(samples, cfg, 4, repeat=True)] == [1., 0.]  # 1 % 3, 3 % 3
    with pytest.raises(InputError, match='no residuals given'):
        block_residuals([], cfg, 4)
    with pytest.raises(InputError, match='takes no ControlNet residuals by block'):
        block_residuals(samples, {'_class_name': 'DiTTransformer2DModel', BLOCK_MAP: [0, 1]}, 4)

class Recorder(nn.Module):
    "A block that passes its input through unchanged and logs it: what the model added since the last block shows."
    def __init__(self, block, log: list, pair: bool):
        super().__init__()
        self.log, self.pair, self.context_pre_only = log, pair, getattr(block, 'context_pre_only', None)
    def forward(self, hidden_states, *args, encoder_hidden_states=None, **kw):
        self.log.append(hidden_states.clone())
        if not self.pair: return hidden_states
        return (encoder_hidden_states if encoder_hidden_states is not None else args[0]), hidden_states

def received(model, lists, x, pair, **residuals) -> list:
    "The residual each block of `model` (lists in order) had added after it, with blocks that change nothing."
    model, log = copy.deepcopy(model), []
    for name in lists:
        setattr(model, name, nn.ModuleList([Recorder(b, log, pair) for b in getattr(model, name)]))
    model.norm_out.register_forward_pre_hook(lambda m, args: log.append(args[0].clone()))
    with torch.no_grad(): model(**x, **residuals)
    return [b - a for a, b in zip(log, log[1:])]

CONTROLNETS = {  # teacher blocks kept (n: blocks in the first list), the lists fed, their keywords, pairs returned
    'flux': (lambda n: [1, n + 1], {'transformer_blocks': 'controlnet_block_samples',
                                              'single_transformer_blocks': 'controlnet_single_block_samples'}, True),
    'sd3': (lambda n: [1, n - 1], {'transformer_blocks': 'block_controlnet_hidden_states'}, True),
    'sana': (lambda n: [0, 2], {'transformer_blocks': 'controlnet_block_samples'}, False)}

@pytest.mark.parametrize('kind', CONTROLNETS)
def test_each_kept_block_gets_its_teacher_blocks_controlnet_residual(kind, tok):
    keep, keys, pair = CONTROLNETS[kind]
    teacher, sched = pipe_parts(kind, tok)
    lists = tuple(keys)
    pruned = prune_model(magnitude(teacher, sched), keep_blocks=keep(len(teacher.transformer_blocks))).denoiser
    x = example_inputs(teacher, 1)
    width = received(teacher, lists, x, pair)[0].shape  # the token stream's
    def samples(count): return [torch.full(width, float(j + 1)) for j in range(count)]  # read off by value
    given = {keys[l]: samples(len(getattr(teacher, l))) for l in lists}  # one per block
    want = received(teacher, lists, x, pair, **given)
    ours = {keys[l]: block_residuals(given[keys[l]], pruned, len(getattr(teacher, l)), l) for l in lists}
    got = received(pruned, lists, x, pair, **ours)
    blocks = pruned.config[BLOCK_MAP]
    def same(a, b): return torch.allclose(a, b, atol=1e-5)  # read off as differences of running sums: rounding
    assert len(got) == len(blocks) and all(same(got[k], want[t]) for k, t in enumerate(blocks)), kind
    naive = received(pruned, lists, x, pair, **given)  # the teacher's residuals as they are: other blocks' ones
    assert not all(same(naive[k], want[t]) for k, t in enumerate(blocks))

def test_a_depth_pruned_unet_takes_the_teacher_controlnets_residuals_of_its_kept_resnets(tmp_path):
    from diffusers import UNet2DConditionModel, ControlNetModel
    from diffprune.adapters import unet_residuals
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                   layers_per_block=2, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                   up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=24,
                                   attention_head_dim=8, norm_num_groups=8).eval()
    unit = next(u for u in depth_units(teacher) if u.kind == 'pair' and u.name.startswith('down_blocks.0'))
    pruned = prune_model(magnitude(teacher), remove_units=[unit.name]).denoiser
    x = example_inputs(teacher, 1)
    controlnet = ControlNetModel.from_unet(teacher)
    with torch.no_grad():
        down, mid = controlnet(x['sample'], x['timestep'], x['encoder_hidden_states'],
                               controlnet_cond=torch.randn(1, 3, 128, 128), return_dict=False)
    down = [torch.randn_like(d) for d in down]  # a trained ControlNet's (a new one's are zero: its convs start at 0)
    mapped = unet_residuals(down, pruned, teacher_layers_per_block=2)
    gone = int(unit.name.split('+')[0].split('.')[-1])  # the ResNet of level 0 removed
    assert [id(t) for t in mapped] == [id(t) for i, t in enumerate(down) if i != 1 + gone]
    with torch.no_grad():
        out = pruned(**x, down_block_additional_residuals=tuple(mapped), mid_block_additional_residual=mid).sample
        plain = pruned(**x).sample
    assert out.shape == plain.shape and not torch.equal(out, plain)
    with pytest.raises(InputError, match='are not a teacher ControlNet'):
        unet_residuals(list(down)[:-1], pruned, teacher_layers_per_block=2)

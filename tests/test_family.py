"""The house's protocol (issue #26): a denoiser family plugged in from outside the package is scored, pruned to a MACs
target, saved, loaded and sampled through the public API, with no change to diffprune; and the old names still work,
with a warning, for one minor version."""
import warnings
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch_pruning as tp
from diffusers import DDPMScheduler, ModelMixin, ConfigMixin
from diffusers.configuration_utils import register_to_config
import diffprune.family
from diffprune import register_family, Family
from diffprune.models import PrunedModelMixin, load_model, is_pruned
from diffprune.importance import score_model, channel_scores
from diffprune.prune import prune_model
from diffprune.sizes import layer_macs, count_macs
from diffprune.diffusion import ddim_sample, sample_shape
from diffprune.finetuning import finetune

class TinyDenoiser(ModelMixin, ConfigMixin):
    "A denoiser diffprune has never heard of: three convolutions and a time embedding."
    @register_to_config
    def __init__(self, in_channels:int=1, sample_size:int=16, width:int=16, hidden:int=32):
        super().__init__()
        self.inp, self.time = nn.Conv2d(in_channels, width, 3, padding=1), nn.Linear(1, width)
        self.mid = nn.Conv2d(width, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, in_channels, 3, padding=1)

    def forward(self, sample, timestep):
        t = (timestep.float() / 1000).view(-1, 1).to(sample.dtype)
        h = F.silu(self.inp(sample) + self.time(t)[:, :, None, None])
        return (self.out(F.silu(self.mid(h))),)  # a tuple, as diffusers models give with return_dict=False

class PrunedTinyDenoiser(PrunedModelMixin, TinyDenoiser):
    "The tiny denoiser with free-form widths."

class TinyPruner:
    "Units: the `hidden` channels of `mid` (its output rows, `out`'s input columns), scored by Eq. 8."
    def __init__(self, model, scored):
        self.model, g = model, scored.gradients
        self.scores = (channel_scores(scored.method, model.mid.weight, g.get('mid.weight'))
                       + channel_scores(scored.method, model.out.weight, g.get('out.weight'), dim=1))
        self.convs, _ = layer_macs(model)

    def estimate(self, plan) -> float:
        k = plan['keep'] / self.model.mid.out_channels
        return sum(v * (k if m in (self.model.mid, self.model.out) else 1.) for m, v in self.convs.items())

    def plan(self, *, pruning_ratio=None, target_macs=None, removes='width') -> dict:
        n = self.model.mid.out_channels
        if pruning_ratio is not None: return dict(keep=max(1, round(n * (1 - pruning_ratio))))
        base = sum(self.convs.values())
        return dict(keep=max(k for k in range(1, n + 1) if self.estimate(dict(keep=k)) <= target_macs * base))

    def apply(self, plan) -> nn.Module:
        drop = torch.argsort(self.scores)[:self.model.mid.out_channels - plan['keep']].tolist()
        tp.prune_conv_out_channels(self.model.mid, drop)
        tp.prune_conv_in_channels(self.model.out, drop)
        return self.model

    def report(self, plan) -> dict: return dict(group_scores={'mid': self.scores.mean().item()})

class TinyFamily(Family):
    name, classes, folder, note_key = 'tiny', (TinyDenoiser,), 'denoiser', 'hidden'
    pruned = {TinyDenoiser: PrunedTinyDenoiser}
    def example_inputs(self, model, batch=1):
        p = next(model.parameters())
        return dict(sample=torch.randn(batch, *sample_shape(model), dtype=p.dtype, device=p.device),
                    timestep=torch.full((batch,), 10, device=p.device))
    def activation_values(self, model): return model.config.sample_size ** 2 * model.config.width
    def pruner(self, model, scored, round_to='auto', layout='free-form', seed=0): return TinyPruner(model, scored)

@pytest.fixture
def tiny_family(monkeypatch):
    "The family registered for one test, and the registry as it was afterwards."
    monkeypatch.setattr(diffprune.family, '_REGISTERED', [])
    return register_family(TinyFamily())

def test_a_family_from_outside_is_scored_pruned_saved_loaded_and_sampled_through_the_public_api(tiny_family, tmp_path):
    torch.manual_seed(0)
    model, sched = TinyDenoiser().eval(), DDPMScheduler(num_train_timesteps=1000)
    scored = score_model((model, sched), 'digits', calibration_size=8, stride=100, progress=False)
    assert scored.gradients['mid.weight'].abs().sum() > 0  # Diff-Pruning's gradients over [0, T']
    res = prune_model(scored, target_macs=0.6)
    assert res.macs_after <= 0.6 * res.macs_before and res.macs_after == count_macs(res.denoiser)
    assert type(res.denoiser) is PrunedTinyDenoiser and is_pruned(res.denoiser) and model.mid.out_channels == 32
    kept = torch.argsort(TinyPruner(model, scored).scores)[32 - res.denoiser.mid.out_channels:].sort().values
    assert torch.equal(res.denoiser.out.weight, model.out.weight[:, kept])  # the highest-scored channels stayed
    res.save(tmp_path/'m', extra=dict(source='tiny'))
    back, s = load_model(tmp_path/'m')
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999])
    with torch.no_grad(): assert torch.equal(back(x, t)[0], res.denoiser(x, t)[0])
    assert type(back) is PrunedTinyDenoiser and (tmp_path/'m'/'denoiser'/'config.json').exists()
    images = ddim_sample(back, s, 4, steps=5, progress=False)
    assert images.shape == (4, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    ft = finetune(tmp_path/'m', 'digits', steps=2, batch_size=4, progress=False)
    assert type(ft.denoiser) is PrunedTinyDenoiser and len(ft.history) == 2

def test_a_model_no_family_covers_is_sampled_but_refused_pruning_in_one_line():
    model, sched = TinyDenoiser(), DDPMScheduler()
    assert ddim_sample(model, sched, 2, steps=2, progress=False).shape == (2, 1, 16, 16)  # called as diffusers models
    for step in (lambda: score_model((model, sched), 'digits', calibration_size=2),
                 lambda: prune_model(score_model((model, sched), method='magnitude'), target_macs=0.5)):
        with pytest.raises(ValueError, match='diffprune has no family for a TinyDenoiser') as e: step()
        assert len(str(e.value).splitlines()) == 1

def test_a_family_refuses_what_its_pruner_cannot_do_before_any_scoring(tiny_family):
    scored = score_model((TinyDenoiser(), DDPMScheduler()), method='magnitude')
    with pytest.raises(ValueError, match="removes='depth' is not for a TinyDenoiser: a tiny is pruned by width"):
        prune_model(scored, target_macs=0.5, removes='depth')
    with pytest.raises(ValueError, match="keeps no 'diffusers' layout"):
        prune_model(scored, target_macs=0.5, layout='diffusers')

OLD_NAMES = [('diffprune.models', 'save_unet', 'save_denoiser'), ('diffprune.models', 'load_unet', 'load_denoiser'),
             ('diffprune.models', 'unet_structure', 'layer_structure'),
             ('diffprune.models', 'PrunedUNetMixin', 'PrunedModelMixin'),
             ('diffprune.models', 'check_unet_pipeline', 'check_pipeline'),
             ('diffprune.diffusion', 'unet_output', 'model_output'),
             ('diffprune.diffusion', 'compile_unet', 'compile_denoiser'),
             ('diffprune.metrics', 'fid_calibration', 'fid_references'),
             ('diffprune.latent', 'calibration', 'pipeline_latents'), ('diffprune.prune', 'PRUNE_KINDS', 'REMOVES')]

@pytest.mark.parametrize('module, old, new', OLD_NAMES)
def test_an_old_public_name_is_the_new_one_and_says_so(module, old, new):
    import importlib
    m = importlib.import_module(module)
    with pytest.warns(FutureWarning, match=f'{old} is now {new}'): assert getattr(m, old) is getattr(m, new)

def test_old_attribute_and_keyword_names_still_work_and_say_so(tiny_family):
    import diffprune.transformer
    scored = score_model((TinyDenoiser(), DDPMScheduler()), method='magnitude')
    with pytest.warns(FutureWarning, match='ScoredModel.unet is now denoiser'): assert scored.unet is scored.denoiser
    with pytest.warns(FutureWarning, match=r'prune_model\(prune=\) is now removes='):
        res = prune_model(scored, pruning_ratio=0.5, prune='width')
    with pytest.warns(FutureWarning, match='PruneResult.unet is now denoiser'): assert res.unet is res.denoiser
    with pytest.warns(FutureWarning, match='prune_transformer is now prune_model'):
        assert diffprune.transformer.prune_transformer(scored, pruning_ratio=0.5).removes == 'width'

MOVED = [('diffprune.prune', 'UNetPruner', 'diffprune.unet'), ('diffprune.prune', 'count_macs', 'diffprune.sizes'),
         ('diffprune.prune', 'kept_channels', 'diffprune.unet'), ('diffprune.models', 'PrunedUNet2DModel', 'diffprune.unet'),
         ('diffprune.models', 'PrunedDiTTransformer2DModel', 'diffprune.transformer'),
         ('diffprune.models', 'push_to_hub', 'diffprune.hub')]

@pytest.mark.parametrize('module, name, now', MOVED)
def test_a_moved_name_is_still_served_where_it_was_and_says_where_it_went(module, name, now):
    import importlib
    with pytest.warns(FutureWarning, match=f'{module}.{name} is now {now}.{name}'):
        assert getattr(importlib.import_module(module), name) is getattr(importlib.import_module(now), name)

def test_the_old_unet_keyword_and_the_old_prune_setting_still_work_and_say_so():
    from diffprune.sizes import example_inputs
    from diffprune.report import RecipeSettings
    model = TinyDenoiser()
    with pytest.warns(FutureWarning, match=r'count_macs\(unet=\) is now model='):
        assert count_macs(unet=model) == count_macs(model)
    with pytest.warns(FutureWarning, match=r'sample_shape\(unet=\) is now model='):
        assert sample_shape(unet=model) == (1, 16, 16)
    with pytest.warns(FutureWarning, match=r'RecipeSettings\(prune=\) is now removes='):
        assert RecipeSettings(prune='depth').removes == 'depth'
    with pytest.raises(ValueError, match='give model= only'): count_macs(unet=model, model=model)

def test_plugins_load_as_their_entry_points_say_and_a_broken_one_is_left_out(monkeypatch):
    "Entry points load by their own rules (`module:Holder.attr`, extras); a broken or wrong one warns and stays out."
    import sys, types, importlib.metadata as md
    mod = types.ModuleType('tiny_plugin')
    class Holder: fam = TinyFamily()
    mod.Holder, mod.NOT_A_FAMILY = Holder, object()
    monkeypatch.setitem(sys.modules, 'tiny_plugin', mod)
    eps = [md.EntryPoint('nested', 'tiny_plugin:Holder.fam [gpu]', 'diffprune.families'),
           md.EntryPoint('wrong', 'tiny_plugin:NOT_A_FAMILY', 'diffprune.families'),
           md.EntryPoint('broken', 'no_such_module:FAMILY', 'diffprune.families')]
    monkeypatch.setattr(md, 'entry_points', lambda group=None: eps if group == 'diffprune.families' else [])
    diffprune.family._known.cache_clear()
    try:
        with pytest.warns(UserWarning) as w: found = diffprune.family.families()
        assert Holder.fam in found and {f.name for f in found} >= {'unet', 'transformer'}
        said = ' '.join(str(x.message) for x in w)
        assert "'tiny_plugin:NOT_A_FAMILY' is not a Family instance" in said and "'no_such_module:FAMILY' cannot be loaded" in said
    finally: diffprune.family._known.cache_clear()

def test_an_old_name_takes_its_old_keyword_too():
    import diffprune.diffusion, diffprune.prune
    model = TinyDenoiser()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        old = diffprune.diffusion.unet_output
    with pytest.warns(FutureWarning, match=r'model_output\(unet=\) is now model='):
        assert torch.equal(old(unet=model, x=x, t=t), diffprune.diffusion.model_output(model, x, t))
    with pytest.raises(ValueError, match='RecipeSettings got prune= and removes='):
        from diffprune.report import RecipeSettings
        RecipeSettings(prune='width', removes='width')

def test_a_family_giving_its_blocks_as_0_6_did_warns_and_still_works():
    "0.6's `blocks = 'transformer_blocks'` (one list's name) or None is read as 0.7's tuple, with a DeprecationWarning."
    class OldStyle(TinyFamily): blocks = 'transformer_blocks'
    f = OldStyle()
    with pytest.warns(DeprecationWarning, match='a tuple of list names'): assert f.block_lists() == ('transformer_blocks',)
    assert f.blocks == 'transformer_blocks'  # the family's own attribute stays what its code reads
    class NoBlocks(TinyFamily): blocks = None
    with pytest.warns(DeprecationWarning, match='a tuple of list names'): assert NoBlocks().block_lists() == ()

def test_a_0_6_transformer_family_without_block_units_prunes_as_0_6_did(monkeypatch):
    "A family written for 0.6 (no `block_units`) gets DiT's units with a warning, never a silent no-op."
    from diffusers import DiTTransformer2DModel
    from diffprune.transformer import TransformerPruner, transformer_inputs
    from diffprune.checks import InputError
    monkeypatch.setattr(diffprune.family, '_REGISTERED', [])
    class OldDiT(Family):
        name, classes, folder, blocks = 'old-dit', (DiTTransformer2DModel,), 'transformer', ('transformer_blocks',)
        def example_inputs(self, model, batch=1): return transformer_inputs(model, batch)
    register_family(OldDiT())
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_layers=2, sample_size=8, in_channels=1, out_channels=1, num_attention_heads=2,
                                attention_head_dim=8, num_embeds_ada_norm=10)
    with pytest.warns(DeprecationWarning, match="read as DiT's"): pr = TransformerPruner(dit, 'magnitude', round_to=None)
    plan = pr.plan(pruning_ratio=0.5)
    assert plan['keep'][(0, 'attn1')] == 1 and plan['keep'][(0, 'mlp')] < pr.units[0]['mlp'][0]
    pr.units = [{} for _ in pr.units]  # blocks that declare nothing to lose: width is refused, not a no-op
    with pytest.raises(InputError, match='declares no units its blocks can lose'): pr.plan(pruning_ratio=0.5)

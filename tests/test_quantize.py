"""Issue #31: a pruned model quantized with torchao (int8 weights, int8 dynamic; fp8 refused off a recent GPU), its
weights counted as stored, and nothing printed by torchao's import where diffprune is imported first."""
import copy, subprocess, sys
import pytest, torch
from diffprune.checks import InputError
from diffprune.importance import ScoredModel, importance_criterion
from diffprune.models import load_model
from diffprune.prune import prune_model
from diffprune.quantize import quantize, weight_bytes
from diffprune.sizes import example_inputs

def rel_error(a, b): return ((a - b).norm() / a.norm()).item()

@pytest.mark.parametrize('scheme', ['int8-weight', 'int8-dynamic'])
def test_a_pruned_transformer_quantizes_to_a_quarter_of_its_linear_bytes_and_stays_close(scheme):
    dit, sched = load_model('digits-dit')
    pruned = prune_model(ScoredModel(dit, sched, 'magnitude', importance_criterion('magnitude')),
                         target_macs=0.5).denoiser.eval()
    linear = sum(m.weight.numel() for m in pruned.modules() if isinstance(m, torch.nn.Linear))
    q = quantize(copy.deepcopy(pruned), scheme)
    saved = weight_bytes(pruned) - weight_bytes(q)
    assert 0.7 * 3 * linear <= saved <= 3 * linear  # fp32 to int8 (less the scales) on every Linear, nothing else
    torch.manual_seed(0)
    x = example_inputs(pruned, 4)
    with torch.no_grad(): assert rel_error(pruned(**x)[0], q(**x)[0]) < 0.05

def test_bad_quantization_gets_one_line(monkeypatch, tmp_path):
    unet, _ = load_model('digits')
    unet = prune_model(ScoredModel(unet, _, 'magnitude', importance_criterion('magnitude')), target_macs=0.6).denoiser
    with pytest.raises(InputError, match='fp8 needs a CUDA GPU of compute capability 8.9'):
        quantize(unet, 'fp8')
    with pytest.raises(InputError, match='scheme must be one of int8-weight, int8-dynamic, fp8'):
        quantize(unet, 'int4')
    q = quantize(copy.deepcopy(unet), 'int8-weight')
    with pytest.raises(InputError, match='a quantized model saves as the model it was quantized from'):
        q.save_pretrained(tmp_path/'q')
    assert not (tmp_path/'q').exists()  # nothing half-written
    monkeypatch.setitem(sys.modules, 'torchao.quantization', None)  # as where torchao is not installed
    with pytest.raises(InputError, match=r"pip install 'diffprune\[quantize\]'"):
        quantize(unet, 'int8-weight')

def test_importing_diffprune_then_diffusers_prints_nothing_with_torchao_installed():
    "torchao's import-time reports (kernels a CPU cannot load, a torch deprecation) stay out of the CLI's messages."
    code = "import diffprune.models, diffprune.quantize; diffprune.quantize._torchao()"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr.strip() == '' and r.stdout == '', r.stderr[-800:]

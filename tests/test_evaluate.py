"Evaluation sanity: FID calibration, SSIM of a model with itself, bad input."
import json
import pytest, torch
from diffprune.metrics import fid_score
from diffprune.evaluation import consistency, evaluate
from diffprune.data import get_dataset
from diffprune.models import load_model, tiny_unet
from diffprune.diffusion import ddim_sample

def test_fid_of_digits_against_a_disjoint_part_is_small_and_against_noise_large():
    held = (get_dataset('digits:heldout').x + 1) / 2
    near, far = fid_score(held, 'digits:train'), fid_score(torch.rand(360, 1, 16, 16), 'digits:train')
    assert near < 0.05 * far

def test_real_images_given_as_a_tensor_are_in_0_1_like_the_samples_and_never_cached(tmp_path, monkeypatch):
    import diffprune.metrics as metrics
    monkeypatch.setattr(metrics, 'CACHE', tmp_path/'cache')
    held, train = ((get_dataset(f'digits:{s}').x + 1) / 2 for s in ('heldout', 'train'))
    test_named = fid_score(held, 'digits:train')
    assert fid_score(held, train) == pytest.approx(test_named, rel=1e-3)  # the same images, in [0, 1], by tensor
    assert fid_score(held, train * 2 - 1) > 2 * test_named  # images in [-1, 1] would be other images
    assert fid_score(held, train[:50], n_real=20) != pytest.approx(fid_score(held, train[:50]))  # n_real is honoured
    assert len(list((tmp_path/'cache'/'fid').glob('*'))) == 1  # only the named dataset was cached

def test_ssim_of_a_model_with_itself_is_one_and_less_for_another_seed():
    u, s = load_model('digits')
    a = ddim_sample(u, s, 8, steps=10, seed=0, progress=False)
    assert consistency(a, ddim_sample(u, s, 8, steps=10, seed=0, progress=False))['ssim'] == pytest.approx(1.0)
    assert consistency(a, ddim_sample(u, s, 8, steps=10, seed=1, progress=False))['ssim'] < 0.9

def test_evaluate_with_teacher_reports_every_field(tmp_path, cli):
    r = cli('evaluate', '--model', 'digits', '--teacher', 'digits', '--num-samples', '32', '--sample-steps', '5', '--out', tmp_path/'e')
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path/'e'/'result.json').read_text())
    for k in ('fid', 'params', 'macs', 'latency_ms', 'ssim', 'mse', 'speedup', 'macs_reduction'): assert k in d
    for k in ('fid', 'params', 'macs', 'latency_ms'): assert k in d['teacher']
    assert d['ssim'] == pytest.approx(1.0) and d['macs_reduction'] == 1.0

@pytest.mark.parametrize('args, needle', [
    (['--num-samples', '1'], 'at least 2'),
    (['--teacher', 'TINY3'], 'differ'),
    (['--feature', 'inception'], 'torch-fidelity'),
])
def test_bad_evaluate_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    from diffprune.models import save_model
    from diffusers import DDPMScheduler
    save_model(tiny_unet(channels=3), DDPMScheduler(num_train_timesteps=1000), tmp_path/'tiny3')
    args = [str(tmp_path/'tiny3') if a == 'TINY3' else a for a in args]
    r = cli('evaluate', '--model', 'digits', '--num-samples', '8', '--sample-steps', '2', '--out', tmp_path/'o', *args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path/'o').exists()


def test_model_and_teacher_are_evaluated_on_one_device(monkeypatch):
    "A model on another device than its teacher (a GPU-finetuned one, a CPU-loaded teacher): both run where the model is."
    import diffprune.evaluation as E
    from diffusers import DDPMScheduler
    moves, seen = [], {}
    class Net(torch.nn.Linear):  # records where it is sent: the device logic, checked on a machine without a GPU
        def to(self, device): moves.append((self.tag, str(device))); return self
    model, teacher = Net(1, 1, device='meta'), Net(1, 1)
    model.tag, teacher.tag = 'model', 'teacher'
    monkeypatch.setattr(E, '_evaluate', lambda model, teacher, *a: seen.update(device=str(a[7])))
    E.evaluate((model, DDPMScheduler()), (teacher, DDPMScheduler()))
    assert seen['device'] == 'meta'  # the model's device, not the default cpu
    assert moves == [('model', 'meta'), ('teacher', 'meta'), ('model', 'meta'), ('teacher', 'cpu')]  # and back

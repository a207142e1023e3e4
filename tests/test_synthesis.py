"""The label-to-image generator (SynthMorph §III-A): labels and image agree, each random
factor varies as configured, draws are reproducible, bad input names the argument."""

import numpy as np
import pytest
import torch

from hybridreg import data
from hybridreg.synthesis import SynthConfig, synthesize

OFF = dict(deform_std_mm=0.0, texture_std=0.0, blur_mm=0.0, bias_std=0.0, gamma_std=0.0, noise_std=0.0)


@pytest.fixture(scope="module")
def labels():
    s = data.load_subject("synthseg_16", 2)
    from hybridreg.io import read_labels
    return torch.from_numpy(read_labels(s.labels_path)[0].astype(np.int64))[None, None]


def label_means(image, labels):
    lab, img = labels[0, 0].flatten(), image[0, 0].flatten().double()
    ids = lab.unique()
    return ids, torch.stack([img[lab == k].mean() for k in ids]), torch.stack([img[lab == k].std() for k in ids])


def test_with_every_factor_off_the_image_is_a_function_of_the_labels(labels):
    img, lab = synthesize(labels, (2.0, 2.0, 2.0), SynthConfig(**OFF), generator=torch.Generator().manual_seed(3))
    assert torch.equal(lab, labels)  # no deformation
    ids, means, stds = label_means(img, lab)
    assert float(stds.max()) < 1e-6  # constant inside every label
    assert len(set(np.round(means.numpy(), 6))) > 0.9 * len(ids)  # distinct random contrasts
    assert img.min() >= 0 and img.max() <= 1 and img.dtype == torch.float32


def test_contrast_varies_between_draws_and_repeats_with_the_seed(labels):
    cfg = SynthConfig(**{**OFF, "texture_std": 0.05, "noise_std": 0.02})
    a = synthesize(labels, (2.0,) * 3, cfg, generator=torch.Generator().manual_seed(1))[0]
    b = synthesize(labels, (2.0,) * 3, cfg, generator=torch.Generator().manual_seed(2))[0]
    a2 = synthesize(labels, (2.0,) * 3, cfg, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, a2)
    ma, mb = label_means(a, labels)[1], label_means(b, labels)[1]
    # two contrasts: label means barely correlated (independent U(0,1) draws, 30 labels)
    assert abs(float(np.corrcoef(ma.numpy(), mb.numpy())[0, 1])) < 0.7


def test_labels_deform_with_the_image(labels):
    cfg = SynthConfig(**{**OFF, "deform_std_mm": 4.0})
    img, lab = synthesize(labels, (2.0,) * 3, cfg, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(lab, labels)
    assert set(lab.unique().tolist()) <= set(labels.unique().tolist())
    stds = label_means(img, lab)[2]
    assert float(stds.max()) < 1e-6  # the image is drawn from the deformed labels: still constant per label
    moved = (lab != labels).double().mean()
    assert 0.01 < float(moved) < 0.5


@pytest.mark.parametrize("factor,value", [("texture_std", 0.1), ("blur_mm", 3.0), ("bias_std", 0.6), ("noise_std", 0.1)])
def test_each_factor_changes_the_within_label_statistics_as_configured(labels, factor, value):
    def within_std(cfg, seed):
        img = synthesize(labels, (2.0,) * 3, cfg, generator=torch.Generator().manual_seed(seed))[0]
        lab = labels[0, 0]
        big = [k for k in lab.unique().tolist() if k and (lab == k).sum() > 500]
        return np.mean([float(img[0, 0][lab == k].std()) for k in big])

    off = np.mean([within_std(SynthConfig(**OFF), s) for s in range(2)])
    on = np.mean([within_std(SynthConfig(**{**OFF, factor: value}), s) for s in range(2)])
    assert off < 1e-6 and on > 0.005, (factor, off, on)


def test_gamma_changes_the_contrast_monotonically(labels):
    base = synthesize(labels, (2.0,) * 3, SynthConfig(**OFF), generator=torch.Generator().manual_seed(7))[0]
    gam = synthesize(labels, (2.0,) * 3, SynthConfig(**{**OFF, "gamma_std": 1.0}), generator=torch.Generator().manual_seed(7))[0]
    a, b = base.flatten().numpy(), gam.flatten().numpy()
    order = np.argsort(a)
    assert np.all(np.diff(b[order]) >= -1e-6) and not np.allclose(a, b)  # x ↦ x^γ: same order, other values


def test_2d_and_bad_input():
    lab = torch.zeros(1, 1, 20, 24, dtype=torch.int64)
    lab[..., 5:15, 6:18] = 1
    lab[..., 8:12, 9:14] = 2
    img, out = synthesize(lab, (1.0, 1.0))
    assert img.shape == lab.shape and out.shape == lab.shape
    with pytest.raises(ValueError, match="`labels`"):
        synthesize(lab.float(), (1.0, 1.0))
    with pytest.raises(ValueError, match="`labels`"):
        synthesize(lab - 1, (1.0, 1.0))
    with pytest.raises(ValueError, match="`spacing`"):
        synthesize(lab, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="`texture_std`"):
        SynthConfig(texture_std=-1.0)

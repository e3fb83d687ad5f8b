import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm import preprocess


def _rand(h, w, c, seed=0):
    return np.random.default_rng(seed).integers(1, 255, size=(h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_non_square_pads_black(mode):
    arr = _rand(300, 500, 3)
    img = Image.fromarray(arr).convert(mode)
    x = preprocess(img)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    # 500 wide -> a 500x500 canvas, image rows 100..399: the bands above and below are black
    band = int(1024 * 100 / 500) - 3
    assert torch.all(x[0, :, :band, :] == 0) and torch.all(x[0, :, -band:, :] == 0)
    assert x[0, :, 512, :].mean() > 0.2  # the image itself is there


def test_tall_image_pads_left_and_right():
    x = preprocess(_rand(400, 100, 3))
    band = int(1024 * 150 / 400) - 3
    assert torch.all(x[0, :, :, :band] == 0) and torch.all(x[0, :, :, -band:] == 0)


def test_arrays_and_lists():
    gray = np.random.default_rng(1).integers(0, 255, size=(64, 48), dtype=np.uint8)
    rgba = _rand(33, 77, 4)
    x = preprocess([gray, rgba, Image.fromarray(_rand(20, 20, 3))], size=64)
    assert x.shape == (3, 3, 64, 64)
    # grayscale gives three equal channels
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])
    assert preprocess([], size=32).shape == (0, 3, 32, 32)


def test_square_matches_plain_bicubic_resize():
    arr = _rand(50, 50, 3, seed=3)
    x = preprocess(arr, size=100)
    ref = np.asarray(Image.fromarray(arr).resize((100, 100), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.allclose(x[0].permute(1, 2, 0), torch.from_numpy(ref))


@pytest.mark.parametrize("bad,exc", [(np.zeros((4, 4, 3), dtype=np.float32), TypeError),
                                     (np.zeros((4, 4, 2), dtype=np.uint8), ValueError),
                                     ("image.png", TypeError)])
def test_bad_images(bad, exc):
    with pytest.raises(exc):
        preprocess(bad)

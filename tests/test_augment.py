import math

import pytest
import torch
import torch.nn.functional as F

from contra_ray.augment import DSA, AugParams
from contra_ray.config import AUG_FAMILIES

# fixed parameters for a batch of 2 that change any image
FIXED = {
    "color": {"brightness": [0.3, -0.2], "saturation": [1.5, 0.4], "contrast": [1.2, 0.7]},
    "crop": {"shift_u": [[0.0, 0.99], [0.7, 0.2]]},
    "cutout": {"centre_u": [[0.5, 0.5], [0.1, 0.9]]},
    "flip": {"flip": [True, True]},
    "scale": {"scale": [[1.1, 0.9], [0.85, 1.15]]},
    "rotate": {"angle": [0.2, -0.25]},
}


def fixed_params(family, dtype=torch.float64):
    t = {}
    for k, v in FIXED[family].items():
        v = torch.tensor(v)
        t[k] = v if v.dtype == torch.bool else v.to(torch.float64 if k.endswith("_u") else dtype)
    return AugParams(family, t)


def batch(n=4, c=3, h=16, w=16, dtype=torch.float32, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("family", AUG_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_family_changes_input_keeps_shape_and_dtype(family, dtype):
    x = batch(2, dtype=dtype)
    y = DSA([family]).apply(x, fixed_params(family, dtype))
    assert y.shape == x.shape and y.dtype == dtype
    assert (y - x).abs().max() > 0.1
    # random draws too: 16 samples, none of the families leaves the whole batch untouched
    x16 = batch(16, dtype=dtype)
    y16 = DSA([family])(x16, seed=1)
    assert y16.shape == x16.shape and y16.dtype == dtype and not torch.equal(y16, x16)


def test_same_seed_same_output_different_seed_different():
    x = batch(8)
    dsa = DSA()
    assert torch.equal(dsa(x, seed=3), dsa(x, seed=3))
    assert not torch.equal(dsa(x, seed=3), dsa(x, seed=4))
    torch.manual_seed(7)
    a = dsa(x)
    torch.manual_seed(7)
    assert torch.equal(a, dsa(x))


def test_apply_replays_call_and_sample_covers_all_families():
    x = batch(5)
    dsa = DSA()
    seen = set()
    for seed in range(40):
        params = dsa.sample(5, torch.Generator().manual_seed(seed), dtype=x.dtype)
        seen.add(params.family)
        assert set(params.tensors) and params.n == 5
        assert torch.equal(dsa.apply(x, params), dsa(x, seed=seed))
        assert torch.equal(dsa.apply(x, params), dsa(x, generator=torch.Generator().manual_seed(seed)))
    assert seen == set(AUG_FAMILIES)


def test_float32_and_float64_draw_the_same_augmentation():
    x = batch(6, dtype=torch.float64)
    dsa = DSA()
    for seed in range(12):
        y64 = dsa(x, seed=seed)
        y32 = dsa(x.float(), seed=seed)
        torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", AUG_FAMILIES)
def test_gradcheck_float64(family):
    x = batch(2, 3, 8, 8, dtype=torch.float64).requires_grad_(True)
    params = fixed_params(family)
    dsa = DSA([family])
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,), eps=1e-6, atol=1e-5)


def test_flip_twice_is_identity():
    x = batch(6)
    dsa = DSA(["flip"])
    params = dsa.sample(6, torch.Generator().manual_seed(2))
    assert params.tensors["flip"].any() and not params.tensors["flip"].all()
    once = dsa.apply(x, params)
    assert torch.equal(once[params.tensors["flip"]], x[params.tensors["flip"]].flip(3))
    assert torch.equal(dsa.apply(once, params), x)


def test_color_does_not_clamp_and_matches_reference_formula():
    x = batch(2) * 3  # normalised / ZCA-like values, far outside [0, 1]
    p = fixed_params("color", torch.float32)
    y = DSA(["color"]).apply(x, p)
    b, s, c = (p.tensors[k].view(-1, 1, 1, 1) for k in ("brightness", "saturation", "contrast"))
    ref = x + b
    ref = (ref - ref.mean(1, keepdim=True)) * s + ref.mean(1, keepdim=True)
    ref = (ref - ref.mean((1, 2, 3), keepdim=True)) * c + ref.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, ref)
    assert y.min() < -1.0 and y.max() > 2.0


@pytest.mark.parametrize("family", ["scale", "rotate"])
def test_scale_rotate_equal_reference_affine_grid(family):
    x = batch(2, 3, 8, 10, dtype=torch.float64)  # non-square: the normalised-coordinate convention matters
    p = fixed_params(family)
    y = DSA([family]).apply(x, p)
    if family == "scale":
        s = p.tensors["scale"]
        theta = torch.zeros(2, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    else:
        a = p.tensors["angle"]
        theta = torch.zeros(2, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)


def test_crop_is_integer_shift_with_zero_fill():
    x = batch(2, 1, 16, 16)
    p = AugParams("crop", {"shift_u": torch.tensor([[0.0, 0.99], [0.5, 0.5]], dtype=torch.float64)})
    y = DSA(["crop"]).apply(x, p)
    # s = int(16 * 0.125 + 0.5) = 2: u=0 -> -2, u=0.99 -> +2, u=0.5 -> 0; out[r, c] = x[r + dy, c + dx]
    expected = torch.zeros_like(x[0])
    expected[:, 2:, :14] = x[0, :, :14, 2:]
    assert torch.equal(y[0], expected)
    assert torch.equal(y[1], x[1])


def test_cutout_zeroes_a_half_size_square():
    x = batch(2, 3, 16, 16) + 10  # no zeros in the input
    p = AugParams("cutout", {"centre_u": torch.tensor([[0.5, 0.5], [0.0, 0.99]], dtype=torch.float64)})
    y = DSA(["cutout"]).apply(x, p)
    # side 8, centre floor(u * 17): (8, 8) -> rows/cols 4..11; (0, 16) -> rows 0..3, cols 12..15 (overhang)
    zero0 = torch.zeros(16, 16, dtype=torch.bool)
    zero0[4:12, 4:12] = True
    zero1 = torch.zeros(16, 16, dtype=torch.bool)
    zero1[0:4, 12:16] = True
    assert torch.equal(y[0] == 0, zero0.expand(3, 16, 16))
    assert torch.equal(y[1] == 0, zero1.expand(3, 16, 16))
    assert torch.equal(y[0][:, ~zero0], x[0][:, ~zero0])


def test_siamese_pair_applies_identical_transforms():
    x = batch(6)
    for family in AUG_FAMILIES:
        dsa = DSA([family])
        a, b = dsa.siamese_pair(x, x.clone(), torch.Generator().manual_seed(2))
        assert torch.equal(a, b)
        if family != "color":  # geometric ops are linear in x: same params => b = 2 a
            a, b = dsa.siamese_pair(x, 2 * x, torch.Generator().manual_seed(2))
            torch.testing.assert_close(b, 2 * a)
    with pytest.raises(ValueError, match="same-size"):
        DSA().siamese_pair(x, x[:3], torch.Generator())


def test_siamese_mode_shares_one_draw_across_the_batch():
    dsa = DSA(siamese=True)
    x = batch(1).expand(5, -1, -1, -1).contiguous()  # five copies of one image
    for seed in range(12):
        params = dsa.sample(5, torch.Generator().manual_seed(seed))
        for v in params.tensors.values():
            assert torch.equal(v, v[:1].expand_as(v))
        y = dsa.apply(x, params)
        assert torch.equal(y, y[:1].expand_as(y))
    params = DSA(siamese=False).sample(5, torch.Generator().manual_seed(0))
    assert any(not torch.equal(v, v[:1].expand_as(v)) for v in params.tensors.values())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="'noise'"):
        DSA(["color", "noise"])
    dsa = DSA()
    with pytest.raises(ValueError, match="3 samples"):
        dsa.apply(batch(4), dsa.sample(3, torch.Generator()))
    with pytest.raises(ValueError, match="not both"):
        dsa(batch(2), generator=torch.Generator(), seed=1)
    assert DSA("color_crop").families == ("color", "crop")
    assert DSA().strategy == "color_crop_cutout_flip_scale_rotate"


def test_rotate_angle_range_and_scale_range():
    g = torch.Generator().manual_seed(0)
    a = DSA(["rotate"]).sample(2000, g).tensors["angle"]
    assert a.abs().max() <= math.radians(15) and a.abs().max() > math.radians(14.5)
    s = DSA(["scale"]).sample(2000, g).tensors["scale"]
    assert s.min() >= 1 / 1.2 and s.max() < 1.2 and s.min() < 0.84 and s.max() > 1.19

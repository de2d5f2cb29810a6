"""Feature skew: per-client levels, exact per-client transforms, determinism, bad input."""

import numpy as np
import pytest
import torch

from pflbench.core.feature_skew import (FEATURE_SKEWS, apply_feature_skew, client_levels, client_noise,
                                        rotate)
from pflbench.errors import UserError

CLIENTS = [np.array([0, 3, 6, 9, 12]), np.array([1, 4, 7, 10, 13]), torch.tensor([2, 5, 8, 11, 14])]
UNOWNED = [15, 16, 17]  # rows of no client


def images(channels=1, n=18, seed=0):
    return torch.randn(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", FEATURE_SKEWS)
def test_same_seed_same_output_other_seed_other_levels(kind):
    x = images(3)
    a = apply_feature_skew(x, CLIENTS, kind, 30.0, seed=1)
    assert torch.equal(a, apply_feature_skew(x, CLIENTS, kind, 30.0, seed=1))
    assert not np.array_equal(client_levels(kind, 30.0, 3, 1), client_levels(kind, 30.0, 3, 2))
    assert not torch.equal(a, apply_feature_skew(x, CLIENTS, kind, 30.0, seed=2))


@pytest.mark.parametrize("kind", FEATURE_SKEWS)
def test_strength_zero_is_an_exact_copy_and_input_is_untouched(kind):
    x = images()
    before = x.clone()
    out = apply_feature_skew(x, CLIENTS, kind, 0.0, seed=3)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    apply_feature_skew(x, CLIENTS, kind, 20.0, seed=3)
    assert torch.equal(x, before)


@pytest.mark.parametrize("kind", FEATURE_SKEWS)
def test_rows_of_no_client_are_unchanged(kind):
    x = images(3)
    out = apply_feature_skew(x, CLIENTS, kind, 45.0, seed=4)
    assert torch.equal(out[UNOWNED], x[UNOWNED])
    assert all(not torch.equal(out[torch.as_tensor(c)], x[torch.as_tensor(c)]) for c in CLIENTS)


def test_noise_is_exactly_each_clients_own_draw_at_its_own_level():
    x = images(3)
    out = apply_feature_skew(x, CLIENTS, "noise", 0.5, seed=5)
    levels = client_levels("noise", 0.5, 3, seed=5)
    for i, c in enumerate(CLIENTS):
        c = torch.as_tensor(c)
        assert torch.equal(out[c], x[c] + float(levels[i]) * client_noise(x[c].shape, 5, i))
    # a client's noise does not depend on the other clients
    alone = apply_feature_skew(x, [np.array([], dtype=np.int64), CLIENTS[1]], "noise", 0.5, seed=5)
    assert torch.equal(alone[CLIENTS[1]], out[CLIENTS[1]])


def test_rotate_gives_each_client_its_own_angle():
    x = images(3)
    out = apply_feature_skew(x, CLIENTS, "rotate", 90.0, seed=6)
    for i, (c, angle) in enumerate(zip(CLIENTS, client_levels("rotate", 90.0, 3, seed=6))):
        c = torch.as_tensor(c)
        assert torch.equal(out[c], rotate(x[c], float(angle)))


@pytest.mark.parametrize("channels", [1, 3])
def test_rotate_quarter_turn_is_rot90_and_zero_is_identity(channels):
    x = images(channels, n=4)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-6, rtol=0)
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.allclose(rotate(x, -90.0), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.allclose(rotate(x, 180.0), torch.rot90(x, 2, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotate_turns_non_square_images_rigidly():
    x = torch.zeros(1, 1, 4, 8)
    x[0, 0, 1:3, 3:5] = 1.0  # a centred 2x2 block stays put under a quarter turn (not stretched to 1x4)
    assert torch.allclose(rotate(x, 90.0), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,low", [("rotate", -40.0), ("noise", 0.0)])
def test_levels_lie_in_their_range_and_differ_across_clients(kind, low):
    levels = client_levels(kind, 40.0, 50, seed=7)
    assert levels.shape == (50,)
    assert levels.min() >= low and levels.max() <= 40.0
    assert len(np.unique(levels)) == 50
    if kind == "rotate":
        assert levels.min() < 0 < levels.max()


def test_overlapping_clients_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        apply_feature_skew(images(), [np.array([0, 1]), np.array([1, 2])], "noise", 0.1, seed=0)
    with pytest.raises(ValueError, match="overlap"):
        apply_feature_skew(images(), [np.array([0, 0])], "rotate", 10.0, seed=0)


@pytest.mark.parametrize("kind,strength,match", [("blur", 1.0, "choose one of rotate, noise"),
                                                 ("noise", -0.1, ">= 0"), ("rotate", -5.0, ">= 0"),
                                                 ("noise", float("nan"), ">= 0"), ("rotate", 181.0, "<= 180")])
def test_bad_input_is_a_user_error(kind, strength, match):
    with pytest.raises(UserError, match=match):
        apply_feature_skew(images(), CLIENTS, kind, strength, seed=0)
    with pytest.raises(UserError, match=match):
        client_levels(kind, strength, 3, seed=0)

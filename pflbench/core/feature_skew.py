"""Feature skew: every client sees its inputs through a transform of its own.

A label partition makes clients differ in p(y); feature skew makes them differ in p(x|y) too.
Each client gets one level, and its rows of the preloaded, standardized dataset tensor are
transformed with it ONCE at load time (never per batch), so a sample looks the same every epoch:

- ``rotate``: images turned by the client's angle about their centre (positive is
  counter-clockwise, as ``torch.rot90``), the per-client form of Rotated MNIST (Lopez-Paz &
  Ranzato 2017, GEM; per-cluster rotations as in IFCA, Ghosh et al. 2020).
- ``noise``: Gaussian noise of the client's std, in standardized units, added once per sample.

Levels are drawn uniformly (rotate: angle in [-strength, strength] degrees; noise: std in
[0, strength]) from a generator seeded by (seed, salt). NIID-Bench (Li et al., ICDE 2022) uses a
fixed ladder instead, std = strength * i / (N - 1) for client i, and fresh noise at every access.
We draw so that seeds vary the levels as well as the data, and no client index is tied to a level
(client order follows the partition and means nothing); the ladder would spread levels more evenly
across few clients. Our noise is fixed per sample, like every other pixel of the preloaded pool.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pflbench.core.training import stream_seed
from pflbench.errors import UserError

FEATURE_SKEWS = ("rotate", "noise")
ROTATE_CHUNK = 4096  # images per grid_sample call: bounds the sampling grid's memory
LEVEL_SALT = "feature-skew levels"
NOISE_SALT = "feature-skew noise"


def _validate(kind: str, strength: float) -> None:
    if kind not in FEATURE_SKEWS:
        raise UserError(f"unknown feature skew '{kind}'; choose one of {', '.join(FEATURE_SKEWS)}")
    if not (math.isfinite(strength) and strength >= 0):
        raise UserError(f"feature skew strength must be a finite number >= 0 (got {strength}); 0 turns it off")
    if kind == "rotate" and strength > 180:
        raise UserError(f"rotate strength is a maximum angle in degrees and must be <= 180 (got {strength})")


def client_levels(kind: str, strength: float, num_clients: int, seed: int) -> np.ndarray:
    """Each client's level: rotate, an angle in degrees uniform in [-strength, strength]; noise,
    a std uniform in [0, strength] (in units of the standardized pixels)."""
    _validate(kind, strength)
    rng = np.random.default_rng(stream_seed(seed, LEVEL_SALT))
    low = -strength if kind == "rotate" else 0.0
    return rng.uniform(low, strength, size=num_clients)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """NCHW images turned by `degrees` about the centre, bilinear.

    The sampling grid is in pixel-area coordinates (``align_corners=False``), so a quarter turn of
    a square image maps pixel centres onto pixel centres and equals ``torch.rot90`` up to float32
    rounding of the grid (exact for 8x8 or 32x32, ~1e-5 for 28x28; ``align_corners=True`` rounds
    about twice as coarsely). The aspect ratio is folded into the matrix, so non-square images
    turn rigidly too. Corners that come from outside the image are filled with 0, which in the
    standardized tensor is the per-channel mean: the least informative constant (``border`` would
    smear the edge pixels of natural images inwards; on MNIST-like data 0 is a faint grey, not the
    black background of classic Rotated MNIST).
    """
    n, _, h, w = images.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]],
                         dtype=images.dtype, device=images.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def client_noise(shape: torch.Size, seed: int, client: int) -> torch.Tensor:
    """Unit Gaussian noise for one client's rows, from a CPU generator seeded by (seed, client):
    the same whatever the device, and independent of every other client."""
    gen = torch.Generator().manual_seed(stream_seed(seed, NOISE_SALT, client))
    return torch.randn(shape, generator=gen)


def _as_index(idx: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(idx if isinstance(idx, torch.Tensor) else np.asarray(idx),
                           dtype=torch.long).to(device)


def apply_feature_skew(x: torch.Tensor, client_indices: list[np.ndarray | torch.Tensor], kind: str,
                       strength: float, seed: int) -> torch.Tensor:
    """A new tensor: client i's rows of `x` transformed with client i's level, every other row
    copied unchanged; `x` itself is not modified. Client index sets must be disjoint (checked:
    a row in two clients, or twice in one, raises ValueError)."""
    _validate(kind, strength)
    out = x.clone()
    if strength == 0:
        return out
    indices = [_as_index(raw, x.device) for raw in client_indices]
    taken = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for idx in indices:
        taken.index_add_(0, idx, torch.ones_like(idx))
    if len(x) and int(taken.max()) > 1:
        raise ValueError("client index sets overlap: a row belongs to two clients (or twice to one)")
    levels = client_levels(kind, strength, len(indices), seed)
    for client, (idx, level) in enumerate(zip(indices, levels)):
        if len(idx) == 0:
            continue
        if kind == "noise":
            rows = x[idx]
            out[idx] = rows + float(level) * client_noise(rows.shape, seed, client).to(x.device, x.dtype)
        else:
            for chunk in idx.split(ROTATE_CHUNK):
                out[chunk] = rotate(x[chunk], float(level))
    return out

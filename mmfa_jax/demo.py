"""`mmfa demo`: prune the visual tokens of a real image with a colour prompt, and time it.

No trained weights exist here, so the model is built to make importance meaningful: a patch's
key carries the patch's mean colour (centred) in a few channels of every head, the prompt's
colour word carries its colour in the same channels of its query, and the rest is random. The
text rows then attend most to the patches whose colour matches the prompt, so the kept patches
can be checked against the answer the pixels give (the patches closest to that colour).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import string
import time

import jax
import jax.numpy as jnp
import numpy as np

COLOURS = {
    "red": (0.85, 0.15, 0.15), "green": (0.2, 0.7, 0.25), "blue": (0.15, 0.25, 0.75), "yellow": (0.9, 0.85, 0.2),
    "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05), "orange": (0.95, 0.55, 0.1),
    "purple": (0.5, 0.2, 0.6), "brown": (0.45, 0.3, 0.15), "grey": (0.5, 0.5, 0.5),
}
CONFIGS = {  # (heads, head_dim, image size, batch, keep): moderate and heavy as in the MMFA benchmarks
    "cpu": (4, 64, 224, 1, 0.25),
    "moderate": (12, 64, 224, 1, 0.4),
    "heavy": (16, 128, 336, 2, 0.5),
}


def default_image() -> str:
    """A photograph that ships with matplotlib."""
    import matplotlib.cbook

    return matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def load_frames(paths, size: int) -> np.ndarray:
    """(F, size, size, 3) float32 RGB in [0, 1] from image files (one per frame)."""
    from PIL import Image

    frames = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0
              for p in paths]
    return np.stack(frames)


def prompt_colour(prompt: str) -> str:
    """The first colour the prompt names (a word of COLOURS, punctuation around it ignored)."""
    for word in prompt.lower().split():
        if word.strip(string.punctuation) in COLOURS:
            return word.strip(string.punctuation)
    raise ValueError(f"the prompt must name a colour, one of {', '.join(COLOURS)}; got {prompt!r}")


def patch_colours(frames: np.ndarray, patch: int) -> np.ndarray:
    """(F * P, 3) mean colour of every patch, frame by frame, row-major."""
    F, H, W, _ = frames.shape
    g = frames.reshape(F, H // patch, patch, W // patch, patch, 3)
    return g.mean(axis=(2, 4)).reshape(-1, 3)


@dataclasses.dataclass
class Tokens:
    q: jax.Array  # (B, T, N, D)
    k: jax.Array
    v: jax.Array
    visual_mask: jax.Array  # (B, T) bool
    colours: np.ndarray  # (V, 3) mean colour of every visual token
    target: np.ndarray  # (3,) the prompt's colour


def build_tokens(frames: np.ndarray, patch: int, prompt: str, heads: int, head_dim: int, batch: int,
                 dtype, seed: int = 0) -> Tokens:
    """A sequence [2 text tokens, the visual tokens, the prompt's tokens] turned into q, k, v.

    Every head gives the colour match a weight of ``gain`` over 3 channels; the other channels
    are random with unit variance, as an untrained layer's would be."""
    words = prompt.lower().split()
    target = np.asarray(COLOURS[prompt_colour(prompt)], np.float32)
    colours = patch_colours(frames, patch)
    V, n_text = len(colours), 2 + len(words)
    T = V + n_text
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, T, heads, head_dim)).astype(np.float32) * 0.5
    k = rng.standard_normal((batch, T, heads, head_dim)).astype(np.float32) * 0.5
    v = rng.standard_normal((batch, T, heads, head_dim)).astype(np.float32)
    visual = np.zeros((batch, T), bool)
    visual[:, 2:2 + V] = True
    gain = 3.0 * math.sqrt(head_dim)
    centred = colours - colours.mean(axis=0)
    k[:, 2:2 + V, :, :3] = centred[None, :, None, :] / (np.linalg.norm(centred, axis=1).max() + 1e-6)
    q[:, 2 + V:, :, :3] = gain * (target - colours.mean(axis=0))[None, None, None, :]
    cast = (lambda x: jnp.asarray(x, dtype))
    return Tokens(cast(q), cast(k), cast(v), jnp.asarray(visual), colours, target)


def colour_answer(colours: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """The n patches whose centred colour points most along the prompt's: what the scores
    should find. Indices into the visual tokens."""
    centred = colours - colours.mean(axis=0)
    score = centred @ (target - colours.mean(axis=0))
    return np.sort(np.argsort(-score, kind="stable")[:n])


def median_ms(launch, wait, repeats: int, calls: int = 10) -> float:
    """Median milliseconds per call: each sample launches ``calls`` calls back to back and waits
    once, so the GPU's queue stays full and one host sync is spread over many calls."""
    wait(launch())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = launch()
        wait(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e3


def save_overlay(frame: np.ndarray, kept_patches: np.ndarray, patch: int, path: str, title: str):
    """The image with dropped patches dimmed and kept ones outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    side = frame.shape[0] // patch
    keep = np.zeros(side * side, bool)
    keep[kept_patches] = True
    shade = np.where(np.repeat(np.repeat(keep.reshape(side, side), patch, 0), patch, 1)[..., None], 1.0, 0.25)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3))
    axes[0].imshow(frame)
    axes[0].set_title("input")
    axes[1].imshow(frame * shade)
    for p in np.flatnonzero(keep):
        r, c = divmod(int(p), side)
        axes[1].add_patch(Rectangle((c * patch, r * patch), patch, patch, fill=False, lw=0.6, ec="yellow"))
    axes[1].set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

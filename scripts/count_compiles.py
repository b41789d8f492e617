"""How many compiles each warm ``generate`` of a tiny random VLM triggers (it should be none).

  python scripts/count_compiles.py --device cuda --families llava qwen2_5_vl gemma3 [--explain]

Runs ``generate`` several times on the same inputs per family, with and without pruning, and
prints the XLA compiles and the Triton-route kernel compiles of each run (mmfa_jax.compiles).
``--explain`` turns on jax's explanations of cache misses (on stderr).
"""

import argparse

import jax
import torch

from mmfa_jax import compiles
from mmfa_torch import hf
from mmfa_torch.testing import vlms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", nargs="+", default=["llava", "qwen2_5_vl", "gemma3"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--explain", action="store_true")
    args = p.parse_args(argv)
    if args.explain:
        jax.config.update("jax_explain_cache_misses", True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for family in args.families:
        for prune in (False, True):
            model = vlms.build(family, dtype=dtype, device=args.device)
            inputs = vlms.make_inputs(model, family, images_per_example=(1,), device=args.device, dtype=dtype)
            handle = hf.prune_visual_tokens(model, args.keep, layer=1) if prune else None
            for run in range(args.runs):
                with compiles.counted() as seen, torch.no_grad():
                    model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
                print(f"{family:12s} {'prune' if prune else 'dense':6s} run {run}: {seen}", flush=True)
            if handle is not None:
                handle.remove()


if __name__ == "__main__":
    main()

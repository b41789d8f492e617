"""Helpers for mmfa's tests and benchmarks, not for the runtime: nothing in ``mmfa_jax`` or
``mmfa_torch`` imports this package.

``vlms``: randomly initialised vision-language models of the families ``mmfa_torch.hf`` supports (tiny
configs for the test suite, full-size ones for ``bench/vlm.py``) and prompts for them. It imports
transformers (the ``hf`` extra).
"""

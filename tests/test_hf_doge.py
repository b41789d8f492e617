"""Doge (transformers ``models/doge``) on mmfa's dynamic mask attention (``mmfa_torch.hf.doge``).

Tiny random Doge models (2 layers, GQA 4/2 heads of 8) on CPU against the same model on Doge's own
eager path (its (B, H, T, S) float mask, ``torch.topk`` per row): logits, greedy generation with a
KV cache, a training step's gradients of every parameter, padded batches. A and dt_proj are drawn
at random: Doge initialises A to 0, where every zoh is 1 and the top-k is one big tie (see the
module's docstring). Prompts hold distinct tokens and generation forbids repeats
(``no_repeat_ngram_size=1``, on both paths alike): the first layer's values depend on the token
only, so a repeated token ties with itself, and mmfa breaks ties by key index where ``torch.topk``
documents no order.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling_doge = pytest.importorskip("transformers.models.doge.modeling_doge",
                                    reason=f"transformers {transformers.__version__} has no models/doge")

from mmfa_torch.hf import doge  # noqa: E402

VOCAB, T = 96, 14
TOL = 1e-4  # of max |reference|: float32 through 2 layers (observed ~1e-6); a slip in the kept set is ~1e-1


def config(keep: int, **kw):
    return transformers.DogeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, keep_window_size=keep, max_position_embeddings=128, initializer_range=0.2,
        attention_bias=kw.pop("attention_bias", False), pad_token_id=0, attn_implementation="eager", **kw)


def make_model(seed: int, keep: int, **kw):
    torch.manual_seed(seed)
    model = transformers.DogeForCausalLM(config(keep, **kw)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, modeling_doge.DogeAttention):
                m.A.uniform_(-2.0, -0.2)  # zoh = exp(A softplus(.)) spread over (0, 1): no ties
                m.dt_proj.weight.normal_(0.0, 0.5)
    return model


def prompts(B: int, L: int = T):
    """(B, L) ids, distinct within a row, no padding id (0)."""
    return torch.stack([torch.randperm(VOCAB - 1)[:L] + 1 for _ in range(B)])


@pytest.fixture
def seed(rng):
    return int(rng.integers(2**31))


@pytest.fixture
def calls(monkeypatch):
    """The (T, S, keep) of every dynamic_mask_attention call the patched layers make; Doge's dense
    mask builder raises, so a test passes only if the patched path never builds it."""
    seen = []
    inner = doge.dynamic_mask_attention

    def spy(query, key, value, zoh, **kw):
        seen.append((query.shape[2], key.shape[2], kw["keep_window_size"]))
        return inner(query, key, value, zoh, **kw)

    monkeypatch.setattr(doge, "dynamic_mask_attention", spy)
    return seen


def no_dense_mask(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("prepare_dynamic_mask ran: the dense (B, H, T, S) mask was built")

    monkeypatch.setattr(modeling_doge.DogeAttention, "prepare_dynamic_mask", refuse)


def close(actual, expected, what, tol=TOL):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("keep,kernels", [(5, "xla"), (5, "interpret"), (64, "xla")],
                         ids=["topk-xla", "topk-interpret", "all-kept-xla"])
def test_logits(seed, keep, kernels, calls, monkeypatch):
    model = make_model(seed, keep, attention_bias=keep > T)  # dt_proj with a bias in one case
    ids = prompts(2)
    with torch.no_grad():
        ref = model(ids).logits
        handle = doge.use_mmfa(model, implementation=kernels)
        assert model.config._attn_implementation == doge.NAME
        with monkeypatch.context() as mp:
            no_dense_mask(mp)
            out = model(ids).logits
        handle.remove()
        assert model.config._attn_implementation == "eager"
        again = model(ids).logits
    close(out, ref, f"logits (keep_window_size={keep}, {kernels})")
    assert calls == [(T, T, keep)] * 2
    assert torch.equal(again, ref), "remove() did not give the model its own attention back"
    if keep < T:  # the top-k really drops keys: keeping every key gives other logits
        wide = make_model(seed, 10 * T)
        with torch.no_grad():
            differs = (wide(ids).logits - ref).abs().max().item()
        assert differs > 100 * TOL * ref.abs().max().item()


@pytest.mark.parametrize("keep", [6, 64], ids=["topk", "all-kept"])
def test_greedy_generation(seed, keep, calls, monkeypatch):
    model = make_model(seed, keep)
    ids = prompts(2, 8)
    kw = dict(max_new_tokens=6, do_sample=False, no_repeat_ngram_size=1, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        handle = doge.use_mmfa(model, implementation="xla")
        with monkeypatch.context() as mp:
            no_dense_mask(mp)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        handle.remove()
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits) == 6
    for i, (a, e) in enumerate(zip(out.logits, ref.logits)):
        close(a, e, f"logits of step {i}")
    steps = [(t, s) for t, s, _ in calls if t == 1]
    assert len(steps) == 2 * 5 and max(s for _, s in steps) == 13  # decode steps over the cache, on mmfa
    if keep < 8:  # the top-k drops keys at every step
        assert all(s > keep for _, s in steps)


@pytest.mark.parametrize("kernels", ["xla", "interpret"])
def test_training_gradients(seed, kernels, calls):
    model = make_model(seed, 5, attention_bias=True).train()
    ids = prompts(2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row; labels ignore it
    # No loss on the logits of padded positions (the next label of the last pad included): those
    # rows are padding, computed differently by the two paths and read by no real row.
    ignore = mask == 0
    ignore[:, 1:] |= mask[:, :-1] == 0
    labels = ids.masked_fill(ignore, -100)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = step()
    handle = doge.use_mmfa(model, implementation=kernels)
    loss, got = step()
    handle.remove()
    close(loss, ref_loss, "loss")
    assert set(got) == set(ref) == {n for n, _ in model.named_parameters()}
    for name in ref:
        close(got[name], ref[name], f"gradient of {name}", tol=2 * TOL)
    for name in ("A", "dt_proj.weight", "dt_proj.bias"):
        for layer in range(2):
            g = ref[f"model.layers.{layer}.self_attn.{name}"]
            assert g.abs().max() > 0, f"layer {layer} {name}: zero reference gradient, nothing compared"
    assert len(calls) == 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(seed, side, calls):
    """Padded batches: logits of the real tokens; left padding also generates (segment ids over the
    cache), right padding takes the key-length path."""
    model = make_model(seed, 5)
    ids = prompts(3)
    lengths = [T, T - 4, T - 7]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        handle = doge.use_mmfa(model, implementation="xla")
        out = model(ids, attention_mask=mask).logits
        kind = handle._state.memo[2]
        kw = dict(max_new_tokens=6, do_sample=False, no_repeat_ngram_size=1, pad_token_id=0)
        gen = model.generate(ids, attention_mask=mask, **kw) if side == "left" else None
        handle.remove()
        if gen is not None:
            assert torch.equal(gen, model.generate(ids, attention_mask=mask, **kw))
    real = mask.bool()
    close(out[real], ref[real], f"logits of the real tokens ({side} padding)")
    assert ("segment_ids" if side == "left" else "key_value_seq_lengths") in kind


def cache_name() -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    names = inspect.signature(transformers.DogeForCausalLM.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def test_refusals(seed):
    with pytest.raises(NotImplementedError, match="sliding_window"):
        doge.use_mmfa(make_model(seed, 5, sliding_window=4))
    with pytest.raises(ValueError, match="no DogeAttention"):
        doge.use_mmfa(torch.nn.Linear(2, 2))
    model = make_model(seed, 5, attention_dropout=0.1).train()
    handle = doge.use_mmfa(model, implementation="xla")
    with pytest.raises(NotImplementedError, match="dropout"):
        model(prompts(1))
    model.eval()
    ids = prompts(1)
    dense = torch.ones(1, 1, T, T, dtype=torch.bool).tril()  # a prepared 4-D mask
    with pytest.raises(NotImplementedError, match="4-D"):
        model(ids, attention_mask=dense)
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(NotImplementedError, match="static"):
        model(ids, use_cache=True, **{cache_name(): cache})
    handle.remove()
    handle.remove()  # idempotent
    assert model.config._attn_implementation == "eager"
    assert "forward" not in model.model.layers[0].self_attn.__dict__

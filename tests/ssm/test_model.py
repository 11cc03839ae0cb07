"""The model around the mixers: padding never changes a classifier's output, LM outputs are causal,
and the SSM parameters are found for their optimizer group."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ssm import config as config_lib
from ssm import model as model_lib
from tests.numerics import rel


# Causal-only mixers, sized for d_model 16.
MIXER_KWARGS = {"mamba": dict(d_state=4), "mamba2": dict(d_state=8, headdim=8, chunk_size=8),
                "hyena": dict(max_length=24, filter_order=8),
                "attention": dict(num_heads=2, num_kv_heads=1, window=4, block_size=4),
                "gated_deltanet": dict(num_heads=2, head_dim_k=8, chunk_size=4)}


def _mixer_kwargs(name, bidirectional):
  if name == "long_conv":
    return dict(max_length=24, bidirectional=bidirectional)
  return MIXER_KWARGS.get(name, dict(d_state=8, bidirectional=bidirectional))


def _model(pool="mean", task="classify", bidirectional=True, prenorm=False, input_="tokens",
           pattern="s4d"):
  names = pattern.split(",")
  cfg = config_lib.build(model=dict(
      task=task, input=input_, d_model=16, n_layers=2 * len(names), pattern=pattern, pool=pool,
      prenorm=prenorm, mlp_ratio=2,
      mixers={name: _mixer_kwargs(name, bidirectional) for name in names}))
  config_lib.validate(cfg)
  return model_lib.build_model(cfg.model, num_outputs=7, vocab_size=12 if input_ == "tokens" else 0)


@pytest.mark.parametrize("pool, bidirectional, pattern", [
    ("mean", False, "s4d"), ("mean", True, "s4d"), ("last", False, "s4d"), ("last", True, "s4d"),
    ("mean", True, "s4,s4d,s5"), ("last", False, "s4,s4d,s5"), ("mean", False, "mamba,mamba2"),
    ("mean", True, "long_conv"), ("last", False, "long_conv,hyena")])
def test_classifier_ignores_padding(pool, bidirectional, pattern):
  model = _model(pool=pool, bidirectional=bidirectional, pattern=pattern)
  rng = np.random.default_rng(0)
  lengths = np.array([9, 17])
  tokens = rng.integers(1, 12, size=(2, 24)).astype(np.int32)
  mask = np.arange(24)[None] < lengths[:, None]
  # Padding positions carry random tokens: the model must not see them.
  params = model.init(jax.random.PRNGKey(0), tokens, mask=mask)
  apply = jax.jit(model.apply)
  padded, _ = apply(params, tokens, mask=mask)
  for b, n in enumerate(lengths):
    alone, _ = apply(params, tokens[b:b + 1, :n], mask=np.ones((1, n), bool))
    assert rel(padded[b], alone[0]) < 1e-5


def test_lm_outputs_are_causal():
  model = _model(task="lm", bidirectional=False, prenorm=True, input_="continuous")
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 12, 1))
  params = model.init(jax.random.PRNGKey(0), x)
  jac = jax.jacfwd(lambda x: model.apply(params, x)[0][0, :, 0])(x)[:, 0, :, 0]  # [out_pos, in_pos]
  jac = np.abs(np.asarray(jac))
  # The FFT convolution leaves round-off (~1e-9) where the exact answer is 0.
  assert np.triu(jac, k=1).max() < 1e-6 * jac.max()
  assert np.diag(jac).min() > 1e-4 * jac.max()


def test_ssm_parameters_are_declared_by_the_mixer():
  model = _model()
  names = model_lib.ssm_param_names(model.pattern)
  params = model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
  leaf_names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  # A mixer declares every name its options can create; this S4D (exp/none transforms) has these.
  assert {"log_dt", "log_A_real", "A_imag", "B"} <= names & leaf_names
  assert not names & {"kernel", "bias", "scale", "embedding", "D", "C"}


def _lm(pattern, n_layers, **model):
  names = pattern.split(",")
  cfg = config_lib.build(model=dict(
      task="lm", d_model=16, n_layers=n_layers, pattern=pattern, mlp_ratio=2, prenorm=True,
      mixers={name: _mixer_kwargs(name, False) for name in names}, **model))
  config_lib.validate(cfg)
  return model_lib.build_model(cfg.model, num_outputs=11, vocab_size=11)


LM_PATTERN = "s4d,mamba,mamba2,long_conv,hyena,attention,gated_deltanet"


def test_tied_lm_head_is_the_scaled_embedding_and_starts_near_uniform():
  """logits = final_norm(x) @ E^T / sqrt(d_model). At initialisation the loss is then within a
  couple of nats of log(vocab) (the residual stream still holds the current token's embedding, so
  its own logit stands out by about sqrt(d_model)); unscaled it starts near d_model nats."""
  vocab, d = 256, 64
  cfg = config_lib.build(model=dict(task="lm", d_model=d, n_layers=2, pattern="mamba,attention",
                                    norm="rms", prenorm=True, tie_embeddings=True,
                                    mixers=dict(mamba={}, attention=dict(num_heads=2))))
  model = model_lib.build_model(cfg.model, num_outputs=vocab, vocab_size=vocab)
  tokens = jax.random.randint(jax.random.key(3), (4, 32), 0, vocab)
  params = jax.jit(model.init)(jax.random.key(4), tokens)
  logits, _ = jax.jit(model.apply)(params, tokens)
  hidden = jax.jit(lambda p, t: model.apply(p, t, method=lambda m, t: m.final_norm(_trunk(m, t))))(
      params, tokens)
  table = np.asarray(params["params"]["embed"]["embedding"], np.float64)
  expected = np.einsum("bld,vd->blv", np.asarray(hidden, np.float64), table) / np.sqrt(d)
  assert rel(logits, expected) < 1e-5
  log_probs = jax.nn.log_softmax(logits[:, :-1])
  loss = -float(np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(tokens)[:, 1:, None],
                                           axis=-1)))
  assert np.log(vocab) - 0.5 < loss < np.log(vocab) + 2.5, (loss, np.log(vocab))


def _trunk(model, tokens):
  x, _ = model.groups(model.embed(tokens), None, None, None)
  return x


def test_scanned_groups_equal_unrolled_groups():
  scanned = _lm("mamba,attention", 4)
  unrolled = scanned.clone(scan_layers=False)
  remat = scanned.clone(remat="full")
  tokens = np.random.default_rng(0).integers(0, 11, (2, 13)).astype(np.int32)
  params = jax.jit(scanned.init)(jax.random.PRNGKey(0), tokens)
  stacked = params["params"]["groups"]
  assert jax.tree.leaves(stacked)[0].shape[0] == 2  # n_groups on the leading axis
  per_group = {f"group_{g}": jax.tree.map(lambda a: a[g], stacked) for g in range(2)}
  params_unrolled = {"params": {**{k: v for k, v in params["params"].items() if k != "groups"},
                                **per_group}}
  loss = lambda m, p: (m.apply(p, tokens)[0] ** 2).mean()
  y, g = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(params)
  y_u, g_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params_unrolled)
  y_r, g_r = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  assert rel(y_u, y) < 1e-6 and rel(y_r, y) < 1e-6
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  for gg in range(2):
    assert rel(flat(jax.tree.map(lambda a: a[gg], g["params"]["groups"])),
               flat(g_u["params"][f"group_{gg}"])) < 1e-5
  assert rel(flat(g_r), flat(g)) < 1e-5


def test_bf16_compute_keeps_float32_parameters_and_logits():
  model = _lm(LM_PATTERN, 7)
  model16 = model.clone(dtype="bfloat16")
  tokens = np.random.default_rng(1).integers(0, 11, (2, 13)).astype(np.int32)
  params = jax.jit(model16.init)(jax.random.PRNGKey(0), tokens)
  assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype("float32")}
  y16 = jax.jit(model16.apply)(params, tokens)[0]
  y32 = jax.jit(model.apply)(params, tokens)[0]
  assert y16.dtype == np.float32
  assert rel(y16, y32) < 3e-2


def test_lm_streaming_through_the_model_cache_equals_the_parallel_form():
  model = _lm(LM_PATTERN, 14)
  tokens = np.random.default_rng(2).integers(0, 11, (2, 13)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  full = jax.jit(model.apply)(params, tokens)[0]
  apply = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
  cache = model.init_cache(2)
  outs = []
  # A prompt, one token, then more: two chunk lengths, so the cached apply compiles twice.
  for start, end in [(0, 6), (6, 7), (7, 13)]:
    y, cache = apply(params, tokens[:, start:end], cache)
    outs.append(y)
  assert rel(np.concatenate(outs, axis=1), full) < 1e-5


def test_two_tower_head_is_the_pooled_trunk_of_each_document():
  """Retrieval: logits = out(gelu(pair_hidden([u, v, u*v, u-v]))) with u, v the pooled trunk
  outputs of each document run on its own; and padding of either document does not matter."""
  model = _model(task="retrieval")
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 12, (3, 10, 2)).astype(np.int32)
  mask = np.ones((3, 10, 2), bool)
  mask[0, 6:, 0] = False
  mask[1, 3:, 1] = False
  params = model.init(jax.random.PRNGKey(0), tokens, mask=mask)
  logits, _ = model.apply(params, tokens, mask=mask)
  assert logits.shape == (3, 7)
  # The trunk alone: the same parameters in a plain classifier whose head returns the pooled
  # features (an identity "out" layer of size d_model).
  trunk = model.clone(head="classify", num_outputs=16)
  trunk_params = {"params": {k: v for k, v in params["params"].items()
                             if k not in ("out", "pair_hidden")}}
  trunk_params["params"]["out"] = {"kernel": np.eye(16, dtype=np.float32),
                                   "bias": np.zeros(16, np.float32)}
  u, _ = trunk.apply(trunk_params, tokens[..., 0], mask=mask[..., 0])
  v, _ = trunk.apply(trunk_params, tokens[..., 1], mask=mask[..., 1])
  p = params["params"]
  hidden = jax.nn.gelu(np.concatenate([u, v, u * v, u - v], -1) @ p["pair_hidden"]["kernel"]
                       + p["pair_hidden"]["bias"])
  expected = hidden @ p["out"]["kernel"] + p["out"]["bias"]
  assert rel(logits, expected) < 1e-5
  scrambled = np.where(mask, tokens, rng.integers(1, 12, tokens.shape)).astype(np.int32)
  assert rel(model.apply(params, scrambled, mask=mask)[0], logits) < 1e-6

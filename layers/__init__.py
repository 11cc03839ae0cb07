"""Sequence mixers for JAX: pure functions on arrays and the Flax linen modules around them.

`layers` is the leaf of the project: it depends on jax, flax and einops only, never on `ssm`.
"""

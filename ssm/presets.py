"""Model presets named after the architectures they follow, at sizes of about 125M / 350M / 1.3B
parameters (with a 50304-token vocabulary), plus a `tiny` size for tests.

    model_preset("gdn_h1", "350m") -> dict for `ssm.config.build(model=...)`

    preset         one group of the pattern                       follows
    transformer    global attention + MLP                         a Llama-style baseline
    mamba          Mamba (no MLP)                                 the Mamba-1 baseline
    mamba2_hybrid  5 x Mamba-2 (no MLP), global attention + MLP   Mamba-2 + a few attention layers
    gdn_h1         Gated DeltaNet + MLP, sliding-window attn+MLP  Gated DeltaNet-H1
    samba          Mamba + MLP, sliding-window attention + MLP    Samba
    griffin        2 x recurrent + MLP, local attention + MLP     Griffin (Mamba-2 for its RG-LRU)
    hyena          Hyena + MLP                                    Hyena

Sizes: d_model 768 / 1024 / 2048 with a layer count chosen per preset so that the total (with
the embedding tied to the LM head) lands near the nominal size
(`python -m ssm info --config experiments/lm/preset.py:<preset>-<size>` prints the exact count).
MLPs are SwiGLU with hidden size 8/3 d_model (rounded to a multiple of 64), so an attention + MLP
block has about 12 d_model^2 parameters, as a classic Transformer layer.
"""

from __future__ import annotations

from typing import Any

SIZES = ("tiny", "125m", "350m", "1.3b")
VOCAB = 50304

_D_MODEL = {"tiny": 32, "125m": 768, "350m": 1024, "1.3b": 2048}
# Number of pattern groups per size (n_layers = groups x entries per group).
_GROUPS = {
    "transformer": {"tiny": 2, "125m": 12, "350m": 24, "1.3b": 24},
    "mamba": {"tiny": 2, "125m": 24, "350m": 48, "1.3b": 48},
    "mamba2_hybrid": {"tiny": 1, "125m": 4, "350m": 7, "1.3b": 7},
    "gdn_h1": {"tiny": 1, "125m": 6, "350m": 12, "1.3b": 12},
    "samba": {"tiny": 1, "125m": 6, "350m": 12, "1.3b": 12},
    "griffin": {"tiny": 1, "125m": 4, "350m": 8, "1.3b": 8},
    "hyena": {"tiny": 2, "125m": 12, "350m": 24, "1.3b": 24},
}
PRESETS = tuple(_GROUPS)


def _mlp_ratio(d: int) -> float:
  hidden = max(64, round(8 * d / 3 / 64) * 64)
  return hidden / d


def _attention(d: int, size: str, window: int | None) -> dict[str, Any]:
  tiny = size == "tiny"
  return dict(type="attention", num_heads=2 if tiny else d // 64,
              window=(16 if tiny else window) if window else None,
              max_length=256 if tiny else 4096, block_size=16 if tiny else 128)


def model_preset(name: str, size: str) -> dict[str, Any]:
  """The `model` section of preset `name` at `size` (see the module docstring)."""
  if name not in _GROUPS:
    raise ValueError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
  if size not in SIZES:
    raise ValueError(f"unknown preset size {size!r} (known: {', '.join(SIZES)})")
  d = _D_MODEL[size]
  tiny = size == "tiny"
  mlp = _mlp_ratio(d)
  mamba = dict(type="mamba", d_state=16, expand=2, mlp_ratio=0)
  mamba2 = dict(type="mamba2", d_state=16 if tiny else 128, headdim=16 if tiny else 64,
                chunk_size=16 if tiny else 64, mlp_ratio=0)
  gdn = dict(type="gated_deltanet", num_heads=2 if tiny else max(1, d // 256),
             head_dim_k=16 if tiny else 128, expand_v=2.0, chunk_size=16 if tiny else 64)
  groups = {
      "transformer": ("attn", dict(attn=_attention(d, size, None))),
      "mamba": ("mamba", dict(mamba=mamba)),
      "mamba2_hybrid": ("m2,m2,m2,m2,m2,attn", dict(m2=mamba2, attn=_attention(d, size, None))),
      "gdn_h1": ("gdn,swa", dict(gdn=gdn, swa=_attention(d, size, 2048))),
      "samba": ("mamba,swa", dict(mamba=dict(mamba, mlp_ratio=mlp), swa=_attention(d, size, 2048))),
      "griffin": ("rec,rec,local", dict(rec=dict(mamba2, mlp_ratio=mlp),
                                        local=_attention(d, size, 1024))),
      "hyena": ("hyena", dict(hyena=dict(type="hyena", max_length=256 if tiny else 4096,
                                         filter_order=16 if tiny else 64))),
  }
  pattern, mixers = groups[name]
  n_entries = len(pattern.split(","))
  return dict(task="lm", input="tokens", vocab_size=256 if tiny else VOCAB, tie_embeddings=True,
              d_model=d,
              n_layers=_GROUPS[name][size] * n_entries, pattern=pattern, mixers=mixers,
              mlp_ratio=mlp, norm="rms", prenorm=True, dropout=0.0, mlp_activation="swiglu")

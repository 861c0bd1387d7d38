"""The released Gemma text models as data: every Gemma 1, 2 and 3 variant's
published hyperparameters, and the LLMConfig each one is.

A checkpoint holds its shapes but not its family's constants (soft caps,
sliding windows, RoPE bases, the query scale) nor which way its MLP gating is
stored, so the loader (`gemma_loader`) looks the checkpoint's shapes up here
(or takes the variant the config names) instead of guessing them from a rule.
The query scale is the trap: most variants scale queries by head_dim ** -0.5,
but Gemma 2 27B and Gemma 3 27B by (embed_dim / num_heads) ** -0.5 (144 and
168, not their head_dim of 128); no rule over the shapes gets all nine right.

Sources: the Gemma, Gemma 2 and Gemma 3 technical reports (arXiv 2403.08295,
2408.00118, 2503.19786) and the `gemma` library's configs
(`gemma.gm.nn.Gemma2_2B ...`, gemma 3.3.0), which tests/test_gemma_variants.py
compares field by field when the library is installed. Gemma 1 is no longer in
that library; its values are the report's and the released checkpoints' shapes.
"""

from __future__ import annotations

import dataclasses

from infra.errors import ConfigError
from userllm.models import llm

FAMILIES = ("gemma1", "gemma2", "gemma3")
QUERY_SCALES = ("head_dim", "embed_per_head")  # queries x (that) ** -0.5


@dataclasses.dataclass(frozen=True)
class Variant:
  """One released Gemma text model. Shapes first, then the family constants."""
  family: str
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int  # the gated MLP's hidden width (the library's hidden_dim)
  vocab_size: int  # embedding rows of the released checkpoint
  query_scale_by: str = "head_dim"  # QUERY_SCALES
  sliding_window: int = 0  # local layers attend to |i - j| < window
  global_every: int = 1  # every n-th layer (the last of each n) is global
  local_rope_base: int = 10_000
  global_rope_base: int = 10_000
  global_rope_scale: float = 1.0  # global layers' positions / this
  attn_logit_softcap: float = 0.0
  final_logit_softcap: float = 0.0
  gating_transposed: bool = False  # checkpoint stores gating as [2, mlp, embed]

  @property
  def post_norms(self) -> bool:
    return self.family != "gemma1"

  @property
  def qk_norm(self) -> bool:
    return self.family == "gemma3"

  def shapes(self) -> dict:
    """The fields a checkpoint's parameter shapes determine."""
    return {k: getattr(self, k) for k in SHAPE_FIELDS}


SHAPE_FIELDS = ("num_layers", "embed_dim", "num_heads", "num_kv_heads",
                "head_dim", "mlp_dim")

_GEMMA2 = dict(family="gemma2", vocab_size=256_128, sliding_window=4096,
               global_every=2, attn_logit_softcap=50.0, final_logit_softcap=30.0)
_GEMMA3 = dict(family="gemma3", vocab_size=262_144, global_every=6,
               global_rope_base=1_000_000, gating_transposed=True)

VARIANTS: dict[str, Variant] = {
    "gemma_2b": Variant("gemma1", 18, 2048, 8, 1, 256, 16_384, 256_128),
    "gemma_7b": Variant("gemma1", 28, 3072, 16, 16, 256, 24_576, 256_128),
    "gemma2_2b": Variant(num_layers=26, embed_dim=2304, num_heads=8,
                         num_kv_heads=4, head_dim=256, mlp_dim=9216, **_GEMMA2),
    "gemma2_9b": Variant(num_layers=42, embed_dim=3584, num_heads=16,
                         num_kv_heads=8, head_dim=256, mlp_dim=14_336,
                         gating_transposed=True, **_GEMMA2),
    "gemma2_27b": Variant(num_layers=46, embed_dim=4608, num_heads=32,
                          num_kv_heads=16, head_dim=128, mlp_dim=36_864,
                          gating_transposed=True, query_scale_by="embed_per_head",
                          **_GEMMA2),
    "gemma3_270m": Variant(num_layers=18, embed_dim=640, num_heads=4,
                           num_kv_heads=1, head_dim=256, mlp_dim=2048,
                           sliding_window=512, **_GEMMA3),
    "gemma3_1b": Variant(num_layers=26, embed_dim=1152, num_heads=4,
                         num_kv_heads=1, head_dim=256, mlp_dim=6912,
                         sliding_window=512, **_GEMMA3),
    "gemma3_4b": Variant(num_layers=34, embed_dim=2560, num_heads=8,
                         num_kv_heads=4, head_dim=256, mlp_dim=10_240,
                         sliding_window=1024, global_rope_scale=8.0, **_GEMMA3),
    "gemma3_12b": Variant(num_layers=48, embed_dim=3840, num_heads=16,
                          num_kv_heads=8, head_dim=256, mlp_dim=15_360,
                          sliding_window=1024, global_rope_scale=8.0, **_GEMMA3),
    "gemma3_27b": Variant(num_layers=62, embed_dim=5376, num_heads=32,
                          num_kv_heads=16, head_dim=128, mlp_dim=21_504,
                          sliding_window=1024, global_rope_scale=8.0,
                          query_scale_by="embed_per_head", **_GEMMA3),
}

# The family constants of a model that is no released variant (trained here,
# or a checkpoint of other shapes): the library's defaults for the family,
# which are its smallest and most common setting (queries by head_dim ** -0.5).
FAMILY_DEFAULTS: dict[str, Variant] = {
    "gemma1": VARIANTS["gemma_2b"],
    "gemma2": VARIANTS["gemma2_2b"],
    "gemma3": VARIANTS["gemma3_4b"],
}


def query_scale(variant: Variant, embed_dim: int, num_heads: int,
                head_dim: int) -> float:
  """The factor queries are multiplied by, for these shapes under `variant`'s rule."""
  if variant.query_scale_by == "embed_per_head":
    return (embed_dim // num_heads) ** -0.5
  return head_dim ** -0.5


def family_fields(variant: Variant, embed_dim: int, num_heads: int,
                  head_dim: int) -> dict:
  """The LLMConfig fields a checkpoint's shapes do not hold, as `variant` sets
  them (the query scale computed for the given shapes; 0, LLMConfig's
  head_dim ** -0.5, where that is the rule)."""
  by_embed = variant.query_scale_by == "embed_per_head"
  return dict(
      post_norms=variant.post_norms, qk_norm=variant.qk_norm,
      query_scale=(query_scale(variant, embed_dim, num_heads, head_dim)
                   if by_embed else 0.0),
      attn_logit_softcap=variant.attn_logit_softcap,
      final_logit_softcap=variant.final_logit_softcap,
      sliding_window=variant.sliding_window, global_every=variant.global_every,
      rope_max_wavelength=variant.local_rope_base,
      rope_global_wavelength=(variant.global_rope_base
                              if variant.global_rope_base != variant.local_rope_base
                              else 0),
      rope_global_scale=variant.global_rope_scale)


def llm_config(name: str, vocab_size: int | None = None, **overrides
               ) -> llm.LLMConfig:
  """The released variant `name` as our LLMConfig (vocab_size: the rows to
  use; by default the release's). `overrides` set other LLMConfig fields
  (dtype, adapter, cross-attention)."""
  v = get(name)
  fields = dict(v.shapes(), vocab_size=vocab_size or v.vocab_size,
                **family_fields(v, v.embed_dim, v.num_heads, v.head_dim))
  return llm.LLMConfig(**{**fields, **overrides}).validate()


def get(name: str) -> Variant:
  if name not in VARIANTS:
    raise ConfigError(f"config.llm.variant={name!r} is not a released Gemma variant: "
                     f"{', '.join(VARIANTS)}")
  return VARIANTS[name]


def resolve(family: str, shapes: dict, named: str = "") -> Variant:
  """The released variant whose constants a checkpoint of `family` and
  `shapes` (SHAPE_FIELDS) takes: the one `named` (config.llm.variant), else
  the one of these shapes, else the family's defaults. Prints which, and why."""
  shown = ", ".join(f"{k}={v}" for k, v in shapes.items())
  if named:
    variant = get(named)
    if variant.family != family:
      raise ConfigError(f"config.llm.variant={named!r} is a {variant.family} model but "
                       f"the checkpoint's keys are {family}'s")
    if variant.shapes() != shapes:
      print(f"[gemma] the checkpoint ({shown}) is not {named}'s shape; its "
            f"constants are used as llm.variant asks", flush=True)
    return variant
  name = match(family, shapes)
  if name:
    print(f"[gemma] {name}: the released shapes; its published constants",
          flush=True)
    return VARIANTS[name]
  default = FAMILY_DEFAULTS[family]
  print(f"[gemma] a {family} checkpoint of no released shape ({shown}): the "
        f"family's constants are used (queries x {default.query_scale_by} ** "
        f"-0.5, window {default.sliding_window}); set config.llm.variant to "
        f"take another variant's", flush=True)
  return default


def match(family: str, shapes: dict) -> str | None:
  """The released variant of `family` with exactly these shapes, or None."""
  found = [name for name, v in VARIANTS.items()
           if v.family == family and v.shapes() == shapes]
  return found[0] if found else None


def scratch_fields(family: str, variant: str, shapes: dict) -> dict:
  """LLMConfig fields of an LM built here (no checkpoint): the released
  `variant`'s shapes and constants when one is named, else `shapes` (the
  config's) with the constants of `family`'s default variant (the config's
  own RoPE base kept)."""
  if variant:
    v = get(variant)
    return dict(v.shapes(), **family_fields(v, v.embed_dim, v.num_heads,
                                            v.head_dim))
  if family not in FAMILY_DEFAULTS:
    raise ConfigError(f"config.llm.family={family!r} is not one of {FAMILIES}")
  constants = family_fields(FAMILY_DEFAULTS[family], shapes["embed_dim"],
                            shapes["num_heads"], shapes["head_dim"])
  constants.pop("rope_max_wavelength")
  return dict(shapes, **constants)

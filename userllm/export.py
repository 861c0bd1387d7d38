"""A trained LLM written out in the layout Google released Gemma in
(`main.py --mode=export`, docs/using.md), with what User-LLM adds beside it,
and read back (`read`).

    <out>/
      export.json      what lies where: the LLM's released variant, its config,
                       how its adapters were handled, the User-LLM parts
      README.md        the same for a reader, with the calls that load it
      tokenizer.model  the SentencePiece vocabulary the LLM reads
      llm/             the LLM, LoRA merged into its weights: the released Gemma
                       flat layout (an orbax PyTree, `transformer/layer_0/attn/
                       q_einsum -> {"w"}`, ...), which `gemma.gm.ckpts.
                       load_params` and `gemma_loader.load_checkpoint` read
      adapters/        only for MoLoRA / MoDE / molora_sd (they route each token,
                       so no single merged weight exists): an orbax PyTree
                       {layer_<i>: {attn|mlp: {<target>_adapter: {a, b, ...}}}}
      user_model/      only for User-LLM methods with a user encoder: an orbax
                       PyTree {encoder, perceiver, projector, cross_attention:
                       {cross_attention_<i>: ...gates}, ...} (our module names)

The released layout holds shapes, not constants: the MLP gating is written the
way the model's released variant stores it (`Variant.gating_transposed`: [2,
mlp, embed] for Gemma 2 9B / 27B and Gemma 3), q, k and v fused into
`qkv_einsum` for multi-head models (as the library builds them), and
export.json names the variant whose constants the LLM has, plus any field in
which it differs (`load_overrides`), so a reader loads exactly our model.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from data.vocab import Tokenizer
from infra import paths, results
from infra.errors import ConfigError, ModelFileError
from userllm.models import adapters, gemma_loader, gemma_variants, llm

MANIFEST, README = "export.json", "README.md"
LLM_DIR, ADAPTER_DIR, USER_DIR = "llm", "adapters", "user_model"
TOKENIZER = "tokenizer.model"
CROSS = "cross_attention"  # user_model/'s subtree of the LLM's cross-attention blocks
# LLMConfig fields an LLM built here shares with every reader of the export
# only through export.json (the layout holds none of them)
_LAYOUT_FREE = ("cross_attention_every", "cross_attention_gate_init", "dtype")


def family_of(cfg: llm.LLMConfig) -> str:
  """gemma1 | gemma2 | gemma3: the family whose layer keys the export holds."""
  return "gemma3" if cfg.qk_norm else ("gemma2" if cfg.post_norms else "gemma1")


def released_variant(cfg: llm.LLMConfig, named: str = "") -> str:
  """The released variant whose constants and gating layout `cfg` takes: the
  one `named` (config.llm.variant), else the one of its shapes, else its
  family's default, as the loader resolves a checkpoint (prints which)."""
  shapes = {k: getattr(cfg, k) for k in gemma_variants.SHAPE_FIELDS}
  variant = gemma_variants.resolve(family_of(cfg), shapes, named)
  return next(n for n, v in gemma_variants.VARIANTS.items() if v is variant)


def load_overrides(cfg: llm.LLMConfig, variant: str) -> dict:
  """The constants in which `cfg` differs from `variant`'s at its shapes:
  what `gemma_loader.load_checkpoint(..., variant=variant, **these)` needs to
  rebuild `cfg` (e.g. a shorter sliding window)."""
  expected = gemma_variants.family_fields(gemma_variants.get(variant), cfg.embed_dim,
                                          cfg.num_heads, cfg.head_dim)
  return {k: getattr(cfg, k) for k, v in expected.items() if getattr(cfg, k) != v}


def split_llm(params: dict, cfg: llm.LLMConfig):
  """Our LLM's parameters -> (the Gemma weights, LoRA merged in; the
  cross-attention blocks; the unmerged adapters or None; how the adapters
  were handled). Host arrays throughout."""
  kind = cfg.adapter.kind
  unmerged = None
  if kind == "lora":  # merge_lora folds with jax ops (device or host arrays in)
    params, _ = adapters.merge_lora(jax.tree.map(jnp.asarray, params), cfg)
    handled = "merged into the weights"
  elif cfg.adapter.enabled:
    unmerged = _adapter_subtrees(params)
    params = _without_adapters(params)
    handled = (f"{kind} routes each token, so it has no merged weight: the base "
               f"weights are in {LLM_DIR}/, the adapters beside them in {ADAPTER_DIR}/")
  else:
    handled = "none"
  params = jax.device_get(params)
  cross = {k: v for k, v in params.items() if k.startswith(CROSS)}
  gemma = {k: v for k, v in params.items() if not k.startswith(CROSS)}
  return gemma, cross, unmerged, handled


def _adapter_subtrees(tree: dict) -> dict | None:
  """Only the `<target>_adapter` subtrees of `tree`, at their paths."""
  out = {}
  for key, value in tree.items():
    if key.endswith(adapters.SUFFIX):
      out[key] = value
    elif isinstance(value, dict):
      inner = _adapter_subtrees(value)
      if inner:
        out[key] = inner
  return out or None


def _without_adapters(tree: dict) -> dict:
  return {k: _without_adapters(v) if isinstance(v, dict) else v
          for k, v in tree.items() if not k.endswith(adapters.SUFFIX)}


def _shapes(tree: dict, prefix: str = "") -> dict:
  """{path: shape} of every array of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_shapes(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = list(np.shape(value))
  return out


def _jsonable(value):
  return json.loads(json.dumps(value, default=lambda v: v.tolist()
                               if hasattr(v, "tolist") else str(v)))


def _save_tree(path: str, tree: dict) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(paths.resolve(path), jax.device_get(tree))
  checkpointer.wait_until_finished()


def check_out(out: str) -> None:
  """A ConfigError unless `out` is a new or empty directory (an export never
  overwrites); called first, before the model is restored."""
  if not out:
    raise ConfigError("--mode=export needs --out=<directory> (new or empty)")
  if paths.exists(out) and (not paths.isdir(out) or paths.listdir(out)):
    raise ConfigError(f"--out={out} exists and is not an empty directory; "
                      "nothing was written: name a new directory")


def write(out: str, llm_params: dict, cfg: llm.LLMConfig, tokenizer_path: str, *,
          variant: str = "", user_parts: dict | None = None,
          user_config: dict | None = None, about: dict | None = None) -> dict:
  """Writes the export (module docstring) into `out` (`check_out`): the LLM
  `llm_params` of config `cfg` (its cross-attention blocks, if any, go to
  user_model/ with `user_parts`, the User-LLM's parameters but the LLM's),
  `tokenizer_path` copied. `variant`: config.llm.variant; `user_config`: the
  UserLLMConfig fields (JSON); `about`: what produced it (workflow, stage).
  Returns the manifest (export.json)."""
  check_out(out)
  paths.makedirs(out)
  gemma, cross, unmerged, handled = split_llm(llm_params, cfg)
  name = released_variant(cfg, variant)
  transposed = gemma_variants.get(name).gating_transposed
  fused = cfg.num_kv_heads == cfg.num_heads  # the library's qkv_einsum models
  gemma_loader.save_checkpoint(gemma, paths.join(out, LLM_DIR), fuse_qkv=fused,
                               transpose_gating=transposed)
  paths.write_bytes(paths.join(out, TOKENIZER), paths.read_bytes(tokenizer_path))
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "adapter"}
  manifest = {
      "format": 1, **(about or {}),
      "llm": {
          "path": LLM_DIR,
          "layout": "released Gemma flat layout (orbax PyTree of "
                    "transformer/<module> -> {w | scale | input_embedding})",
          "variant": name, "load_overrides": load_overrides(cfg, name),
          "family": family_of(cfg), "vocab_size": cfg.vocab_size,
          "tokenizer_pieces": Tokenizer(tokenizer_path).vocab_size,
          "embedding_rows": int(np.shape(gemma["embedder"]["input_embedding"])[0]),
          "gating_einsum": "[2, mlp, embed]" if transposed else "[2, embed, mlp]",
          "attention": "qkv_einsum [3, heads, embed, head_dim]" if fused else
                       "q_einsum [heads, embed, head_dim] + kv_einsum "
                       "[2, kv_heads, embed, head_dim]",
          "adapter": {**dataclasses.asdict(cfg.adapter), "handled": handled},
          "config": fields},
      "tokenizer": TOKENIZER, "adapters": None, "user_model": None}
  if unmerged is not None:
    _save_tree(paths.join(out, ADAPTER_DIR), unmerged)
    manifest["adapters"] = {"path": ADAPTER_DIR, "kind": cfg.adapter.kind,
                            "shapes": _shapes(unmerged)}
  user = dict(user_parts or {})
  if cross:
    user[CROSS] = cross
  if user:
    _save_tree(paths.join(out, USER_DIR), user)
    manifest["user_model"] = {"path": USER_DIR, "config": user_config or {},
                              "shapes": _shapes(user)}
  manifest = _jsonable(manifest)
  results.write_json(paths.join(out, MANIFEST), manifest)
  _write_readme(out, manifest)
  return manifest


def read_args(manifest: dict) -> dict:
  """The arguments of `gemma_loader.load_checkpoint` beside the path that
  rebuild the exported LLM (its logits' rows, its constants)."""
  about = manifest["llm"]
  return {"vocab_size": about["vocab_size"], "variant": about["variant"],
          **about["load_overrides"]}


def read(out: str) -> tuple[llm.LLMConfig, dict, dict]:
  """An export back as (LLMConfig with its cross-attention and unmerged
  adapters, the LLM's parameters with those put back, the User-LLM's other
  parameters {} if none): `{"llm": params, **user}` is a UserLLM's tree."""
  path = paths.join(out, MANIFEST)
  try:
    manifest = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ModelFileError(f"{path}: not an export of ours ({e})") from None
  about = manifest["llm"]
  cfg, params = gemma_loader.load_checkpoint(paths.join(out, about["path"]),
                                             **read_args(manifest))
  adapter = adapters.AdapterConfig()
  if manifest["adapters"]:
    spec = {k: v for k, v in about["adapter"].items() if k != "handled"}
    adapter = adapters.AdapterConfig(**{**spec, "targets": tuple(spec["targets"])})
    params = adapters.merge_trees(_restore(out, manifest["adapters"]["path"]), params)
  cfg = dataclasses.replace(cfg, adapter=adapter, **{
      k: about["config"][k] for k in _LAYOUT_FREE})
  user = _restore(out, manifest["user_model"]["path"]) if manifest["user_model"] else {}
  params.update(user.pop(CROSS, {}))
  return cfg.validate(), params, user


def _restore(out: str, name: str) -> dict:
  return ocp.StandardCheckpointer().restore(paths.resolve(paths.join(out, name)))


def _write_readme(out: str, manifest: dict) -> None:
  """README.md: what each file is and how to load it, from the manifest."""
  about = manifest["llm"]
  overrides = "".join(f", {k}={v!r}" for k, v in about["load_overrides"].items())
  lines = [
      "# Exported model", "",
      f"Written by `main.py --mode=export` from `{manifest.get('workdir', '')}` "
      f"(workflow {manifest.get('workflow', '')}; docs/using.md).", "",
      "| path | what |", "|---|---|",
      f"| `{LLM_DIR}/` | the LLM in the released Gemma flat layout "
      f"({about['family']}, constants of `{about['variant']}`"
      f"{' with ' + overrides[2:] if overrides else ''}); adapters: "
      f"{about['adapter']['handled']}; MLP gating {about['gating_einsum']}; "
      f"{about['attention']} |",
      f"| `{TOKENIZER}` | its SentencePiece vocabulary ({about['tokenizer_pieces']}"
      f" pieces; the LLM's logits cover {about['vocab_size']} ids, its "
      f"embedding has {about['embedding_rows']} rows) |"]
  if manifest["adapters"]:
    lines.append(f"| `{ADAPTER_DIR}/` | the {manifest['adapters']['kind']} "
                 "adapters, unmerged: orbax PyTree `layer_<i>/attn|mlp/"
                 "<target>_adapter/{a, b, router}` |")
  if manifest["user_model"]:
    parts = sorted(manifest["user_model"]["shapes"])
    roots = sorted({p.split("/")[0] for p in parts})
    lines.append(f"| `{USER_DIR}/` | the User-LLM's other parts, orbax PyTree: "
                 f"{', '.join(roots)} (`{CROSS}/cross_attention_<i>` holds the "
                 "LLM's gated cross-attention blocks with their `attn_gate` and "
                 "`mlp_gate`) |")
  lines += [
      "", "Load it:", "", "```python",
      "from userllm import export",
      f"cfg, llm_params, user_parts = export.read('{out}')  # our modules",
      "from userllm.models import gemma_loader",
      f"cfg, params = gemma_loader.load_checkpoint('{out}/{LLM_DIR}', "
      f"vocab_size={about['vocab_size']}, variant='{about['variant']}'{overrides})",
      "from gemma import gm  # Google DeepMind's library: the nested params",
      f"params = gm.ckpts.load_params('{out}/{LLM_DIR}')", "```", "",
      "`export.json` holds every field of the LLM's config and each part's "
      "array shapes."]
  paths.write_text(paths.join(out, README), "\n".join(lines) + "\n")

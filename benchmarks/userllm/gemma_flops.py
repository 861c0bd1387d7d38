"""LLM FLOPs at Gemma scale, without weights: User-LLM's cross-attention and
soft prompt against the text prompt, H = 50 ... 500 events.

  python -m benchmarks.userllm.gemma_flops --out benchmarks/results/gemma_flops

For Gemma 2B and 7B (v1 shapes, and Gemma 2 2B), one forward pass per example:
the analytic matmul count (`userllm.models.llm.forward_flops`) and XLA's
cost analysis of the decoder lowered from shapes alone (`jax.eval_shape`
parameters, nothing materialised; the HLO is costed before optimisation, which
for these dot-dominated graphs counts the same matmuls). The text prompt holds
the task prompt plus H events at `--tokens_per_event` tokens each (a MovieLens
title with its year, rating and separator in Gemma's 256k vocabulary is about
10); cross-attention reads the bare task prompt and attends to
`--user_tokens` Perceiver latents from a block after every 6th layer (the
paper's placement for 2B); the soft prompt puts those latents before the task
prompt. The user encoder is not counted (ours is 0.02-0.26 GFLOPs at H =
50-500, `benchmarks/results/user_llm_synthetic_efficiency.md`: under 1% of a
2B pass).

Also re-costs our small LM at the 941-token text prompt of the H = 200 row of
`benchmarks/results/user_llm_synthetic.md` on this CPU, to explain why XLA on the GPU
gave 1.23 GFLOPs there against the analytic 1.89.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from benchmarks import harness, plots
from infra import results
from userllm.models import gemma_variants, llm as llm_lib

FLAGS = (
    harness.Flag("histories", ["50", "100", "200", "500"], "H values."),
    harness.Flag("tokens_per_event", 10.0, "Text-prompt tokens per history event."),
    harness.Flag("task_tokens", 32, "Tokens of the task prompt."),
    harness.Flag("user_tokens", 32, "Perceiver latents."),
)

VOCAB = 256_128
MODELS = {
    "Gemma 2B": gemma_variants.llm_config("gemma_2b", VOCAB),
    "Gemma 7B": gemma_variants.llm_config("gemma_7b", VOCAB),
    "Gemma 2 2B": gemma_variants.llm_config("gemma2_2b", VOCAB),
}
METHODS = ("text_prompt", "soft_prompt", "cross_attention")


def xla_forward_flops(cfg: llm_lib.LLMConfig, tokens: int, user_tokens: int,
                      prefix: int, compile_: bool = False) -> float:
  """XLA's FLOPs of one forward pass over [1, tokens] from shapes alone."""
  model = llm_lib.DecoderLM(cfg)
  ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, tokens), jnp.bool_)
  extra = {}
  if user_tokens:
    extra.update(user_tokens=jax.ShapeDtypeStruct((1, user_tokens, cfg.embed_dim),
                                                  jnp.float32))
  if prefix:
    extra.update(prefix=jax.ShapeDtypeStruct((1, prefix, cfg.embed_dim), jnp.float32),
                 prefix_mask=jax.ShapeDtypeStruct((1, prefix), jnp.bool_))
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool),
      **{k: jnp.zeros((1, 2) + v.shape[2:], v.dtype) for k, v in extra.items()}
  )["params"])
  lowered = jax.jit(lambda p, t, m, e: model.apply({"params": p}, t, m, **e)[0]
                    ).lower(params, ids, mask, extra)
  cost = lowered.compile().cost_analysis() if compile_ else lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def rows_for(name: str, cfg: llm_lib.LLMConfig, histories, per_event: float,
             task: int, latents: int) -> list[dict]:
  rows = []
  cross_cfg = dataclasses.replace(cfg, cross_attention_every=6)
  for history in histories:
    for method in METHODS:
      if method == "text_prompt":
        model_cfg, tokens, user, prefix = cfg, task + round(history * per_event), 0, 0
      elif method == "soft_prompt":
        model_cfg, tokens, user, prefix = cfg, task, 0, latents
      else:
        model_cfg, tokens, user, prefix = cross_cfg, task, latents, 0
      rows.append({
          "model": name, "history": history, "method": method,
          "llm_input_tokens": tokens + prefix,
          "flops_analytic": llm_lib.forward_flops(model_cfg, tokens + prefix, user),
          "flops_xla": xla_forward_flops(model_cfg, tokens, user, prefix)})
      print(rows[-1], flush=True)
  return rows


def small_lm_check() -> dict:
  """The LM of that H = 200 row (configs/user_llm.py's shape with the tiny data's
  300-piece vocabulary, `meta.config` of its JSON) at its 941-token prompt."""
  cfg = llm_lib.LLMConfig(vocab_size=300, embed_dim=128, num_layers=2, num_heads=4,
                          num_kv_heads=1, head_dim=32, mlp_dim=512)
  tokens = 941
  return {"tokens": tokens, "analytic": llm_lib.forward_flops(cfg, tokens, 0),
          "xla_cpu_compiled": xla_forward_flops(cfg, tokens, 0, 0, compile_=True),
          "xla_cpu_lowered": xla_forward_flops(cfg, tokens, 0, 0)}


def present(payload: dict):
  rows, check, meta = payload["rows"], payload["small_lm_check"], payload["meta"]
  lines = [f"LLM forward FLOPs per example at Gemma scale, from shapes (no weights). "
           f"Text prompt = {meta['task_tokens']} task "
           f"tokens + H x {meta['tokens_per_event']:g} tokens per event; soft prompt "
           f"and cross-attention: the task prompt and {meta['user_tokens']} user "
           "tokens (cross-attention blocks after every 6th layer). GFLOPs; ratio = "
           "text prompt / method.", ""]
  by = {(r["model"], r["history"], r["method"]): r for r in rows}
  cells = []
  for (model, history, method), r in by.items():
    text = by[(model, history, "text_prompt")]
    cells.append([model, history, method, r["llm_input_tokens"],
                  f"{r['flops_analytic'] / 1e9:,.1f}", f"{r['flops_xla'] / 1e9:,.1f}",
                  "-" if method == "text_prompt" else
                  f"{text['flops_xla'] / r['flops_xla']:.1f}x"])
  lines += results.markdown_table(
      ["model", "H", "method", "LLM tokens", "GFLOPs (analytic)", "GFLOPs (XLA)",
       "text / method"], cells)
  lines += ["", f"Small-LM check ({check['tokens']}-token text prompt, the LM of "
            "configs/user_llm.py): analytic "
            f"{check['analytic'] / 1e9:.3f} GFLOPs; XLA on this CPU "
            f"{check['xla_cpu_compiled'] / 1e9:.3f} compiled, "
            f"{check['xla_cpu_lowered'] / 1e9:.3f} lowered."]
  return lines, plot(rows)


def plot(rows: list[dict]):
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plots.panels(len(models), width=4.6)
  for ax, model in zip(axes, models):
    for method in METHODS:
      mine = [r for r in rows if r["model"] == model and r["method"] == method]
      ax.plot([r["history"] for r in mine], [r["flops_xla"] / 1e9 for r in mine],
              "o-", label=method)
    ax.set(xlabel="history length H (events)", ylabel="GFLOPs / example (XLA)",
           yscale="log", title=model)
  axes[0].legend(fontsize=8)
  return fig


def measure(run: harness.Run) -> dict:
  args = run.args
  meta = {"tokens_per_event": args.tokens_per_event, "task_tokens": args.task_tokens,
          "user_tokens": args.user_tokens, "jax": jax.__version__,
          "cpu_count": os.cpu_count()}
  rows = [row for name, cfg in MODELS.items()
          for row in rows_for(name, cfg, [int(h) for h in args.histories],
                              args.tokens_per_event, args.task_tokens, args.user_tokens)]
  return {"meta": meta, "rows": rows, "small_lm_check": small_lm_check()}


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)

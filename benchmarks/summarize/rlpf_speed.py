"""RLPF's speed at configs/rlpf.py's shapes, with fresh parameters.

  python -m benchmarks.summarize.rlpf_speed --out benchmarks/results/rlpf_speed

Times, on this machine, the jitted sampling of a batch of summaries
(generated tokens/s, eos ignored: every row runs `summary_len` steps) and one
whole RL step (rollout, predictor scores, policy, reference and value passes,
update) at the config's shapes, the median of `--repeats`. No setting is
chosen.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks import harness, plots
from infra import results

FLAGS = (harness.Flag("repeats", 5, "Timed repeats."),)


def median_seconds(fn, repeats: int) -> float:
  """The median wall time of `repeats` calls of fn() after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - began)
  return float(np.median(times))


def measure(run: harness.Run) -> dict:
  from configs import rlpf as rlpf_config
  from infra.train_state import TrainState
  from summarize import rlpf, workflow
  from userllm import language_model
  from userllm.models import decoding, llm
  config = rlpf_config.get_config()
  cfg = language_model.llm_config(config, config.data.vocab_size)
  model = llm.DecoderLM(cfg)
  rl = workflow.rl_config(config, length_target=10.0)
  b, p, s = config.rl_train.batch_size, config.summary.prompt_len, rl.summary_len
  prompt = jax.random.randint(jax.random.PRNGKey(0), (b, p), 3, cfg.vocab_size)
  mask = jnp.ones((b, p), bool)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), prompt[:1], mask[:1])["params"])
  value_model = rlpf.ValueModel(cfg)
  head = value_model.init(jax.random.PRNGKey(2), prompt[:1], mask[:1])["params"]["head"]
  state_params = {"policy": params, "reference": params, "predictor": params,
                  "value": {"trunk": params, "head": head}}
  tx = rlpf.rl_optimizer(optax.adam(1e-4), state_params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=state_params,
                     opt_state=tx.init(state_params), rng=jax.random.PRNGKey(3))
  step = jax.jit(rlpf.make_rl_step(model, value_model, model, tx, rl, [3, 4], [5, 6],
                                   eos_id=-1))  # no eos: every row runs s tokens
  options = jnp.ones((b, config.rl.num_options, 8), jnp.int32)
  batch = {"prompt": prompt, "prompt_mask": mask, "options": options,
           "option_mask": options > 0, "answer": jnp.zeros(b, jnp.int32)}
  rows = b * rl.group_size
  many = jnp.repeat(prompt, rl.group_size, 0)
  rollout = median_seconds(lambda: decoding.generate(
      model, params, many, jnp.ones_like(many, bool), jax.random.PRNGKey(4),
      max_new_tokens=s, temperature=1.0, eos_id=-1), run.args.repeats)
  step_seconds = median_seconds(lambda: step(state, batch)[1]["loss"], run.args.repeats)
  return {"batch": b, "group_size": rl.group_size, "sequences": rows, "prompt_len": p,
          "summary_len": s, "vocab": cfg.vocab_size, "embed_dim": cfg.embed_dim,
          "num_layers": cfg.num_layers, "rollout_seconds": rollout,
          "generated_tokens_per_second": rows * s / rollout,
          "rl_step_seconds": step_seconds,
          "rollout_share_of_step": rollout / step_seconds}


def present(payload: dict):
  r = payload
  rollout, step = r["rollout_seconds"], r["rl_step_seconds"]
  lines = [f"RLPF speed at configs/rlpf.py's shapes: {r['sequences']} sequences "
           f"({r['batch']} prompts x {r['group_size']}) of {r['prompt_len']} prompt + "
           f"{r['summary_len']} summary tokens, a {r['num_layers']}-layer "
           f"{r['embed_dim']}-wide LM, vocabulary {r['vocab']}.", ""]
  lines += results.markdown_table(["measure", "value"], [
      [f"rollout (sampling {r['summary_len']} tokens, KV cache, in jit)",
       f"{rollout * 1e3:.0f} ms"],
      ["generated tokens/s", f"{r['generated_tokens_per_second']:.0f}"],
      ["one RL step (rollout + predictor + update)", f"{step * 1e3:.0f} ms"],
      ["rollout share of the step", f"{rollout / step:.0%}"]])
  fig, (ax,) = plots.panels(1)
  ax.barh(["rollout", "rest of the RL step"], [rollout, step - rollout])
  ax.set_xlabel("seconds")
  ax.set_title(f"RL step {step:.2f} s; {r['generated_tokens_per_second']:.0f}"
               " generated tokens/s", fontsize=9)
  return lines, fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)

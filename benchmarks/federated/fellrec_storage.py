"""FELLRec's flexible storage on the federated LLM (issue 41, item 2): what a
client stores, sends and holds in memory at each cut k, and what the server
can read from what the client sends.

  nice -n 10 python -m benchmarks.federated.fellrec_storage \\
    --config.data.source=movielens --config.data.dir=../shared/data/movielens-100k \\
    --config.llm.num_layers=4 --out benchmarks/results/fellrec_storage_ml100k

At cut k the client keeps the embeddings, the first and last k decoder
layers (base and adapters) and the final norm; the server holds the middle
(federated/llm_split.py). The split's gradients equal the plain round's
(tests/test_federated_llm_split.py), so the adapters train to the same
quality at every k; what changes is measured here:

- Stored: the client's share of the base and the adapters (bytes).
- Sent a round: the client's adapters up and down, plus per local step the
  four tensors [client batch, prompt width, embed] crossing the cuts (in the
  config's activation dtype) and the mask; local steps = ceil(max examples a client / client batch) x local
  epochs, as a round runs them.
- Memory: XLA's compiled memory (arguments + outputs + temporaries) of the
  client's two programs in a local step (front forward; last side forward
  and backward with the front's backward), the larger of the two, against
  the unsplit step, at the config's shapes and, from abstract shapes (no
  weights; the client sends the same local steps, one row each), at a released Gemma's (`--gemma_variant`, LoRA rank 4 on q, k, v
  and the attention output, one prompt of `--gemma_tokens`).
- Attacks on what the client sends (the base after the workflow's warm-up,
  `config.base_train`, with fresh adapters: the first round): a ridge
  decoder (federated/attacks.activation_inversion_accuracy) fitted on the
  crossing tensors of one half of the participating users (the server's
  auxiliary users; it can compute these with the released base and the
  adapters it aggregates) and scored on the other half: (a) the history's
  titles from the activations sent up, at every title position; (b) the
  answer (the next title, the label) from the gradient sent up at the
  position that predicts it. Top-1 accuracy against guessing the fit half's
  most common title. Beside the ridge decoder, the attacker that needs no
  fitting: each title read as the embedding row (of the released base)
  nearest in angle to the activation. Nothing is chosen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import harness, plots
from federated import attacks, llm_split, llm_task, llm_workflow
from userllm.models import adapters, gemma_variants, llm

FLAGS = (
    harness.Flag("gemma_variant", "gemma_2b", "A released Gemma whose shapes the "
                 "memory and bytes are also measured at ('' to skip)."),
    harness.Flag("gemma_cuts", ["0", "1", "3", "9"], "Cuts k at the Gemma shapes."),
    harness.Flag("gemma_tokens", 128, "Prompt tokens of the Gemma-shape step."),
    harness.Flag("attack_rows", 2048, "Example rows a side of the attack uses "
                 "(at most; the first of each half)."),
)


def local_steps(config, dataset) -> int:
  """Local steps a round runs: every client as many as the largest (padded,
  masked; algorithms.local_batch_indices)."""
  fed = config.federated
  return (math.ceil(dataset.examples.shape[1] / fed.client_batch_size)
          * fed.local_epochs)


def shape_rows(model, adapter_part, base, tokens, steps: int, batch: int,
               cuts) -> list[dict]:
  """Per cut: stored, sent and compiled-memory figures (bytes)."""
  loss = lambda logits, tokens: jnp.mean(  # noqa: E731
      llm_task.nll_of_logits(logits, tokens)[:, -1])
  rows = []
  for k in cuts:
    row = llm_split.client_cost(adapter_part, base, model.config.num_layers, k,
                                batch, tokens.shape[1], model.config.embed_dim,
                                steps, jnp.dtype(model.config.dtype).itemsize)
    row.update(llm_split.client_memory(model, loss, adapter_part, base, tokens, k))
    rows.append(row)
    print(f"[storage] k={k}: client stores {row['client_share']:.1%}, sends "
          f"{row['round_bytes'] / 2**20:.2f} MiB a round, peak "
          f"{row['client_peak'] / 2**20:.1f} MiB vs "
          f"{row['unsplit'] / 2**20:.1f} unsplit", flush=True)
  return rows


def gemma_rows(run, steps: int) -> dict:
  """The memory and bytes at a released Gemma's shapes (abstract trees)."""
  name = run.args.gemma_variant
  lora = adapters.AdapterConfig(kind="lora", rank=4, targets=("q", "k", "v", "out"))
  config = gemma_variants.llm_config(name, adapter=lora, dtype="bfloat16")
  model = llm.DecoderLM(config)
  tokens = jax.ShapeDtypeStruct((1, run.args.gemma_tokens), jnp.int32)
  whole = jax.eval_shape(lambda t: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), t, t != 0)["params"]), tokens)
  # the base at rest in bfloat16 (as released), adapters in float32
  adapter_part, base = adapters.split_adapters(whole)
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), base)
  cuts = [int(k) for k in run.args.gemma_cuts]
  return {"variant": name, "tokens": run.args.gemma_tokens,
          "rows": shape_rows(model, adapter_part, base, tokens,
                             steps, 1, cuts)}


def attack_rows(config, f, base, adapter_part, cuts, limit: int) -> list[dict]:
  """Per cut with something crossing: the two attacks' top-1 accuracy."""
  rows_, owners = f.task.client_examples(f.split.train)
  fit, score = harness.user_halves(owners, config.seed)
  fit_rows, score_rows = rows_[fit][:limit], rows_[score][:limit]
  model, is_title = f.task.model, np.asarray(f.task.is_title)
  loss = lambda logits, tokens: jnp.mean(llm_task.row_losses(  # noqa: E731
      float(config.task.history_lm_weight), f.task.is_title, logits, tokens))

  out = []
  for k in cuts:
    if model.config.num_layers - 2 * k == 0:
      continue
    step = jax.jit(lambda a, b, t, k=k: llm_split.split_value_and_grad(
        model, loss, a, b, t, k)[2])

    def crossing(rows, step=step):
      ups, grads = [], []
      for start in range(0, len(rows), 64):
        c = step(adapter_part, base, jnp.asarray(rows[start:start + 64]))
        ups.append(np.asarray(c["activations_up"]))
        grads.append(np.asarray(c["gradients_up"])[:, -2])  # predicts the answer
      return np.concatenate(ups), np.concatenate(grads)

    fit_up, fit_grad = crossing(fit_rows)
    score_up, score_grad = crossing(score_rows)
    titles_fit, titles_score = is_title[fit_rows], is_title[score_rows]
    vocab = len(is_title)
    titles = np.flatnonzero(is_title)
    true_history, true_answer = score_rows[titles_score], score_rows[:, -1]
    history_scores = attacks.ridge_decoder_scores(
        fit_up[titles_fit], fit_rows[titles_fit], score_up[titles_score], vocab)
    history = float(np.mean(history_scores.argmax(1) == true_history))
    history_auc, history_auc_se = attacks.decoder_auc(history_scores,
                                                      true_history, titles)
    del history_scores
    nearest = nearest_title_accuracy(score_up[titles_score], true_history, base,
                                     is_title)
    answer_scores = attacks.ridge_decoder_scores(fit_grad, fit_rows[:, -1],
                                                 score_grad, vocab)
    answer = float(np.mean(answer_scores.argmax(1) == true_answer))
    answer_auc, answer_auc_se = attacks.decoder_auc(answer_scores, true_answer,
                                                    titles)
    out.append({"k": k, "history_titles": history, "nearest_row": nearest,
                "history_auc": history_auc, "history_auc_se": history_auc_se,
                "answer_auc": answer_auc, "answer_auc_se": answer_auc_se,
                "history_guess": _most_common_rate(fit_rows[titles_fit],
                                                   score_rows[titles_score]),
                "answer": answer,
                "answer_guess": _most_common_rate(fit_rows[:, -1],
                                                  score_rows[:, -1]),
                "history_positions": int(titles_score.sum()),
                "answers": len(score_rows)})
    print(f"[attack] k={k}: history titles {history:.3f}, answers {answer:.3f}",
          flush=True)
  return out


def nearest_title_accuracy(activations: np.ndarray, tokens: np.ndarray,
                           base: dict, is_title: np.ndarray) -> float:
  """Top-1 accuracy of reading each title from activations [n, embed] as the
  title piece whose row of the released base's embedding table is nearest
  in angle (the attacker needs no fitting: it holds the base)."""
  table = np.asarray(base["embedder"]["input_embedding"])[:len(is_title)]
  titles = np.flatnonzero(is_title)
  rows = table[titles] / np.linalg.norm(table[titles], axis=1, keepdims=True)
  scores = activations @ rows.T  # [n, titles]: cosine x |activation|
  return float(np.mean(titles[scores.argmax(1)] == tokens))


def _most_common_rate(fit: np.ndarray, score: np.ndarray) -> float:
  """Accuracy on `score` of always guessing `fit`'s most common id."""
  values, counts = np.unique(fit, return_counts=True)
  return float(np.mean(score == values[counts.argmax()]))


def measure(run: harness.Run) -> dict:
  config, mesh = run.config, run.mesh()
  f = llm_workflow.build(config, run.workdir, mesh)
  base = jax.device_get(llm_workflow.warm_up(config, run.workdir, mesh, f))
  whole = nn.meta.unbox(f.task.init_params(jax.random.PRNGKey(config.seed)))
  adapter_part, _ = adapters.split_adapters(whole)
  layers = f.task.model.config.num_layers
  cuts = list(range(layers // 2 + 1))
  batch = config.federated.client_batch_size
  tokens = jnp.asarray(f.task.client_examples(f.split.train)[0][:batch])
  steps = local_steps(config, f.dataset)
  payload = {
      "layers": layers, "embed_dim": f.task.model.config.embed_dim,
      "local_steps": steps, "client_batch": batch,
      "width": int(tokens.shape[1]),
      "rows": shape_rows(f.task.model, adapter_part, base, tokens,
                         steps, batch, cuts),
      "attacks": attack_rows(config, f, base, adapter_part, cuts,
                             run.args.attack_rows)}
  if run.args.gemma_variant:
    payload["gemma"] = gemma_rows(run, steps)
  return payload


def _mib(value: float) -> str:
  return f"{value / 2**20:.2f}"


def present(payload: dict):
  p = payload
  lines = [
      f"FELLRec's flexible storage on the federated LLM ({p['layers']} layers, "
      f"width {p['embed_dim']}): at cut k the client keeps the embeddings and "
      "the first and last k layers (base and adapters), the server the middle. "
      f"A round: {p['local_steps']} local step(s) of {p['client_batch']} rows "
      f"of {p['width']} tokens. Memory: XLA's compiled memory of the client's "
      "larger program against the unsplit step (one device). The split's "
      "gradients equal the unsplit ones (tests), so quality does not depend on k.",
      "",
      "| k | server layers | client stores (MiB, share) | adapters sent a round "
      "(KiB) | crossing a step (KiB) | sent a round (KiB) | client peak (MiB) | "
      "unsplit (MiB) |",
      "|---|---|---|---|---|---|---|---|"]
  for r in p["rows"]:
    lines.append(
        f"| {r['k']} | {r['server_layers']} | {_mib(r['client_stored_bytes'])} "
        f"({r['client_share']:.1%}) | {2 * r['client_adapter_bytes'] / 1024:.1f} | "
        f"{r['crossing_bytes_per_step'] / 1024:.1f} | {r['round_bytes'] / 1024:.1f} | "
        f"{_mib(r['client_peak'])} | {_mib(r['unsplit'])} |")
  lines += [
      "", "Attacks on what the client sends (warmed-up base, fresh adapters; "
      "ridge decoder fitted on one half of the users, top-1 on the other; "
      "guess: the fit half's most common title; AUC: how far above the other "
      "titles the decoder ranks the true one, 0.5 reading nothing, +- one "
      "standard error over positions):", "",
      "| k | history titles from the activations sent up: ridge | its AUC | "
      "nearest embedding row | guess | answer from the gradient sent up | its "
      "AUC | guess | positions / answers scored |",
      "|---|---|---|---|---|---|---|---|---|"]
  for a in p["attacks"]:
    lines.append(f"| {a['k']} | {a['history_titles']:.3f} | "
                 f"{a['history_auc']:.3f} +- {a['history_auc_se']:.4f} | "
                 f"{a['nearest_row']:.3f} | {a['history_guess']:.3f} "
                 f"| {a['answer']:.3f} | {a['answer_auc']:.3f} +- "
                 f"{a['answer_auc_se']:.4f} | {a['answer_guess']:.3f} | "
                 f"{a['history_positions']} / {a['answers']} |")
  if "gemma" in p:
    g = p["gemma"]
    lines += [
        "", f"At {g['variant']}'s shapes (abstract, bfloat16 base, LoRA rank 4 "
        f"on q, k, v, out; one prompt of {g['tokens']} tokens):", "",
        "| k | server layers | client stores (GiB, share) | sent a round (MiB) "
        "| client peak (GiB) | unsplit (GiB) |", "|---|---|---|---|---|---|"]
    for r in g["rows"]:
      lines.append(
          f"| {r['k']} | {r['server_layers']} | "
          f"{r['client_stored_bytes'] / 2**30:.2f} ({r['client_share']:.1%}) | "
          f"{_mib(r['round_bytes'])} | {r['client_peak'] / 2**30:.2f} | "
          f"{r['unsplit'] / 2**30:.2f} |")
  return lines + [""], plot(p)


def plot(payload: dict):
  fig, (memory_ax, attack_ax) = plots.panels(2)
  rows = payload["rows"]
  ks = [r["k"] for r in rows]
  memory_ax.plot(ks, [r["client_peak"] / 2**20 for r in rows], "o-",
                 label="client peak")
  memory_ax.plot(ks, [r["client_stored_bytes"] / 2**20 for r in rows], "s-",
                 label="client stores")
  memory_ax.axhline(rows[0]["unsplit"] / 2**20, color="grey", ls="--",
                    label="unsplit step")
  memory_ax.set(xlabel="cut k", ylabel="MiB", title="client memory")
  memory_ax.legend()
  attack = payload["attacks"]
  if attack:
    ak = [a["k"] for a in attack]
    attack_ax.plot(ak, [a["history_titles"] for a in attack], "o-",
                   label="history titles (activations)")
    attack_ax.plot(ak, [a["answer"] for a in attack], "s-",
                   label="answer (gradient)")
    attack_ax.plot(ak, [a["answer_guess"] for a in attack], "x:",
                   label="most common title")
  attack_ax.set(xlabel="cut k", ylabel="top-1 accuracy", title="what leaks",
                ylim=(0, 1))
  attack_ax.legend()
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/federated_llm.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)

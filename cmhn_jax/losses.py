"""Training losses, chosen by name from `config.loss` (a `{name: weight}` dict).

`L = sum_name weight * LOSSES[name](ctx)` (DESIGN.md section 4):

* `infonce`:    symmetric InfoNCE over every pair of modalities present in the batch, with the
                model's learnable logit scale (clamped at 100 as in CLIP);
* `infoloob`:   CLOOB's InfoLOOB over Hopfield-retrieved embeddings (Fuerst et al. 2022): each
                embedding is replaced by its in-batch modern-Hopfield retrieval from both
                modalities' embeddings, then the leave-one-out bound is applied;
* `energy`:     `mean E(z_data)` of the full data tuples under the memory (`cmhn_jax.energy`);
                `beta` and the coupling are held fixed in this term, since lowering it would
                otherwise just push `beta -> 0` and the couplings up;
* `assignment`: the nearest-pattern term, `mean (1 - max_mu s_mu(z) / sum_m a_m)`: each tuple is
                pulled to its nearest pattern (spherical k-means);
* `completion`: one fixed-point retrieval step from each single-modality cue, then InfoNCE of
                the completed modality against the batch's true embeddings of that modality:
                it trains exactly what the CMHN evaluation measures (cue -> completion -> match).

`gamma = 0` (no energy terms) is the contrastive-only baseline, through the same code path.
Each loss takes a `LossContext` and returns `(scalar, metrics dict)`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from cmhn_jax import energy as E
from cmhn_jax import model as model_lib
from cmhn_jax import retrieval


class LossContext(NamedTuple):
  emb: dict[str, jax.Array]   # 'img/emb' etc., unit norm (B, d)
  z: jax.Array                # (B, M, d) stacked embeddings
  z_mask: jax.Array           # (B, M) which modalities each example has
  valid: jax.Array            # (B,) examples that count (padding excluded)
  memory: dict[str, Any]      # CMHN.memory()
  logit_scale: jax.Array
  modalities: tuple[str, ...]
  options: Any                # config.loss_options
  group: jax.Array | None = None  # (B,) relevance group; same-group pairs are positives


def _pairs(ctx: LossContext):
  present = [i for i, m in enumerate(ctx.modalities) if f"{model_lib.SHORT[m]}/emb" in ctx.emb]
  return list(itertools.combinations(present, 2))


def _positives(ctx: LossContext, n: int) -> jax.Array:
  """(B, B) positives: the diagonal, plus same-group pairs with `group_positives`.

  With several views of one item in a batch (COCO's five captions of an image, or `shapes`
  examples of one concept when the group is the concept), treating them as negatives fights the
  relevance the evaluation asks for; multi-positive InfoNCE (SupCon, Khosla et al. 2020) counts
  them as positives instead.
  """
  eye = jnp.eye(n, dtype=bool)
  if ctx.group is None or not bool(getattr(ctx.options, "group_positives", False)):
    return eye
  return eye | (ctx.group[:, None] == ctx.group[None, :])


def _masked_mean(x, keep):
  """Mean of `x` (B,) over the rows in `keep` (B,) bool; 0 when none is kept."""
  return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def _masked_ce(logits, keep_rows, keep_cols, positives=None):
  """-mean over positives of log softmax, over rows in `keep_rows`, columns in `keep_cols`.

  `positives` (B, B) defaults to the diagonal (plain InfoNCE).
  """
  logits = jnp.where(keep_cols[None, :], logits, -jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  if positives is None:
    pos_logp = jnp.diagonal(logp)
  else:  # SupCon's L_out: the mean log-probability of the positives, so all of them are pulled in
    pos = positives & keep_cols[None, :]
    pos_logp = jnp.sum(jnp.where(pos, logp, 0.0), -1) / jnp.maximum(jnp.sum(pos, -1), 1)
  return -_masked_mean(pos_logp, keep_rows)


def symmetric_infonce(a, b, scale, keep, positives=None):
  logits = scale * a @ b.T
  pos_t = None if positives is None else positives.T
  return 0.5 * (_masked_ce(logits, keep, keep, positives) + _masked_ce(logits.T, keep, keep, pos_t))


def infonce(ctx: LossContext):
  losses, metrics = [], {}
  positives = _positives(ctx, ctx.z.shape[0])
  for i, j in _pairs(ctx):
    keep = ctx.valid & ctx.z_mask[:, i] & ctx.z_mask[:, j]
    loss = symmetric_infonce(ctx.z[:, i], ctx.z[:, j], ctx.logit_scale, keep, positives)
    metrics[f"infonce/{ctx.modalities[i][:3]}_{ctx.modalities[j][:3]}"] = loss
    losses.append(loss)
  return (sum(losses) / max(len(losses), 1)), metrics


def _hopfield(state, memory, beta):
  """In-batch modern-Hopfield retrieval (CLOOB eq. 3): normalize(softmax(beta s) @ memory)."""
  attn = jax.nn.softmax(beta * state @ memory.T, axis=-1)
  return E._l2_normalize(attn @ memory)


def _info_loob(logits, keep):
  """InfoLOOB: -log( exp(l_ii) / sum_{j != i} exp(l_ij) ) averaged over kept rows."""
  n = logits.shape[0]
  off = jnp.where(jnp.eye(n, dtype=bool) | ~keep[None, :], -jnp.inf, logits)
  per = -jnp.diagonal(logits) + jax.nn.logsumexp(off, axis=-1)
  return _masked_mean(per, keep)


def infoloob(ctx: LossContext):
  beta = float(getattr(ctx.options, "cloob_beta", 14.3))
  losses, metrics = [], {}
  for i, j in _pairs(ctx):
    keep = ctx.valid & ctx.z_mask[:, i] & ctx.z_mask[:, j]
    x, y = ctx.z[:, i], ctx.z[:, j]
    u_x, u_y = _hopfield(x, x, beta), _hopfield(y, x, beta)
    v_x, v_y = _hopfield(x, y, beta), _hopfield(y, y, beta)
    loss = 0.5 * (_info_loob(ctx.logit_scale * u_x @ u_y.T, keep)
                  + _info_loob(ctx.logit_scale * v_y @ v_x.T, keep))
    metrics[f"infoloob/{ctx.modalities[i][:3]}_{ctx.modalities[j][:3]}"] = loss
    losses.append(loss)
  return (sum(losses) / max(len(losses), 1)), metrics


def _frozen_memory(ctx):
  mem = dict(ctx.memory)
  mem["beta"] = jax.lax.stop_gradient(mem["beta"])
  mem["coupling"] = jax.lax.stop_gradient(mem["coupling"])
  return mem


def energy(ctx: LossContext):
  mem = _frozen_memory(ctx)
  e = E.energy(ctx.z, z_mask=ctx.z_mask, **mem)
  loss = _masked_mean(e, ctx.valid & jnp.any(ctx.z_mask, -1))
  return loss, {"energy": loss}


def assignment(ctx: LossContext):
  mem = _frozen_memory(ctx)
  s = E.scores(ctx.z, mem["patterns"], z_mask=ctx.z_mask, coupling=mem["coupling"],
               similarity=mem["similarity"])
  weight = jnp.maximum(jnp.sum(ctx.z_mask, -1), 1)
  per = 1.0 - jnp.max(s, axis=-1) / weight
  loss = _masked_mean(per, ctx.valid & jnp.any(ctx.z_mask, -1))
  return loss, {"assignment": loss}


def completion(ctx: LossContext):
  """One fixed-point step from every single-modality cue at once (closed-form read-out)."""
  b, nm, d = ctx.z.shape
  mem = ctx.memory
  cues = jnp.broadcast_to(ctx.z[None], (nm, b, nm, d)).reshape(nm * b, nm, d)
  cue_mask = jnp.repeat(jnp.eye(nm, dtype=bool), b, axis=0)  # cue i: only modality i
  alpha = E.attention(cues, mem["patterns"], z_mask=cue_mask, coupling=mem["coupling"],
                      similarity=mem["similarity"], normalizer=mem["normalizer"], beta=mem["beta"])
  g = retrieval.readout(alpha, mem["patterns"], coupling=mem["coupling"],
                        similarity=mem["similarity"])
  completed = E._l2_normalize(g).reshape(nm, b, nm, d)
  positives = _positives(ctx, b)
  losses, metrics = [], {}
  for i, j in itertools.permutations(range(nm), 2):
    keep = ctx.valid & ctx.z_mask[:, i] & ctx.z_mask[:, j]
    loss = _masked_ce(ctx.logit_scale * completed[i, :, j] @ ctx.z[:, j].T, keep, keep, positives)
    metrics[f"completion/{ctx.modalities[i][:3]}_{ctx.modalities[j][:3]}"] = loss
    losses.append(loss)
  return (sum(losses) / max(len(losses), 1)), metrics


LOSSES: dict[str, Callable[[LossContext], tuple[jax.Array, dict]]] = {
    "infonce": infonce,
    "infoloob": infoloob,
    "energy": energy,
    "assignment": assignment,
    "completion": completion,
}


def check_loss_config(weights) -> None:
  unknown = sorted(set(weights) - set(LOSSES))
  if unknown:
    raise ValueError(f"config.loss has unknown terms {unknown}; known terms: {sorted(LOSSES)}.")


def total_loss(weights, ctx: LossContext):
  """`sum weight * loss` over the configured terms (zero weights are skipped)."""
  check_loss_config(weights)
  total, metrics = 0.0, {}
  for name, w in weights.items():
    if not w:
      continue
    value, parts = LOSSES[name](ctx)
    total = total + w * value
    metrics.update(parts)
    metrics[f"loss/{name}"] = value
  metrics["loss"] = total
  return total, metrics

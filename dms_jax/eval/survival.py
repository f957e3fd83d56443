"""Which prompt tokens a DMS model keeps: the answer's tokens (the needle) against every other token.

A learned eviction earns its name only if it keeps what the answer will need. On the retrieval tasks whose answer
is a number written in the prompt (passkey, multikey), this finds every occurrence of the answer's tokens in the
prompt and reads the model's own hard decisions over it (the full-sequence forward, ``dms_mode="hard"``). At the
end of the prompt a token outside the window is still cached by a (layer, KV head) iff that head did not mark it
(``dms.visible_if_marked``, the one window rule). Per model and task:

* ``needle_kept``: the fraction of (needle token, layer, KV head) entries still cached; ``base_kept``: the same
  over every prompt token outside the window;
* ``enrichment`` = needle_kept / base_kept: 1 for an eviction blind to content, above 1 where the answer's tokens
  are kept preferentially;
* ``recoverable_heads``: the fraction of (layer, KV head) pairs that still hold at least one whole occurrence of
  the answer, and ``per_layer`` figures for the plot.

Needles inside the last ``window`` tokens are always cached and say nothing: such cases are left out and counted.
This reads decisions only; whether the model then answers is the evaluation's business (``dms_jax.eval.run``).
"""

from __future__ import annotations

import functools

import numpy as np

from dms_jax import dms

TASKS = ("passkey", "multikey")  # answers that are copied from the prompt verbatim


def needle_occurrences(prompt_ids, answer_ids) -> list[list[int]]:
    """Every run of positions where ``answer_ids`` occurs in ``prompt_ids``; ValueError if none."""
    ids, a = list(prompt_ids), list(answer_ids)
    found = [list(range(i, i + len(a))) for i in range(len(ids) - len(a) + 1) if ids[i:i + len(a)] == a]
    if not a or not found:
        raise ValueError(f"the answer's tokens {a} do not occur in the prompt")
    return found


def kept_at_prompt_end(decisions, length: int, window: int):
    """[L, H, T] bool: which of the first ``length`` tokens are still cached after the last one, from owner
    decisions [L, H, T] (1: marked for eviction)."""
    pos = np.arange(decisions.shape[-1])
    return (decisions < 0.5) | dms.visible_if_marked(length - 1, pos, window)


def case_survival(decisions, length: int, window: int, occurrences) -> dict | None:
    """One case's counts from its owner decisions [L, H, T]; None when every needle token is inside the window."""
    kept = kept_at_prompt_end(decisions, length, window)[:, :, :length]
    old = ~dms.visible_if_marked(length - 1, np.arange(length), window)  # outside the window: decided
    needle = sorted({p for occ in occurrences for p in occ if old[p]})
    if not needle:
        return None
    whole = np.zeros(kept.shape[:2], bool)
    for occ in occurrences:
        if all(old[p] for p in occ):
            whole |= np.all(kept[:, :, occ], axis=-1)
    return {"needle_kept": kept[:, :, needle].sum(-1), "needle_n": len(needle),
            "base_kept": kept[:, :, old].sum(-1), "base_n": int(old.sum()), "whole": whole}


def summarize(per_case: list[dict | None]) -> dict:
    """The task's figures from ``case_survival`` results (None: a needle inside the window)."""
    used = [c for c in per_case if c is not None]
    if not used:
        raise ValueError("every needle was inside the window: nothing to measure")
    needle = sum(c["needle_kept"] for c in used) / sum(c["needle_n"] for c in used)  # [L, H]
    base = sum(c["base_kept"] for c in used) / sum(c["base_n"] for c in used)
    whole = np.mean([c["whole"] for c in used], axis=0)
    return {"cases": len(used), "cases_needle_in_window": len(per_case) - len(used),
            "needle_kept": float(needle.mean()), "base_kept": float(base.mean()),
            "enrichment": float(needle.mean() / max(base.mean(), 1e-9)),
            "recoverable_heads": float(whole.mean()),
            "per_layer": {"needle_kept": needle.mean(-1).tolist(), "base_kept": base.mean(-1).tolist(),
                          "recoverable_heads": whole.mean(-1).tolist()},
            "needle_kept_per_head": needle.tolist()}


@functools.cache
def _hard_decisions():
    """The jitted full-sequence hard forward -> owner decisions [L, B, H, T]; one function for every call, so that
    every task of a model reuses its compilation."""
    from flax import nnx

    return nnx.jit(lambda model, tokens, valid: model(tokens, valid=valid, dms_mode="hard")[1]["decisions"])


def model_survival(model, tokenizer, cases, batch: int = 4) -> dict:
    """``summarize`` of ``cases`` (prompts with their answers written in them) under ``model``'s hard decisions."""
    import jax.numpy as jnp

    window = model.dms_cfg.window
    width = -(-max(c.num_tokens for c in cases) // 64) * 64  # one compiled shape for the whole set
    per_case = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        tokens = np.zeros((batch, width), np.int32)
        valid = np.zeros((batch, width), bool)
        for i, c in enumerate(chunk):
            tokens[i, :c.num_tokens], valid[i, :c.num_tokens] = c.prompt_ids, True
        dec = np.asarray(_hard_decisions()(model, jnp.asarray(tokens), jnp.asarray(valid)))  # [L, B, H, T]
        for i, c in enumerate(chunk):
            occ = needle_occurrences(c.prompt_ids, tokenizer.encode(c.answer, add_special_tokens=False))
            per_case.append(case_survival(dec[:, i], c.num_tokens, window, occ))
    return summarize(per_case)


def plot(results: dict, path) -> None:
    """Needle vs base keep rate per layer, one panel per task, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = sorted({t for m in results["models"] for t in m["tasks"]})
    fig, axes = plt.subplots(1, len(task_names), figsize=(6 * len(task_names), 4), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        for k, m in enumerate(results["models"]):
            r = m["tasks"].get(task)
            if r is None:
                continue
            layers = np.arange(len(r["per_layer"]["needle_kept"]))
            color = f"C{k}"
            ax.plot(layers, r["per_layer"]["needle_kept"], color=color, marker="o", ms=3,
                    label=f"{m['label']}: needle (x{r['enrichment']:.2f})")
            ax.plot(layers, r["per_layer"]["base_kept"], color=color, ls="--", label=f"{m['label']}: all tokens")
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction still cached at the prompt's end")
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}: answer tokens vs all tokens outside the window")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The original model and its DMS retrofit side by side on the same long prompts, through the paged engine.

An adapter-only retrofit keeps every base weight, so the original model is the retrofitted model run without
eviction (``Engine(model, "vanilla")``) and the retrofit is the same model with its learned eviction
(``Engine(model, "dms")``); a low-rank retrofit (dms_jax.lowrank) changed the base weights, so its original is the
base model loaded on its own. Each prompt goes to both; each answer comes with its score and its KV-cache figures
from the engine's RequestMetrics: entries held at most (and the bytes of the pages holding them), decode reads, and
the measured whole-cache compression, dense entries / live entries at the end.

Prompts (``demo_prompts``): retrieval in several wording families (``tasks.WORDINGS``), a question about a fact in
the middle of a document of real text, and a two-turn exchange (the second user turn asks another key of the same
document; the history is prefilled again, not continued).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time

import numpy as np

from dms_jax.chat import chat_prompt
from dms_jax.eval import tasks
from dms_jax.eval.passkey import MULTIKEY_WORDINGS
from dms_jax.eval.prompts import Case, natural_filler_sentences, user_message
from dms_jax.serve.engine import Engine

# (task, wording family) of the retrieval prompts; the multi-turn exchange uses multikey in its default family.
RETRIEVAL = (("passkey", "ruler"), ("passkey", "natural"), ("multikey", "document"), ("variable_tracking", "rules"))
MULTI_TURN = ("multikey", "plain")
# A fact placed in the middle of a document, the question about it, and the words that count as the answer.
DOCUMENT_FACTS = (
    ("The spare key to the server room is kept in the green box under the reception desk.",
     "What colour is the box that holds the spare key to the server room?", ("green",)),
    ("The night train to the coast leaves from platform nine every evening.",
     "From which platform does the night train to the coast leave?", ("nine", "9")),
    ("The quarterly review was moved to the harbour office in Bergen.",
     "In which city is the harbour office where the quarterly review was moved?", ("bergen",)),
)
DOCUMENT_TEMPLATE = ("Read the document below, then answer the question after it.\n\nDocument:\n{doc}\n"
                     "End of document.\n\nQuestion: {question} Answer in a few words.")


@dataclasses.dataclass(frozen=True)
class DemoPrompt:
    name: str  # what it tests, e.g. "passkey (natural)"
    case: Case
    follow_up: bool = False  # ask another key of the same document in a second user turn


def document_question_case(tokenizer, target_tokens: int, seed: int = 0) -> Case:
    """A fact in the middle of real held-out text (``prompts.natural_filler_sentences``), asked about at the end;
    about ``target_tokens`` tokens in all."""
    fact, question, keys = DOCUMENT_FACTS[seed % len(DOCUMENT_FACTS)]
    pool = natural_filler_sentences()
    start = (seed * 97) % len(pool)

    def prompt(n: int) -> list[int]:
        sentences = list(itertools.islice(itertools.cycle(pool[start:] + pool[:start]), n))
        doc = " ".join(sentences[:n // 2] + [fact] + sentences[n // 2:])
        return chat_prompt(tokenizer, DOCUMENT_TEMPLATE.format(doc=doc, question=question))

    empty, probe = len(prompt(0)), len(prompt(40))
    n = max(0, round((target_tokens - empty) * 40 / max(probe - empty, 1)))
    while len(prompt(n + 1)) <= target_tokens:  # the closest length not over the target
        n += 1
    while n > 0 and len(prompt(n)) > target_tokens:
        n -= 1
    meta = {"task": "document_question", "wording": "natural", "keys": keys, "fact": fact, "depth": 0.5}
    return Case(prompt_ids=tuple(prompt(n)), answer=keys[0], meta=meta)


def demo_prompts(tokenizer, target_tokens: int = 1024, cases: int = 1, seed: int = 0) -> list[DemoPrompt]:
    """`cases` prompts of each kind: the RETRIEVAL families, the document question and the two-turn exchange."""
    out = []
    for task, wording in RETRIEVAL:
        for c in tasks.make_cases(task, tokenizer, cases, seed, wording=wording, target_tokens=target_tokens):
            out.append(DemoPrompt(f"{task} ({wording})", c))
    out += [DemoPrompt("document, middle fact", document_question_case(tokenizer, target_tokens, seed + i))
            for i in range(cases)]
    task, wording = MULTI_TURN
    for c in tasks.make_cases(task, tokenizer, cases, seed + 1, wording=wording, target_tokens=target_tokens):
        out.append(DemoPrompt(f"two turns, turn 1 ({task})", c, follow_up=True))
    return out


def follow_up_case(tokenizer, case: Case, first_answer: str) -> Case:
    """The second user turn after a multikey case and the model's own answer: asks the next label's number."""
    labels, values = list(case.meta["labels"]), list(case.meta["values"])
    j = (labels.index(case.meta["label"]) + 1) % len(labels)
    question = MULTIKEY_WORDINGS[case.meta["wording"]].question.format(label=labels[j])
    history = [(user_message(tokenizer, case), first_answer)]
    ids = chat_prompt(tokenizer, question, history=history)
    return Case(prompt_ids=tuple(ids), answer=values[j],
                meta={"task": "multikey", "wording": case.meta["wording"], "label": labels[j], "turn": 2})


def score(case: Case, text: str) -> float:
    if case.meta.get("task") == "document_question":
        return float(any(re.search(rf"\b{re.escape(k)}\b", text.lower()) for k in case.meta["keys"]))
    return float(tasks.score(case, text))


def answer_row(name: str, case: Case, text: str, m) -> dict:
    """One answer with its score and its RequestMetrics figures (entries summed over layers and KV heads)."""
    return {"prompt": name, "prompt_tokens": m.prompt_tokens, "expected": case.answer, "answer": text,
            "score": score(case, text), "new_tokens": m.new_tokens, "peak_live_tokens": m.peak_live_tokens,
            "final_live_tokens": m.final_live_tokens, "dense_tokens": m.dense_tokens,
            "kv_token_reads": m.kv_token_reads, "kv_token_reads_dense": m.kv_token_reads_dense,
            "peak_kv_bytes": m.peak_bytes, "compression_ratio": m.compression_ratio}


def dense_budget_pages(cfg, prompt_lengths, max_new_tokens: int, page_size: int) -> int:
    """Pages for every prompt to keep every token (and one spare page per head): no request is ever preempted."""
    per_head = sum(-(-(n + max_new_tokens) // page_size) + 1 for n in prompt_lengths)
    return cfg.num_layers * cfg.num_kv_heads * per_head


def run_policy(model, tokenizer, policy: str, prompts: list[DemoPrompt], *, max_new_tokens: int = 24,
               page_size: int = 16, prefill_chunk: int = 256) -> tuple[list[dict], float]:
    """Answers of one engine policy ("vanilla" or "dms") to every prompt, greedy, then the second turns:
    (rows in prompt order, each follow-up right after its first turn; seconds, compilation included)."""
    lengths = [p.case.num_tokens for p in prompts]
    # Second turns are at most the first turn + its answer + a question long.
    later = [p.case.num_tokens + 2 * max_new_tokens + 64 for p in prompts if p.follow_up]
    budget = max(dense_budget_pages(model.cfg, lengths, max_new_tokens, page_size),
                 dense_budget_pages(model.cfg, later, max_new_tokens, page_size))
    engine = Engine(model, policy, budget_pages=budget, page_size=page_size, prefill_chunk=prefill_chunk,
                    on_exhaustion="error")
    decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True).strip()  # noqa: E731
    t0 = time.perf_counter()
    first = engine.generate([list(p.case.prompt_ids) for p in prompts], max_new_tokens=max_new_tokens)
    texts = [decode(r.tokens) for r in first.requests]
    rows = [answer_row(p.name, p.case, t, r.metrics) for p, t, r in zip(prompts, texts, first.requests)]
    follow = [(i, follow_up_case(tokenizer, p.case, texts[i])) for i, p in enumerate(prompts) if p.follow_up]
    if follow:
        second = engine.generate([list(c.prompt_ids) for _, c in follow], max_new_tokens=max_new_tokens)
        for (i, case), r in reversed(list(zip(follow, second.requests))):
            name = prompts[i].name.replace("turn 1", "turn 2")
            rows.insert(i + 1, answer_row(name, case, decode(r.tokens), r.metrics))
    return rows, time.perf_counter() - t0


def summary(original: list[dict], dms: list[dict]) -> dict:
    """Accuracy of both and the retrofit's whole-cache figures over all its answers (measured, not targets)."""
    total = lambda rows, key: int(sum(r[key] for r in rows))  # noqa: E731
    return {"accuracy_original": float(np.mean([r["score"] for r in original])),
            "accuracy_dms": float(np.mean([r["score"] for r in dms])),
            "compression": total(dms, "dense_tokens") / max(total(dms, "final_live_tokens"), 1),
            "read_ratio": total(original, "kv_token_reads") / max(total(dms, "kv_token_reads"), 1),
            "peak_kv_bytes_original": total(original, "peak_kv_bytes"),
            "peak_kv_bytes_dms": total(dms, "peak_kv_bytes"), "answers": len(dms)}


def compare(model, tokenizer, prompts: list[DemoPrompt], original_model=None, **kw) -> dict:
    """Both policies on the same prompts: {"rows": [{prompt, original, dms}], "seconds_original", "seconds_dms",
    + summary()}. original_model: the original model, when the retrofit changed base weights (a low-rank one);
    None: ``model`` itself without eviction. kw: run_policy's max_new_tokens, page_size, prefill_chunk."""
    original, seconds_original = run_policy(model if original_model is None else original_model, tokenizer,
                                            "vanilla", prompts, **kw)
    dms, seconds_dms = run_policy(model, tokenizer, "dms", prompts, **kw)
    rows = [{"prompt": o["prompt"], "original": o, "dms": d} for o, d in zip(original, dms)]
    return {"rows": rows, "seconds_original": seconds_original, "seconds_dms": seconds_dms,
            **summary(original, dms)}


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(report: dict, answer_width: int = 26) -> str:
    """The answers side by side (+ / - for right / wrong) with KV memory held, compression and reads."""
    head = (f"{'prompt':<28} {'tokens':>6}  {'expected':<12} {'original':<{answer_width + 2}} "
            f"{'DMS':<{answer_width + 2}} {'KV MB orig/DMS':>14} {'CR':>6} {'reads orig/DMS':>15}")
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        o, d = row["original"], row["dms"]
        mark = lambda r: ("+ " if r["score"] >= 1 else "- ") + _short(r["answer"], answer_width)  # noqa: E731
        mb = f"{o['peak_kv_bytes'] / 1e6:.1f}/{d['peak_kv_bytes'] / 1e6:.1f}"
        reads = f"{o['kv_token_reads'] / 1e3:.0f}K/{d['kv_token_reads'] / 1e3:.0f}K"
        lines.append(f"{_short(row['prompt'], 28):<28} {o['prompt_tokens']:>6}  {_short(o['expected'], 12):<12} "
                     f"{mark(o):<{answer_width + 2}} {mark(d):<{answer_width + 2}} {mb:>14} "
                     f"{d['compression_ratio']:>5.2f}x {reads:>15}")
    lines.append(f"accuracy: original {report['accuracy_original']:.2f}, DMS {report['accuracy_dms']:.2f}; "
                 f"whole-cache compression {report['compression']:.2f}x (dense / live entries, all answers), "
                 f"decode reads {report['read_ratio']:.2f}x fewer")
    return "\n".join(lines)


def plot(report: dict, png) -> None:
    """KV memory held per answer (bars, original vs DMS) with the measured compression over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for offset, key, label in ((-0.2, "original", "original"), (0.2, "dms", "DMS retrofit")):
        ax.bar(x + offset, [r[key]["peak_kv_bytes"] / 1e6 for r in rows], 0.4, label=label)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['dms']['compression_ratio']:.1f}x", (i, r["original"]["peak_kv_bytes"] / 1e6),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["prompt"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.3 * max(r["original"]["peak_kv_bytes"] for r in rows) / 1e6)  # room for the labels
    ax.set_ylabel("KV cache held (MB)")
    ax.set_title(f"accuracy {report['accuracy_original']:.2f} -> {report['accuracy_dms']:.2f}, "
                 f"whole-cache compression {report['compression']:.2f}x", fontsize=9)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)

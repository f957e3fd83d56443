"""RULER variable tracking: chains of assignments hidden in filler (pure Python / numpy).

Chains ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... hidden in the same filler as passkey; "find all
variables that are assigned the value 12345".  Score: the fraction of the queried chain's variables named in
the answer (``mode="all"``: 1 only when all are).  Wording families: ``VT_WORDINGS`` (statement forms, intro,
delimiters, question, answer prefix, filler); ``resolve_assignments`` follows a family's statements.
"""

from __future__ import annotations

import re
import string
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from dms_jax.eval.prompts import (Case, Filler, _build_to_length, _case_filler, _case_rng, _check_common,
                                  _check_counts, _check_target, _haystack, _pick_wording, _shot_filler)

__all__ = [
    "VTWording",
    "VT_WORDINGS",
    "extract_variables",
    "make_variable_tracking_cases",
    "resolve_assignments",
    "score_variable_tracking",
]


# ----------------------------------------------------------------------------------------------------------
# Variable tracking (RULER)
# ----------------------------------------------------------------------------------------------------------

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assigned the value {value}, they are:"
)


class VTWording(NamedTuple):
    """One wording family of variable tracking: ``intro + before + haystack + after + question`` as the user
    message, ``answer_prefix`` (``{count}``, ``{value}``) to start the answer, and the two statement forms:
    ``assign_value`` (``{name}``, ``{value}``) starts a chain, ``assign_copy`` (``{name}``, ``{prev}``) extends
    it. ``filler`` as in ``HaystackWording``."""

    intro: str
    before: str
    after: str
    assign_value: str
    assign_copy: str
    question: str
    answer_prefix: str
    filler: str = "classic"


VT_WORDINGS: dict[str, VTWording] = {
    # RULER's prompt, unchanged.
    "ruler": VTWording(
        VT_INTRO, "\n\n", "\n\n", "VAR {name} = {value}.", "VAR {name} = VAR {prev}.", VT_QUESTION,
        VT_ANSWER_PREFIX,
    ),
    "rules": VTWording(
        "Between the two rules, numbers are stored in variables and copied from one variable to another. "
        "Keep track of them.",
        "\n---\n", "\n---\n",
        "Store {value} in {name}.", "Copy {prev} into {name}.",
        "Which variables end up containing {value}? List every one of them.",
        "The {count} variables containing {value} are:",
    ),
    "document": VTWording(
        "Read the document and follow the variables it defines.",
        "\n\nDocument:\n", "\nEnd of document.\n\n",
        "{name} is {value}.", "{name} is the same as {prev}.",
        "List all variables in the document whose value is {value}.",
        "Variables whose value is {value} ({count} of them):",
    ),
    "natural": VTWording(
        "The excerpt below comes from technical documentation, with a few variable definitions mixed in. "
        "Follow the variables.",
        "\n\n", "\n\n",
        "Variable {name} gets {value}.", "Variable {name} gets the value of {prev}.",
        "Name every variable that ends up with the value {value}.",
        "The {count} variables that end up with {value} are",
        "natural",
    ),
    "lines": VTWording(
        "Each line below is a short sentence; some lines give variables their values. Track them.",
        "\n", "\n",
        "Give {name} the value {value}.", "Give {name} the value of {prev}.",
        "Which variables were given the value {value}, directly or through another variable?",
        "Those {count} variables are:",
        "lines",
    ),
}


def _random_names(rng: np.random.Generator, count: int, exclude: Iterable[str] = ()) -> list[str]:
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    seen: set[str] = set(exclude)
    while len(names) < count:
        name = "".join(rng.choice(letters, 5))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


class _VTProblem(NamedTuple):
    chains: list[list[str]]
    values: list[str]
    statements: list[str]  # all chains interleaved, each chain in order
    unit: np.ndarray  # each statement's position as a fraction of the filler


def _vt_problem(
    rng: np.random.Generator, num_chains: int, num_hops: int, exclude_names=(), exclude_values=(),
    wording: VTWording = VT_WORDINGS["ruler"],
) -> _VTProblem:
    names = _random_names(rng, num_chains * (num_hops + 1), exclude_names)
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    values: list[str] = []
    while len(values) < num_chains:
        v = str(int(rng.integers(10000, 100000)))
        if v not in values and v not in exclude_values:
            values.append(v)
    per_chain = []
    for chain, value in zip(chains, values):
        stm = [wording.assign_value.format(name=chain[0], value=value)]
        stm += [wording.assign_copy.format(name=chain[k], prev=chain[k - 1]) for k in range(1, len(chain))]
        per_chain.append(stm)
    order = np.repeat(np.arange(num_chains), num_hops + 1)
    rng.shuffle(order)
    counters = [0] * num_chains
    statements = []
    for c in order:
        statements.append(per_chain[c][counters[c]])
        counters[c] += 1
    return _VTProblem(chains, values, statements, rng.uniform(size=len(statements)))


def _vt_place(problem: _VTProblem, n_filler: int) -> list[tuple[int, str]]:
    pos = np.sort(np.floor(problem.unit * (n_filler + 1)).astype(int).clip(0, n_filler))
    return [(int(p), s) for p, s in zip(pos, problem.statements)]


def _vt_user(hay: str, value: str, wording: VTWording) -> str:
    return f"{wording.intro}{wording.before}{hay}{wording.after}{wording.question.format(value=value)}"


def make_variable_tracking_cases(
    tokenizer,
    n: int,
    seed: int = 0,
    *,
    target_tokens: int = 1024,
    num_chains: int = 1,
    num_hops: int = 1,
    num_shots: int = 1,
    shot_filler: int = 20,
    answer_prefix: bool = True,
    system: str | None = None,
    wording: str = "ruler",
) -> list[Case]:
    """RULER variable tracking: ``num_chains`` chains of ``num_hops + 1`` variables each (one value per chain,
    all five-digit and distinct) spread in order through filler; the question asks for the variables of
    chain 0.  As in RULER, ``num_shots`` solved examples (same shape, ``shot_filler`` filler sentences, other
    names and values) come first, as earlier chat turns.  The whole prompt is about ``target_tokens`` long.

    ``answer`` is the space-joined variable names of chain 0 in chain order; ``meta["variables"]`` the same as
    a tuple, ``meta["chains"]`` all chains, ``meta["value"]`` the queried value, ``meta["question"]`` the last
    user message.  With ``answer_prefix`` the assistant turn starts with the family's answer prefix.
    ``wording``: a family of ``VT_WORDINGS`` (statement forms, intro, delimiters, question, answer prefix,
    filler); names and values of case ``i`` are the same in every family.

    RULER's default is ``num_hops=4``; that is at the floor for SmolLM2-135M-Instruct, so the default here is
    one hop.  Measured (Q4_1 GGUF, transformers fp32, greedy, 10 cases, ~1K tokens, mean fraction score):
    ``num_hops=1`` 0.6, ``num_hops=4`` 0.08; with no in-context example (``num_shots=0``) 0.0 at any depth.
    """
    _check_common(tokenizer, n, seed)
    w = _pick_wording("variable_tracking", wording, VT_WORDINGS)
    _check_target(target_tokens)
    _check_counts(num_chains=(num_chains, 1), num_hops=(num_hops, 0), num_shots=(num_shots, 0),
                  shot_filler=(shot_filler, 0))

    def prefix_for(value: str) -> str:
        return w.answer_prefix.format(count=num_hops + 1, value=value) if answer_prefix else ""

    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0x7A7A)
        prob = _vt_problem(rng, num_chains, num_hops, wording=w)
        filler = _case_filler(w.filler, seed, i)
        history = _vt_shots(rng, prob, num_shots, shot_filler, w, _shot_filler(w.filler, filler), prefix_for)
        value = prob.values[0]

        def render(hay: str, value=value) -> tuple[str, str]:
            return _vt_user(hay, value, w), prefix_for(value)

        b = _build_to_length(
            tokenizer, int(target_tokens), render, lambda nf, prob=prob: _vt_place(prob, nf), system, history,
            filler,
        )
        meta = {
            "task": "variable_tracking", "wording": wording, "value": value,
            "variables": tuple(prob.chains[0]), "chains": tuple(tuple(c) for c in prob.chains),
            "values": tuple(prob.values), "num_hops": int(num_hops), "num_shots": int(num_shots),
            "target_tokens": int(target_tokens), "num_tokens": len(b.ids), "n_filler": b.n_filler,
            "question": render(b.text[b.hay_start : b.hay_end])[0], "prompt": b.text,
        }
        cases.append(Case(prompt_ids=tuple(int(t) for t in b.ids), answer=" ".join(prob.chains[0]), meta=meta))
    return cases


def _vt_shots(rng, prob: _VTProblem, num_shots: int, shot_filler: int, w: VTWording, filler: Filler,
              prefix_for: Callable[[str], str]) -> list[tuple[str, str]]:
    """``num_shots`` solved examples (user message, answer) with names and values other than ``prob``'s."""
    used_names = [v for c in prob.chains for v in c]
    used_values = list(prob.values)
    history = []
    for _ in range(num_shots):
        shot = _vt_problem(rng, len(prob.chains), len(prob.chains[0]) - 1, used_names, used_values, w)
        used_names += [v for c in shot.chains for v in c]
        used_values += shot.values
        hay, _ = _haystack(shot_filler, _vt_place(shot, shot_filler), filler)
        answer = " ".join(shot.chains[0])
        pre = prefix_for(shot.values[0])
        history.append((_vt_user(hay, shot.values[0], w), f"{pre} {answer}" if pre else answer))
    return history


def _statement_pattern(wording: VTWording) -> re.Pattern:
    """A regex for both statement forms of ``wording`` (the final period optional, as in free text)."""

    def form(fmt: str, fields: Mapping[str, str]) -> str:
        out = re.escape(fmt.rstrip("."))
        for field_name, group in fields.items():
            out = out.replace(re.escape("{" + field_name + "}"), group)
        return out

    value = form(wording.assign_value, {"name": r"(?P<name>[A-Z]{5})", "value": r"(?P<value>\d+)"})
    copy = form(wording.assign_copy, {"name": r"(?P<copy>[A-Z]{5})", "prev": r"(?P<prev>[A-Z]{5})"})
    return re.compile(f"{value}|{copy}")


def resolve_assignments(text: str, wording: str = "ruler") -> dict[str, str]:
    """Follow the assignment statements of ``text`` (in family ``wording``'s forms, ``VAR X = ...`` for
    "ruler") in order: variable -> value (for checking cases)."""
    pattern = _statement_pattern(_pick_wording("variable_tracking", wording, VT_WORDINGS))
    env: dict[str, str] = {}
    for m in pattern.finditer(text):
        if m.group("name"):
            env[m.group("name")] = m.group("value")
        else:
            env[m.group("copy")] = env.get(m.group("prev"), "")
    return env


def score_variable_tracking(text: str, answer: str | Sequence[str], mode: str = "fraction") -> float:
    """Fraction of the answer's variables named (as whole words) in ``text``; ``mode="all"``: 1 only if all."""
    if mode not in ("fraction", "all"):
        raise ValueError(f"mode: must be 'fraction' or 'all', got {mode!r}")
    names = answer.split() if isinstance(answer, str) else list(answer)
    if not names:
        raise ValueError("answer: no variables to look for")
    found = [re.search(rf"(?<![A-Za-z]){re.escape(v)}(?![A-Za-z])", text or "") is not None for v in names]
    frac = sum(found) / len(found)
    return frac if mode == "fraction" else float(all(found))


def extract_variables(text: str) -> tuple[str, ...] | None:
    """The distinct five-capital names of ``text``, sorted, or None (what a majority vote votes on)."""
    names = tuple(sorted(set(re.findall(r"(?<![A-Za-z])[A-Z]{5}(?![A-Za-z])", text or ""))))
    return names or None

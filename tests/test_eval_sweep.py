"""dms_jax.eval.sweep: the cases of a point over wording families, and the wording specification's errors."""

import pytest

from dms_jax import weights
from dms_jax.eval import sweep, tasks


def test_wording_families_draw_their_own_cases_and_the_default_keeps_the_old_ones():
    tok = weights.load_tokenizer(None)
    s = dict(sweep.SWEEPS["smoke"], cases=6, depths=[0.5], wordings={"passkey": ["ruler", "natural", "lines"]})
    cases = sweep.Runner(s, None, tok, lambda n: None).cases("passkey", 256)
    assert [c.meta["wording"] for c in cases] == ["ruler"] * 2 + ["natural"] * 2 + ["lines"] * 2
    old = tasks.make_cases("passkey", tok, 2, sweep.TASK_SEEDS["passkey"], target_tokens=256, depth=[0.5])
    assert [c.prompt_ids for c in cases[:2]] == [c.prompt_ids for c in old]
    assert len({c.answer for c in cases}) == 6  # other needles per family


def test_wording_specifications():
    assert sweep.resolve_wordings("default", ["passkey", "heldout"], 3) == {"passkey": ["ruler"]}
    assert sweep.resolve_wordings("all", ["multikey"], 5) == {"multikey": list(tasks.WORDINGS["multikey"])}
    # A name applies to every task that has it; a task without any of the names keeps its default.
    got = sweep.resolve_wordings("lines,compute", ["passkey", "arithmetic"], 2)
    assert got == {"passkey": ["lines"], "arithmetic": ["compute"]}
    with pytest.raises(ValueError, match="no wording family"):
        sweep.resolve_wordings("haiku", ["passkey"], 2)
    with pytest.raises(ValueError, match="does not split evenly"):
        sweep.resolve_wordings("all", ["passkey"], 7)

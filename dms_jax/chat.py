"""Chat prompts: the one place that turns messages into the token ids a chat model expects.

``chat_prompt`` is used by the CLIs, the notebooks, the demo and every evaluation task, so a prompt made for
generation and a prompt made for a test case are formatted the same way.  A tokenizer without a chat template
gets a plain "Role: text" transcript instead.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def chat_messages(user: str, system: str | None = None,
                  history: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The message list: optional system message, earlier (user, assistant) turns, then the user message."""
    msgs: list[dict[str, str]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    for u, a in history:
        msgs.append({"role": "user", "content": u})
        msgs.append({"role": "assistant", "content": a})
    msgs.append({"role": "user", "content": user})
    return msgs


def chat_text(tokenizer, messages: Sequence[Mapping[str, str]], assistant_prefix: str = "") -> str:
    """The prompt text, ending with the generation prompt and ``assistant_prefix`` (the start of the answer)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    else:  # a tokenizer without a template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        if assistant_prefix:
            assistant_prefix = " " + assistant_prefix
    return text + assistant_prefix


def encode(tokenizer, text: str, offsets: bool = False):
    """Token ids of ``text`` with no special tokens added (the template already has them); with
    ``offsets=True`` also each token's (start, end) characters."""
    if offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(tokenizer, user: str, *, system: str | None = None, history: Sequence[tuple[str, str]] = (),
                assistant_prefix: str = "") -> list[int]:
    """Token ids of a chat prompt: optional system message, earlier (user, assistant) turns, the user message,
    the generation prompt, then ``assistant_prefix`` (may be empty)."""
    return encode(tokenizer, chat_text(tokenizer, chat_messages(user, system, history), assistant_prefix))

"""dms_jax.chat against the tokenizer's own chat template (transformers) and a plain transcript."""

import copy

from dms_jax.chat import chat_prompt


def test_chat_prompt_matches_template(tokenizer):
    ids = chat_prompt(tokenizer, "Hello there", system="Be brief.", history=[("Hi", "Hello!")],
                      assistant_prefix="Sure,")
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hello there"}],
        add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tokenizer(text + "Sure,", add_special_tokens=False)["input_ids"]
    # The template's own tokenization gives the same ids.
    direct = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                           add_generation_prompt=True, tokenize=True)
    direct = direct["input_ids"] if hasattr(direct, "keys") else direct
    assert chat_prompt(tokenizer, "Hello there") == list(direct)


def test_chat_prompt_without_template_is_a_transcript(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ids = chat_prompt(plain, "2+2?", system="Be brief.", assistant_prefix="It is")
    assert plain.decode(ids) == "System: Be brief.\nUser: 2+2?\nAssistant: It is"

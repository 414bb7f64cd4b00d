"""The generation loop, samplers, tokenizer wrapper and chat templates, against a real (tiny) model.

The backend is the PyTorch reference model behind the Backend protocol (tests/reference_backend.py);
expected tokens come from full forwards without any cache, computed independently of the loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgecpm.chat_template import ChatTemplate, ChatTemplateError
from edgecpm.errors import GenerationError
from edgecpm.generate import (
    GenerationSettings,
    KVSession,
    StopStringFilter,
    final_result,
    generate,
    generate_steps,
    stream,
)
from edgecpm.sampling import build_sampler, top_p
from reference_backend import ReferenceBackend, greedy_chain, single_torch_thread, text_tokenizer
from tiny_models import CHATML_TEMPLATE, write_hf_checkpoint

EOS = 3  # <|im_end|> in the tiny tokenizer
PROMPT = "Hello robot"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgecpm.checkpoint import open_checkpoint

    # Untied head: the tied tiny model just repeats its last token under greedy decoding.
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", ("minicpm", "untied")))
    with single_torch_thread():
        yield checkpoint


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return text_tokenizer(tiny.tokenizer)


@pytest.fixture
def backend(tiny):
    return ReferenceBackend(tiny)


def run(backend, tokenizer, prompt=PROMPT, **options):
    return final_result(stream(backend, tokenizer, prompt, GenerationSettings().with_options(**options)))


# ----------------------------------------------------------------------------------- greedy / sampling


def test_greedy_equals_independent_argmax_chain(backend, tokenizer):
    result = run(backend, tokenizer, max_new_tokens=12)
    assert result.finish_reason == "length"
    assert result.prompt_token_ids == tokenizer.encode(PROMPT)
    assert result.token_ids == greedy_chain(backend.model, result.prompt_token_ids, 12)
    assert result.text == tokenizer.decode(result.token_ids)
    # One prefill of the whole prompt, then one decode per token except the last.
    assert backend.calls == [("prefill", len(result.prompt_token_ids))] + [("decode", 1)] * 11
    assert result.prefill_tokens == len(result.prompt_token_ids) and result.decode_steps == 11


def test_events_carry_tokens_text_and_timings(backend, tokenizer):
    events = list(stream(backend, tokenizer, PROMPT, GenerationSettings(max_new_tokens=5)))
    *steps, last = events
    assert [e.token_id for e in steps] == last.result.token_ids
    assert all(e.seconds > 0 and e.finish_reason is None for e in steps)
    assert last.token_id is None and last.finish_reason == "length"
    assert "".join(e.text for e in events) == last.result.text
    summary = last.result.to_dict()
    assert summary["new_tokens"] == 5 and summary["prefill_tokens_per_second"] > 0 and summary["decode_tokens_per_second"] > 0


def test_seeded_sampling_is_reproducible(backend, tokenizer):
    options = dict(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    first = run(backend, tokenizer, **options).token_ids
    assert run(backend, tokenizer, **options).token_ids == first
    others = {tuple(run(backend, tokenizer, **{**options, "seed": seed}).token_ids) for seed in (1, 2, 3)}
    assert others - {tuple(first)}, "different seeds should give a different sample"


def test_top_k_one_equals_greedy(backend, tokenizer):
    greedy = run(backend, tokenizer, max_new_tokens=10).token_ids
    assert run(backend, tokenizer, max_new_tokens=10, temperature=1.3, top_k=1, seed=3).token_ids == greedy


def test_repetition_penalty_matches_transformers(backend, tokenizer):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    import torch

    prompt = tokenizer.encode(PROMPT)
    logits = backend.prefill(np.asarray(prompt))
    (penalty,) = build_sampler(temperature_value=0, top_k_value=0, top_p_value=1, repetition=1.7, seed=None).transforms
    ours = penalty(logits, prompt)
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt]), torch.tensor(logits)[None])[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    kept = np.isfinite(top_p(0.8)(logits, []))
    assert kept.tolist() == [True, True, False, False]
    assert np.isfinite(top_p(0.1)(logits, [])).tolist() == [True, False, False, False]


# ----------------------------------------------------------------------------------------- stopping


def test_stop_token_ends_generation_and_is_not_emitted(backend, tokenizer):
    chain = greedy_chain(backend.model, tokenizer.encode(PROMPT), 8)
    stop_id = chain[5]
    expected = chain[:chain.index(stop_id)]
    result = run(backend, tokenizer, max_new_tokens=20, stop_token_ids=[stop_id])
    assert result.finish_reason == "stop"
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected)


def test_stop_string_across_token_boundaries_is_never_emitted(backend, tokenizer):
    full = run(backend, tokenizer, max_new_tokens=20)
    text = full.text
    # Every byte is one token in the tiny tokenizer, so a 2-character stop string spans two tokens.
    start = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[:i].find(text[i:i + 2]) < 0)
    stop = text[start:start + 2]
    events = list(stream(backend, tokenizer, PROMPT, GenerationSettings(max_new_tokens=20, stop_strings=(stop,))))
    emitted = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop_string"
    assert emitted == events[-1].result.text == text[:start]
    assert stop[0] not in emitted[len(text[:start]):]
    # The prefix of the stop string was held back while it could still become the stop string.
    running = ""
    for event in events:
        running += event.text
        assert stop not in running


def test_stop_string_filter_releases_a_partial_match_at_the_end():
    stops = StopStringFilter(["</answer>", "STOP"])
    assert stops.feed("The cup is red</") == ("The cup is red", False)
    assert stops.feed("ans") == ("", False)
    assert stops.feed("wer> more") == ("", True)
    stops = StopStringFilter(["STOP"])
    assert stops.feed("ST") == ("", False)
    assert stops.feed("ART ST") == ("START ", False)
    assert stops.release() == "ST"


def test_max_new_tokens_and_context_limit(tiny, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    backend = ReferenceBackend(tiny, max_context=len(prompt) + 5)
    result = final_result(generate_steps(backend, prompt, GenerationSettings(max_new_tokens=50), tokenizer=tokenizer))
    # The last prompt slot gives one token, each of the 5 free slots one more.
    assert result.finish_reason == "context"
    assert result.token_ids == greedy_chain(backend.model, prompt, 6)
    assert backend.position == backend.max_context


def test_prompt_longer_than_context_is_an_error_or_truncated_left(tiny, tokenizer):
    backend = ReferenceBackend(tiny, max_context=16)
    prompt = tokenizer.encode("a fairly long prompt that does not fit")
    with pytest.raises(GenerationError, match="the prompt has 39 tokens but the context holds 16"):
        generate_steps(backend, prompt, GenerationSettings(), tokenizer=tokenizer)
    settings = GenerationSettings(max_new_tokens=4, truncate="left")
    result = final_result(generate_steps(backend, prompt, settings, tokenizer=tokenizer))
    assert result.prompt_token_ids == prompt[-12:]  # 16 minus room for the 4 new tokens
    assert result.token_ids == greedy_chain(backend.model, prompt[-12:], 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.1}, "temperature must be 0"),
        ({"temperature": float("nan")}, "temperature must be 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be positive"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"stop_strings": [""]}, "stop strings must be non-empty"),
        ({"truncate": "right"}, "truncate must be None or 'left'"),
        ({"temprature": 1.0}, "unknown generation option 'temprature'"),
    ],
)
def test_invalid_settings_are_one_line_errors(backend, tokenizer, options, message):
    with pytest.raises(GenerationError, match=message) as info:
        stream(backend, tokenizer, PROMPT, GenerationSettings().with_options(**options))
    assert "\n" not in str(info.value)
    assert backend.calls == []  # nothing ran


def test_empty_prompt_is_an_error(backend, tokenizer):
    with pytest.raises(GenerationError, match="the prompt is empty"):
        stream(backend, tokenizer, "", GenerationSettings())
    with pytest.raises(GenerationError, match="the prompt is empty"):
        generate_steps(backend, [], GenerationSettings(), tokenizer=tokenizer)


# ------------------------------------------------------------------------------- KV reuse, interrupts


def test_session_reuses_the_common_prefix(tiny, tokenizer):
    backend = ReferenceBackend(tiny)
    session = KVSession(backend)
    first = final_result(stream(session, tokenizer, PROMPT, GenerationSettings(max_new_tokens=4)))
    follow_up = first.prompt_token_ids + first.token_ids[:3] + tokenizer.encode(" and more", add_bos=False)
    backend.calls.clear()
    second = final_result(generate_steps(session, follow_up, GenerationSettings(max_new_tokens=6), tokenizer=tokenizer))
    # Prompt + 3 generated tokens were in the cache (the 4th was sampled but never fed): only the rest runs.
    assert backend.calls[0] == ("prefill", len(" and more"))
    assert second.prefill_tokens == len(" and more")
    assert second.token_ids == greedy_chain(backend.model, follow_up, 6)
    # A prompt that diverges earlier truncates the cache to the common prefix.
    backend.calls.clear()
    third = final_result(stream(session, tokenizer, PROMPT + "!", GenerationSettings(max_new_tokens=3)))
    assert backend.calls[:2] == [("truncate", len(first.prompt_token_ids)), ("prefill", 1)]
    assert third.token_ids == greedy_chain(backend.model, third.prompt_token_ids, 3)


class InterruptingBackend:
    """Passes calls to a real backend, raising KeyboardInterrupt in the middle of the n-th decode."""

    def __init__(self, backend, interrupt_at: int):
        self.inner, self.interrupt_at, self.decodes = backend, interrupt_at, 0
        self.max_context, self.vocab_size = backend.max_context, backend.vocab_size

    position = property(lambda self: self.inner.position)
    prefill = property(lambda self: self.inner.prefill)
    reset = property(lambda self: self.inner.reset)
    truncate = property(lambda self: self.inner.truncate)

    def decode(self, token_id):
        self.decodes += 1
        if self.decodes == self.interrupt_at:
            self.inner._tokens.append(int(token_id))  # the half-done step: state written, no logits returned
            raise KeyboardInterrupt
        return self.inner.decode(token_id)


def test_ctrl_c_mid_generation_leaves_a_usable_session(tiny, tokenizer):
    backend = InterruptingBackend(ReferenceBackend(tiny), interrupt_at=3)
    session = KVSession(backend)
    with pytest.raises(KeyboardInterrupt):
        for _ in stream(session, tokenizer, PROMPT, GenerationSettings(max_new_tokens=10)):
            pass
    # The next call does not trust the interrupted cache; it starts over and is correct.
    result = final_result(stream(session, tokenizer, PROMPT, GenerationSettings(max_new_tokens=5)))
    assert result.prefill_tokens == len(result.prompt_token_ids)
    assert result.token_ids == greedy_chain(backend.inner.model, result.prompt_token_ids, 5)


def test_a_new_stream_ends_an_unfinished_one(backend, tokenizer):
    session = KVSession(backend)
    older = stream(session, tokenizer, PROMPT, GenerationSettings(max_new_tokens=10))
    next(older)
    assert generate(session, tokenizer, "other", GenerationSettings(max_new_tokens=2))
    with pytest.raises(GenerationError, match="another generation started"):
        next(older)


# ------------------------------------------------------------------------------------- tokenization


def test_bos_is_added_exactly_once(tokenizer):
    assert tokenizer.add_bos_token and tokenizer.bos_token == "<s>"
    assert tokenizer.encode("hi") == [tokenizer.bos_token_id, *tokenizer.encode("hi", add_bos=False)]
    assert tokenizer.encode("<s>hi") == tokenizer.encode("hi")
    assert tokenizer.encode("<|im_start|>user")[:2] == [tokenizer.bos_token_id, 4]  # specials in text map to their ids


@pytest.mark.parametrize("text", ["héllo wörld", "机器人 picks up the 红色 cup", "🤖👍 done", "a\u0301 e\u20ac"])
def test_incremental_detokenization_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: multi-byte characters span tokens
    detokenizer = tokenizer.detokenizer()
    deltas = [detokenizer.add(token) for token in ids]
    deltas.append(detokenizer.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_incremental_detokenization_with_the_smollm2_tokenizer(smollm2_tokenizer_files):
    tokenizer = text_tokenizer(smollm2_tokenizer_files)
    text = " The capital of France is Paris. Größe: 42 € — 東京 🤖!"
    ids = tokenizer.encode(text, add_bos=False)
    detokenizer = tokenizer.detokenizer()
    deltas = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


def test_random_tokens_stream_to_the_same_text_as_one_decode(backend, tokenizer):
    result = run(backend, tokenizer, max_new_tokens=30, temperature=2.0, seed=11)
    assert result.text == tokenizer.decode(result.token_ids)


# ------------------------------------------------------------------------------------ chat templates


@pytest.fixture(scope="module")
def smollm2_tokenizer_files():
    from edgecpm.checkpoint import open_checkpoint
    from edgecpm.resources import default_model_path

    return open_checkpoint(default_model_path()).tokenizer


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Pick up the red cup"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"}, {"role": "user", "content": "  spaces  "}],
]


def hf_tokenizer(files):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(files.tokenizer_json), chat_template=files.chat_template,
                                   bos_token=files.bos_token, eos_token=files.eos_token)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(request, which, conversation, add_generation_prompt):
    files = request.getfixturevalue("smollm2_tokenizer_files" if which == "smollm2" else "tiny_tokenizer_files")
    reference = hf_tokenizer(files)
    expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = ChatTemplate(files.chat_template, bos_token=files.bos_token, eos_token=files.eos_token)
    rendered = ours.render(conversation, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    # Token ids: transformers' chat tokenization adds no special tokens; we add BOS when the tokenizer asks.
    tokenizer = text_tokenizer(files)
    bos = [tokenizer.bos_token_id] if files.add_bos_token else []
    assert tokenizer.encode(rendered) == bos + reference(expected, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tiny_tokenizer_files(tiny):
    return tiny.tokenizer


def test_tiny_template_is_the_chatml_one(tiny_tokenizer_files):
    assert tiny_tokenizer_files.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set ns = namespace(_x=1) %}{{ ns }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_hostile_templates_are_refused(source):
    with pytest.raises(ChatTemplateError, match="sandbox forbids|unsafe|underscore") as info:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value)


def test_template_errors_and_limits():
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        ChatTemplate("{{ raise_exception('only user and assistant') }}").render([{"role": "system", "content": ""}])
    with pytest.raises(ChatTemplateError, match="line 1"):
        ChatTemplate("{% for m in messages %}").render([])
    with pytest.raises(ChatTemplateError, match="rendered prompt is longer"):
        ChatTemplate("{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}").render([])
    with pytest.raises(ChatTemplateError, match="template is longer"):
        ChatTemplate("x" * (1024 * 1024 + 1))
    # transformers' extras: tojson without HTML escaping, the generation tag, strftime_now, loop controls.
    template = ChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                            "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}{{ strftime_now('%Y')[:2] }}")
    rendered = template.render([{"role": "user", "content": "<b>é</b>"}, {"role": "x"}])
    assert rendered == '{"role": "user", "content": "<b>é</b>"}20'

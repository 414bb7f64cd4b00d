"""The embedded SmolLM2-135M-Instruct Q4_1 GGUF against transformers' own GGUF loading.

transformers dequantizes and un-permutes q/k itself, so equal tensors check our GGUF importer
independently; equal logits and the same greedy answer check the PyTorch reference on real weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecpm.checkpoint import open_checkpoint
from edgecpm.resources import default_model_path

# transformers' GGUF loading alone takes 15-35 s (it parses the vocabulary with gguf-py's stock reader, twice).
pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
NEW_TOKENS = 16
# Both sides run fp32 on the same dequantized weights; only op order differs.
LOGITS_ATOL = 1e-3
TENSOR_ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Decoding a 135M model one token at a time is dominated by per-op overhead; OpenMP threads only spin
    (6x slower on a loaded 2-core box). Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint():
    return open_checkpoint(default_model_path())


@pytest.fixture(scope="module")
def transformers_model():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from edgecpm.models import reference_model

    return reference_model(checkpoint)


@pytest.fixture(scope="module")
def prompt_ids(checkpoint) -> list[int]:
    """The question rendered with the GGUF's own chat template and tokenized from our TokenizerFiles."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    files = checkpoint.tokenizer
    assert files.chat_template and not files.add_bos_token
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(files.chat_template)
    text = template.render(messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")
    ids = Tokenizer.from_str(files.tokenizer_json).encode(text, add_special_tokens=False).ids
    im_start = Tokenizer.from_str(files.tokenizer_json).token_to_id("<|im_start|>")
    assert ids.count(im_start) == 3  # system (default), user, assistant: the specials stay whole
    return ids


def test_every_tensor_equals_transformers_gguf_loading(checkpoint, transformers_model):
    theirs = transformers_model.state_dict()
    assert checkpoint.config.tie_word_embeddings
    # transformers materializes the tied head as its own entry; we keep it implicit.
    assert set(theirs) - set(checkpoint.tensors) == {"lm_head.weight"}
    assert set(checkpoint.tensors) <= set(theirs)
    for name, ref in checkpoint.tensors.items():
        ours = ref.numpy()
        expected = theirs[name].numpy()
        assert ours.shape == expected.shape, name
        assert np.abs(ours - expected).max() <= TENSOR_ATOL, name
    assert "Q4_1" in checkpoint.stored_dtypes()


def test_reference_logits_match_transformers(reference, transformers_model, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        ours = reference(ids, reference.new_cache())
        theirs = transformers_model(ids).logits
    assert ours.shape == theirs.shape == (1, len(prompt_ids), 49152)
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= LOGITS_ATOL


def greedy(reference, prompt_ids: list[int], steps: int) -> list[int]:
    cache = reference.new_cache()
    logits = reference(torch.tensor([prompt_ids]), cache)
    tokens = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        logits = reference(torch.tensor([[token]]), cache)
    return tokens


def test_greedy_answer_names_paris(checkpoint, reference, transformers_model, prompt_ids):
    from tokenizers import Tokenizer

    with torch.no_grad():
        tokens = greedy(reference, prompt_ids, NEW_TOKENS)
        expected = transformers_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                               max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt_ids):].tolist()
    answer = Tokenizer.from_str(checkpoint.tokenizer.tokenizer_json).decode(tokens, skip_special_tokens=True)
    assert "Paris" in answer
    # The KV-cached decode must pick the same tokens as transformers (up to its eos stop).
    assert tokens[: len(expected)] == expected

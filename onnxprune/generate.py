"""Greedy decoding through onnxruntime, for the paper's "University is …" samples.

Models are exported without a KV cache, so each step re-runs the whole sequence: fine for the
few dozen tokens a sample needs, and it works on every causal-LM export we prune.
"""

from __future__ import annotations

import os

import numpy as np

from onnxprune.data import model_feeds, tokenize
from onnxprune.errors import UserError, first_line
from onnxprune.evaluation import logits_output, open_session


def greedy_generate(model_path, tokenizer, prompt: str, max_new_tokens: int,
                    providers: list[str] | None = None) -> str:
    """`prompt` followed by up to `max_new_tokens` argmax tokens (stops at end-of-sequence);
    `model_path` may also be an open session (see `open_session`)."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0 (got {max_new_tokens})")
    session = open_session(model_path, providers)
    input_names = [i.name for i in session.get_inputs()]
    logits_name = logits_output(session)
    ids = tokenize(tokenizer, prompt)
    prompt_length = len(ids)
    for _ in range(max_new_tokens):
        try:
            (logits,) = session.run([logits_name], model_feeds(input_names, ids[None]))
        except Exception as exc:
            raise UserError(f"onnxruntime failed while generating: {first_line(exc)}") from None
        next_id = int(np.argmax(logits[0, -1]))
        ids = np.append(ids, next_id)
        if next_id == tokenizer.eos_token_id:
            break
    continuation = tokenizer.decode(ids[prompt_length:].tolist(), skip_special_tokens=True)
    return prompt + continuation

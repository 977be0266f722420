"""benchmarks/reference_speed.py's one adapter for the 2023 reference code on transformers 4.57:
decoder layers called the reference's way (`layer(x, attention_mask=, position_ids=)`, no rotary)
give a plain forward's outputs once `supply_rotary` is installed, and a plain forward is unchanged."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import reference_speed  # noqa: E402

# A locuslab/wanda checkout; the test that runs its own code skips without one (never fetched here).
REFERENCE = Path(os.environ.get("WANDA_REFERENCE", "/tmp/wanda"))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = reference_speed.hf_config("llama", vocab=96, layers=2, hidden=128, kv_heads=1, seqlen=16)
    config.initializer_range = 0.2  # large weights: a wrong rotary or mask shows in the outputs
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))


def layer_outputs(model, ids) -> list:
    """Every decoder layer's output in a plain forward."""
    outputs = []
    handles = [layer.register_forward_hook(lambda _, __, out: outputs.append(out[0])) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return outputs


def called_as_the_reference_does(model, x, attention_mask, position_ids) -> list:
    """lib/prune.py's loop: `outs[j] = layer(inps[j].unsqueeze(0), attention_mask=..., position_ids=...)[0]`."""
    outputs = []
    with torch.no_grad():
        for layer in model.model.layers:
            x = layer(x, attention_mask=attention_mask, position_ids=position_ids)[0]
            outputs.append(x)
            x = x.unsqueeze(0)
    return outputs


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def shimmed(llama, ids):
    """(the plain forward's layer outputs and logits before the shim, the model with it)."""
    plain = layer_outputs(llama, ids)
    with torch.no_grad():
        logits = llama(ids).logits
    reference_speed.supply_rotary(llama)
    return plain, logits, llama


def test_plain_forward_unchanged_by_the_shim(shimmed, ids):
    plain, logits, model = shimmed
    assert_same(layer_outputs(model, ids), plain)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)


def test_layer_by_layer_calls_match_a_plain_forward(shimmed, ids):
    plain, _, model = shimmed
    caught = {}

    def catch(_, args, kwargs):  # what the reference's Catcher keeps: the input, the mask, the position ids
        caught.update(x=args[0], attention_mask=kwargs["attention_mask"], position_ids=kwargs["position_ids"])

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert_same(called_as_the_reference_does(model, **caught), plain)


@pytest.mark.skipif(not (REFERENCE / "lib" / "prune.py").is_file(),
                    reason=f"no locuslab/wanda checkout at {REFERENCE} (set WANDA_REFERENCE)")
def test_the_references_own_capture_matches_a_plain_forward(shimmed, ids):
    plain, _, model = shimmed
    sys.path.insert(0, str(REFERENCE))
    from lib.prune import prepare_calibration_input

    model.seqlen, model.hf_device_map = ids.shape[1], {}
    inps, _, attention_mask, position_ids = prepare_calibration_input(model, [(ids, None)], torch.device("cpu"))
    assert_same(called_as_the_reference_does(model, inps[:1], attention_mask, position_ids), plain)

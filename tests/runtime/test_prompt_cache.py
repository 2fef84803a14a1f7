"""The prompt cache (runtime/prompt_cache.py) on the tiny model: hits return exactly what CLIP
returns, misses run it, and any change of the text encoder's weights invalidates."""
import numpy as np
import pytest
import torch

from runtime.canny2image import Canny2Image
from runtime.prompt_cache import PromptCache
from tests.conftest import TINY_CONFIG


@pytest.fixture
def model():
    from runtime.weights import build_model
    return build_model(TINY_CONFIG, random_weights=True, seed=0)


class Counting:
    """Counts model.get_learned_conditioning calls (the text encoder runs)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        real = model.get_learned_conditioning

        def counted(texts):
            self.calls += 1
            return real(texts)
        model.get_learned_conditioning = counted


def fresh(model, texts):
    with torch.no_grad():
        return type(model).get_learned_conditioning(model, texts)


def test_hits_are_exactly_the_encoder_output(model):
    cache, runs = PromptCache(), Counting(model)
    first = cache.encode(model, ["a cat, best quality"] * 2)
    again = cache.encode(model, ["a cat, best quality"] * 2)
    assert runs.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    expected = fresh(model, ["a cat, best quality"] * 2)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    again.add_(1.0)                                   # a caller's in-place write stays its own
    assert torch.equal(cache.encode(model, ["a cat, best quality"] * 2), expected)


def test_other_texts_or_batch_sizes_miss(model):
    cache, runs = PromptCache(), Counting(model)
    for texts in (["a cat"], ["a dog"], ["a cat"] * 3, ["a cat", "a dog"], ["a dog", "a cat"]):
        assert torch.equal(cache.encode(model, texts), fresh(model, texts)), texts
    assert runs.calls == 5 and cache.hits == 0 and len(cache) == 5


def test_lru_evicts_the_least_recently_used(model):
    cache, runs = PromptCache(max_entries=2), Counting(model)
    cache.encode(model, ["one"])
    cache.encode(model, ["two"])
    cache.encode(model, ["one"])            # hit: "two" is now the oldest
    cache.encode(model, ["three"])          # evicts "two"
    cache.encode(model, ["one"])            # still there
    assert runs.calls == 3
    cache.encode(model, ["two"])
    assert runs.calls == 4 and len(cache) == 2
    with pytest.raises(ValueError):
        PromptCache(max_entries=0)


def test_new_weights_invalidate(model):
    cache, runs = PromptCache(), Counting(model)
    texts = ["a house"]
    before = cache.encode(model, texts)
    # load_state_dict with other CLIP weights (the way a checkpoint arrives)
    state = model.state_dict()
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    state[key] = state[key] * 1.5
    model.load_state_dict(state)
    after = cache.encode(model, texts)
    assert runs.calls == 2 and not torch.equal(after, before)
    assert torch.equal(after, fresh(model, texts))
    # an in-place write to one parameter
    with torch.no_grad():
        model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight[0] += 1
    cache.encode(model, texts)
    assert runs.calls == 3
    # a write through .data (bumps no version counter)
    model.cond_stage_model.transformer.text_model.final_layer_norm.bias.data.add_(0.25)
    assert torch.equal(cache.encode(model, texts), fresh(model, texts)) and runs.calls == 4
    # a parameter replaced by a new one
    layer_norm = model.cond_stage_model.transformer.text_model.final_layer_norm
    layer_norm.weight = torch.nn.Parameter(layer_norm.weight.detach() * 0.5, requires_grad=False)
    assert torch.equal(cache.encode(model, texts), fresh(model, texts)) and runs.calls == 5
    # a dtype change, and back
    model.cond_stage_model.double()
    assert cache.encode(model, texts).dtype == torch.float64 and runs.calls == 6
    model.cond_stage_model.float()     # float32 -> float64 -> float32 is exact: a hit is right
    assert torch.equal(cache.encode(model, texts), fresh(model, texts)) and runs.calls == 6
    # through float16 and back: same dtype, device and versions, other values
    model.cond_stage_model.half().float()
    assert torch.equal(cache.encode(model, texts), fresh(model, texts)) and runs.calls == 7
    cache.encode(model, texts)
    assert runs.calls == 7
    # weights elsewhere in the model do not touch CLIP's results: still a hit
    with torch.no_grad():
        next(model.model.parameters()).mul_(2)
    cache.encode(model, texts)
    assert runs.calls == 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_value_written_through_data_in_host_memory_misses(model, dtype):
    """In host memory (low-VRAM mode keeps CLIP there, in fp16 in fast mode) the fingerprint sums
    each tensor's bytes as integers: one value changed through `.data` (no version bump) makes a
    miss; writing a value back unchanged does not."""
    model.cond_stage_model.to(dtype)
    cache, runs = PromptCache(), Counting(model)
    weight = model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
    cache.encode(model, ["a"])
    weight.data[3, 5] = weight.data[3, 5].clone()
    cache.encode(model, ["a"])
    assert runs.calls == 1
    weight.data[3, 5] += 1
    assert torch.equal(cache.encode(model, ["a"]), fresh(model, ["a"])) and runs.calls == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_value_sums_see_any_one_value_in_host_memory(dtype):
    """_value_sums in host memory, for byte sizes that are and are not a multiple of 8, and for
    a non-contiguous tensor: the same values give the same number, one changed value another."""
    from runtime.prompt_cache import _value_sums
    for t in (torch.randn(8, 6), torch.randn(3), torch.randn(7, 5).t()):
        t = t.to(dtype)
        before = _value_sums([t])
        assert _value_sums([t.clone()]) == before
        t[-1, ...] = t[-1, ...] * 2 + 1
        assert _value_sums([t]) != before


def test_a_replaced_text_encoder_or_patched_forward_misses(model):
    from runtime.weights import build_model
    cache, runs = PromptCache(), Counting(model)
    cache.encode(model, ["a tree"])
    attention = model.cond_stage_model.transformer.text_model.encoder.layers[0].self_attn
    attention.forward = type(attention).forward.__get__(attention)     # an instance-level forward
    cache.encode(model, ["a tree"])
    assert runs.calls == 2
    other = build_model(TINY_CONFIG, random_weights=True, seed=9).cond_stage_model
    model.cond_stage_model = other
    assert torch.equal(cache.encode(model, ["a tree"]), fresh(model, ["a tree"]))
    assert runs.calls == 3


def test_process_with_the_cache_equals_process_without(model):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    p = dict(prompt="a box", a_prompt="best quality", n_prompt="lowres", num_samples=1,
             image_resolution=64, ddim_steps=1, guess_mode=False, strength=1.0, scale=9.0,
             seed=5, eta=0.0, low_threshold=100, high_threshold=200)
    pipe = Canny2Image(model)
    first, second = pipe.process(img, **p), pipe.process(img, **p)
    assert (pipe.prompts.hits, pipe.prompts.misses) == (2, 2)
    pipe.prompts = PromptCache(max_entries=1)       # the two prompts evict each other: no hits
    third = pipe.process(img, **p)
    assert pipe.prompts.hits == 0
    for a, b, c in zip(first, second, third):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)

"""A small LRU of text-encoder results, so repeated prompts (the demo, a folder run with one
prompt) skip CLIP: two float32 CLIP calls cost ~11 ms per image on an H200 (issue 10).

A hit returns a copy of exactly the tensor the encoder returned for the same texts, so results
are bit-identical to running it. Entries are keyed by the texts (the whole list: a batch of B
copies is encoded as a batch, as without the cache) and by a fingerprint of the text encoder
that changes whenever its output could:
* each parameter: identity, version counter (every in-place write: load_state_dict, copy_,
  random_weights_), dtype, device and shape; each buffer: name, dtype, device, shape (a move
  replaces buffer tensors, so not their identity) and, for integer buffers, their values;
* a sum of each floating tensor's values (_value_sums: the L2 norm in float64 on a GPU, an
  exact integer sum of its bytes in host memory): conversions (.half(), .to(...)) swap a
  tensor's data without touching its version, a round trip through float16 changes values but
  neither dtype nor device, and writes through `.data` bump no version (one pass reading every
  weight, ~0.25-0.5 GB at SD1.5 size: ~0.1 ms on a GPU, ~20 ms on two CPU cores);
* each submodule's instance-level forward (kernels.patch replaces those).
Moves keep values, parameters and versions: after low-VRAM mode's shifts (to the CPU and back,
tests/runtime/test_lowvram.py moves between two host "devices") it still hits,
as long as the encoder is where it was (low-VRAM fast mode fingerprints it in host memory, where
it lives between misses: one pass over 123 M CLIP values on the CPU instead of 0.5 GB moved).
Anything else that could change the outputs without changing these (a tensor's `.data` swapped
for one with other values but the same sum): call clear().
"""
import collections
import contextlib
import weakref

import torch

DEFAULT_ENTRIES = 32      # a 12-image entry at SD1.5 size is 12·77·768·4 B = 2.8 MB


def encoder_fingerprint(encoder):
    """A value that changes whenever `encoder`'s weights or forwards (could) have changed."""
    params = list(encoder.parameters())
    buffers = list(encoder.named_buffers())
    floats = [t.detach() for t in params + [b for _, b in buffers] if t.is_floating_point()]
    # A move gives every buffer a new tensor (parameters keep theirs): buffers go by name, and
    # the integer ones (CLIP's 77 position_ids) by value, as _value_sums covers floats only.
    return (tuple((id(t), t._version, t.dtype, t.device, tuple(t.shape)) for t in params),
            tuple((name, t.dtype, t.device, tuple(t.shape),
                   None if t.is_floating_point() else tuple(t.flatten().tolist()))
                  for name, t in buffers),
            _value_sums(floats), tuple(id(m.__dict__.get("forward")) for m in encoder.modules()))


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _value_sums(tensors):
    """A number per tensor that changes with its values: on a GPU the L2 norm in float64 (one
    fused reduction over all of them); in host memory the sum of the values' bytes read as
    int64 words, which wraps around but is exact and independent of the order of summation,
    and reads memory at the CPU's speed: full-size fp16 CLIP on two cores ~20 ms, against
    ~300-450 ms for the float64 norms, which low-VRAM mode paid on every request."""
    host = [t.contiguous().view(-1) for t in tensors if t.device.type == "cpu"]
    dev = [t for t in tensors if t.device.type != "cpu"]
    sums = tuple(int(t.view(torch.int64 if t.numel() * t.element_size() % 8 == 0
                            else _INTS[t.element_size()]).sum(dtype=torch.int64))
                 for t in host)
    norms = tuple(torch.stack(torch._foreach_norm(dev, 2, dtype=torch.float64)).tolist()) \
        if dev else ()
    return sums, norms


class PromptCache:
    """`encode(model, texts)` = model.get_learned_conditioning(texts), remembered for the last
    `max_entries` distinct (text encoder, weights, texts)."""

    def __init__(self, max_entries=DEFAULT_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.hits = self.misses = 0
        self._entries = collections.OrderedDict()   # key -> (weakref to encoder, tensor)

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()

    @torch.no_grad()
    def encode(self, model, texts, around=None):
        """`around()`, if given, is a context manager entered only to run the encoder on a miss
        (low-VRAM fast mode: lowvram.resident(CLIP, device)), so a hit moves nothing."""
        texts = tuple(texts)
        encoder = model.cond_stage_model
        key = (id(encoder), encoder_fingerprint(encoder), texts)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is encoder:     # not a new encoder at a reused id
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1].clone()
        self.misses += 1
        with around() if around is not None else contextlib.nullcontext():
            result = model.get_learned_conditioning(list(texts))
        self._entries[key] = (weakref.ref(encoder), result.clone())
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return result

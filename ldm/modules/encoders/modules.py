"""Text conditioning for SD1.5: FrozenCLIPEmbedder (OpenAI CLIP ViT-L/14 text tower).

Upstream loads `CLIPTokenizer` and `CLIPTextModel` from the Hugging Face hub. Here both are local:
the tokenizer reads the BPE file bundled with open_clip_torch (see tokenizer.py) and the text model
is our own module whose state-dict keys follow transformers 4.19 (the "2023 layout" that SD1.5 and
ControlNet checkpoints carry): `transformer.text_model.…`, with a persistent `position_ids` buffer.
The checkpoint's `cond_stage_model.*` weights replace whatever the model is initialised with.

Numerics follow transformers 4.19's CLIP text model: pre-LN blocks, q scaled by head_dim^-0.5
before QKᵀ, additive causal mask of -inf, softmax in float32, quick_gelu, LayerNorm eps 1e-5.
"""

import logging
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.encoders.tokenizer import CLIPBPETokenizer

logger = logging.getLogger(__name__)

SUPPORTED_VERSION = "openai/clip-vit-large-patch14"


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class CLIPTextOutput(NamedTuple):
    """The fields of transformers' BaseModelOutputWithPooling that upstream reads."""
    last_hidden_state: torch.Tensor           # [B, L, D], after final_layer_norm
    pooler_output: torch.Tensor               # [B, D], last_hidden_state at the first EOS
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # embeddings + each layer's output


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)
        # Persistent, as in transformers 4.19: SD1.5/ControlNet checkpoints carry this key.
        self.register_buffer("position_ids", torch.arange(max_position_embeddings).expand(1, -1),
                             persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "position_ids"
        loaded = state_dict.get(key)
        if loaded is not None and not torch.equal(
                loaded.detach().cpu().to(torch.float64),
                torch.arange(loaded.shape[-1], dtype=torch.float64).expand_as(loaded)):
            # Some merged SD checkpoints carry corrupted (float, off-by-a-bit) position ids. Like
            # upstream we load them as they are (copy_ into the int64 buffer), but say so.
            logger.warning("%s is not 0..%d: the text encoder will use these positions as loaded",
                           key, loaded.shape[-1] - 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids):
        positions = self.position_ids[:, :input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        # Declaration order = state-dict order of the 2023 checkpoints: k, v, q, out.
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, d]

    def forward(self, x, causal_mask):
        b, n, c = x.shape
        q = self._heads(self.q_proj(x) * self.scale)
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) + causal_mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, hidden_size, num_heads, intermediate_size):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.mlp = CLIPMLP(hidden_size, intermediate_size)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=1e-5)

    def forward(self, x, causal_mask):
        x = x + self.self_attn(self.layer_norm1(x), causal_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, hidden_size, num_layers, num_heads, intermediate_size):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(hidden_size, num_heads, intermediate_size) for _ in range(num_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                 max_position_embeddings):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(hidden_size, num_layers, num_heads, intermediate_size)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=1e-5)

    def forward(self, input_ids, output_hidden_states=False):
        x = self.embeddings(input_ids)
        n = input_ids.shape[1]
        causal_mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, causal_mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        # Pooled = features at the first EOS; EOS (49407) is the largest id, so argmax finds it.
        pooled = last[torch.arange(last.shape[0], device=last.device), input_ids.argmax(dim=-1)]
        return CLIPTextOutput(last, pooled, tuple(hidden_states) if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """Holds `text_model` so that keys read `transformer.text_model.…` as in 2023 checkpoints."""

    def __init__(self, vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, max_position_embeddings=77):
        super().__init__()
        self.text_model = CLIPTextTransformer(vocab_size, hidden_size, num_hidden_layers,
                                              num_attention_heads, intermediate_size,
                                              max_position_embeddings)

    def forward(self, input_ids, output_hidden_states=False):
        return self.text_model(input_ids, output_hidden_states=output_hidden_states)


class FrozenCLIPEmbedder(AbstractEncoder):
    """Uses the CLIP text transformer to encode text (offline; ViT-L/14 text tower only).

    `device` is accepted for compatibility: upstream fixes it to "cuda" and moves the tokens
    there; here tokens go to the parameters' device, and a given device moves the module.
    The size parameters exist so that a tiny model can be built for tests.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version=SUPPORTED_VERSION, device=None, max_length=77, freeze=True,
                 layer="last", layer_idx=None, vocab_size=49408, hidden_size=768,
                 num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=77):
        super().__init__()
        if version != SUPPORTED_VERSION:
            raise ValueError(f"FrozenCLIPEmbedder supports only version={SUPPORTED_VERSION!r} "
                             f"(the SD1.5 text encoder, built offline), got {version!r}")
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > num_hidden_layers):
            raise ValueError(f"layer='hidden' needs an index into the {num_hidden_layers + 1} "
                             f"hidden states (|layer_idx| <= {num_hidden_layers}), "
                             f"got {layer_idx!r}")
        if max_length > max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings "
                             f"{max_position_embeddings}")
        self.tokenizer = CLIPBPETokenizer(max_length=max_length)
        if vocab_size < len(self.tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the CLIP tokenizer's "
                             f"{len(self.tokenizer)} ids")
        self.transformer = CLIPTextModel(vocab_size, hidden_size, num_hidden_layers,
                                         num_attention_heads, intermediate_size,
                                         max_position_embeddings)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if device is not None:
            self.to(device)
        if freeze:
            self.freeze()

    @property
    def device(self):
        return self.transformer.text_model.final_layer_norm.weight.device

    def freeze(self):
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text):
        tokens = self.tokenizer(text).to(self.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text):
        # Through self(...) rather than `encode = forward`, so that an instance-level patch of
        # forward (runtime/) also applies to encode.
        return self(text)

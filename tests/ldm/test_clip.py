"""FrozenCLIPEmbedder: offline tokenizer and text model against transformers as an independent
reference (built from local files/configs only; nothing touches the hub).

Deliberate tokenizer difference: SD1.5 ran transformers 4.19's CLIPTokenizer with ftfy installed,
so text went through `ftfy.fix_text` (ligatures, full-width forms, mojibake, HTML entities, curly
quotes). transformers 5.x's CLIPTokenizer normalizes with NFC + whitespace + lowercase only, so it
is compared on `ftfy.fix_text(prompt)`; on prompts that ftfy leaves alone, raw ids are compared too.
"""

import gzip
import json
import os
import subprocess
import sys

import ftfy
import pytest
import torch
import transformers

from conftest import REFERENCE_DATA
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPBPETokenizer, default_bpe_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOS, EOS = 49406, 49407
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
FULL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)

LONG_PROMPT = ", ".join(["a very detailed photograph of a red fox in the snow"] * 12)
PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, highly detailed, 4k, trending on ArtStation",
    "best quality, extremely detailed",
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality",
    "don't stop: it's 12:30 o'clock!!! (masterpiece:1.2) [foo|bar] {baz} we'll they've I'm",
    "naïve café résumé, Straße, ÄÖÜ, cafe\u0301",
    "猫の写真、美しい風景",
    "한국어 문장 and Привет мир and مرحبا بالعالم",
    "🐱🐶 a cat and a dog 👍🏽 ❤️",
    "e-mail foo@bar.com, http://x.y/z?a=1 3.14159 1234567890",
    "  lots   of\t\twhitespace\n\nhere  ",
    "",
    LONG_PROMPT,
    # ftfy changes these: ligatures, full-width forms, mojibake, entities, curly quotes.
    "ﬁne ﬂowers",
    "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３",
    "cafÃ© mojibake",
    "fish &amp; chips",
    "“quoted” ‘text’",
]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPBPETokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json/merges.txt laid out like OpenAI's hub files,
    derived here from the BPE file independently of our loader."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49408 - 256 * 2 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def hf_ids(hf_tokenizer, texts):
    return hf_tokenizer(texts, truncation=True, max_length=77, padding="max_length",
                        return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_plain_prompt_ids_and_padding(tokenizer):
    ids = tokenizer(["a photo of a cat"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] + [EOS] * 70


def test_empty_prompt(tokenizer):
    assert tokenizer([""])[0].tolist() == [BOS] + [EOS] * 76
    assert tokenizer([" \t\n "])[0].tolist() == [BOS] + [EOS] * 76


def test_long_prompt_truncated_with_eos_last(tokenizer):
    content = tokenizer.encode(LONG_PROMPT)
    assert len(content) > 100
    ids = tokenizer([LONG_PROMPT, "a " * 200])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [BOS] + content[:75] + [EOS]
    assert ids[1].tolist() == [BOS] + [320] * 75 + [EOS]


@pytest.mark.parametrize("text, same_as", [
    ("ﬁne ﬂowers", "fine flowers"),                      # ligatures
    ("ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３", "full-width abc 123"),  # full-width forms
    ("cafÃ© mojibake", "café mojibake"),                 # UTF-8 read as Latin-1
    ("fish &amp; chips", "fish & chips"),                # HTML entity, unescaped by ftfy
    ("“quoted” ‘text’", "\"quoted\" 'text'"),            # curly quotes
    ("cafe\u0301", "caf\u00e9"),                          # NFC
    ("  Hello \n\t  WORLD  ", "hello world"),            # whitespace runs, strip, lowercase
])
def test_cleaning(tokenizer, text, same_as):
    assert torch.equal(tokenizer([text]), tokenizer([same_as]))


def test_entity_left_alone_next_to_markup(tokenizer):
    # ftfy's "auto" HTML mode does not unescape text that already contains "<", and we do not
    # unescape again (open_clip's own cleaning would): "&amp;" stays literal here.
    assert tokenizer.clean("<b> &amp;") == "<b> &amp;"


def test_unicode_prompts_are_byte_level(tokenizer):
    for text in ["猫の写真", "🐱👍🏽", "한국어"]:
        ids = tokenizer.encode(text)
        assert ids and all(0 <= i < 49406 for i in ids)


def test_batch_and_single_string(tokenizer):
    batch = tokenizer(PROMPTS)
    assert batch.shape == (len(PROMPTS), 77)
    for row, text in zip(batch, PROMPTS):
        assert torch.equal(row, tokenizer(text)[0])


def test_matches_transformers_tokenizer(tokenizer, hf_tokenizer):
    ours = tokenizer(PROMPTS)
    reference = hf_ids(hf_tokenizer, [ftfy.fix_text(p) for p in PROMPTS])
    for text, a, b in zip(PROMPTS, ours, reference):
        assert a.tolist() == b.tolist(), text
    untouched = [p for p in PROMPTS if ftfy.fix_text(p) == p]
    assert len(untouched) >= 10
    assert torch.equal(tokenizer(untouched), hf_ids(hf_tokenizer, untouched))


# ---------------------------------------------------------------------------------------------
# Text model


def randomize_(module, seed):
    """Random weights everywhere (LayerNorm gains too) so the comparison is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(noise * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            elif "embedding" in name:
                p.copy_(noise * 0.5)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    return module


def hf_text_model(ours, dims):
    """transformers.CLIPTextModel from a local config, carrying our weights."""
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                         hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
                                         **dims)
    config._attn_implementation = "eager"
    model = transformers.CLIPTextModel(config).eval()
    hf_keys = set(model.state_dict())
    # transformers 5.x: no `text_model.` level and no persistent position_ids.
    mapped = {(k if k in hf_keys else k.removeprefix("text_model.")): v
              for k, v in ours.transformer.state_dict().items() if not k.endswith("position_ids")}
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("position_ids") for k in result.missing_keys)
    return model


def compare_with_transformers(dims, prompts, seed):
    ours = randomize_(FrozenCLIPEmbedder(**dims), seed)
    reference = hf_text_model(ours, dims)
    ids = ours.tokenizer(prompts)
    with torch.no_grad():
        got = ours.transformer(ids, output_hidden_states=True)
        want = reference(input_ids=ids, output_hidden_states=True)
    scale = want.last_hidden_state.abs().max().item()
    assert scale > 0.5
    err = (got.last_hidden_state - want.last_hidden_state).abs().max().item()
    assert err <= 1e-4 * scale, (err, scale)
    assert len(got.hidden_states) == len(want.hidden_states) == dims["num_hidden_layers"] + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()
    assert (got.pooler_output - want.pooler_output).abs().max().item() <= 1e-4 * scale
    # The embedder's forward is the same computation on the same ids.
    with torch.no_grad():
        assert torch.equal(ours(prompts), got.last_hidden_state)
    return err, scale


def test_text_model_matches_transformers_tiny():
    compare_with_transformers(TINY, PROMPTS[:6] + [LONG_PROMPT, ""], seed=0)


def test_text_model_matches_transformers_full_size():
    compare_with_transformers(FULL, ["a photo of a cat", LONG_PROMPT], seed=1)


def test_hidden_and_pooled_layers():
    last = randomize_(FrozenCLIPEmbedder(**TINY), seed=2)
    hidden = FrozenCLIPEmbedder(layer="hidden", layer_idx=-2, **TINY)
    pooled = FrozenCLIPEmbedder(layer="pooled", **TINY)
    hidden.load_state_dict(last.state_dict())
    pooled.load_state_dict(last.state_dict())
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        out = last.transformer(last.tokenizer(prompts), output_hidden_states=True)
        assert torch.equal(hidden(prompts), out.hidden_states[-2])
        assert pooled(prompts).shape == (2, 1, 64)
        # Pooled = the first EOS: position 6 for "a photo of a cat", 3 for "a dog".
        assert torch.equal(pooled(prompts)[:, 0], out.last_hidden_state[[0, 1], [6, 3]])
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(layer="hidden", **TINY)
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenCLIPEmbedder(layer="penultimate", **TINY)


# ---------------------------------------------------------------------------------------------
# State dict, construction, device


def test_state_dict_keys_match_checkpoint_layout():
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    path = os.path.join(REFERENCE_DATA, "keys_control_sd15.tsv")
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.startswith("cond_stage_model.")]
    ours = [("cond_stage_model." + k, json.dumps(list(v.shape)),
             str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == [(k, json.dumps(json.loads(s)), d) for k, s, d in rows]
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_legacy_position_ids(caplog):
    model = FrozenCLIPEmbedder(**TINY)
    sd = model.state_dict()
    key = "transformer.text_model.embeddings.position_ids"
    assert sd[key].dtype == torch.long and sd[key].shape == (1, 77)
    assert torch.equal(sd[key], torch.arange(77)[None])
    # A 2023 checkpoint (with the key) loads strictly; one without it does not.
    model.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="position_ids"):
        model.load_state_dict({k: v for k, v in sd.items() if k != key})
    # Corrupted (float, off-by-a-bit) positions load as upstream would, with a warning.
    bad = dict(sd, **{key: torch.arange(77, dtype=torch.float32)[None] - 1e-3})
    model.load_state_dict(bad)
    assert "position_ids" in caplog.text
    assert model.transformer.text_model.embeddings.position_ids.dtype == torch.long


def test_embedder_shape_device_determinism():
    model = FrozenCLIPEmbedder(**TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    prompts = ["a photo of a cat", "best quality, extremely detailed", ""]
    out = model.encode(prompts)
    assert out.shape == (3, 77, 64) and out.dtype == torch.float32
    assert out.device == model.device == torch.device("cpu")
    assert torch.isfinite(out).all()
    assert torch.equal(out, model(prompts))
    # The tokens follow the parameters' device (upstream hard-codes "cuda").
    with torch.device("meta"):
        meta = FrozenCLIPEmbedder(**TINY)
    assert meta(["a cat"]).device == torch.device("meta")


def test_constructor_errors():
    with pytest.raises(ValueError, match="clip-vit-large-patch14"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32", **TINY)
    with pytest.raises(ValueError, match="vocab_size"):
        FrozenCLIPEmbedder(vocab_size=1000, **TINY)
    with pytest.raises(ValueError, match="divisible"):
        FrozenCLIPEmbedder(hidden_size=64, num_attention_heads=5, num_hidden_layers=1)


def test_offline_and_light_imports():
    """Construction and encoding open no socket and import neither transformers nor open_clip
    (which would pull in torchvision)."""
    code = """
import socket, sys
def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
model = FrozenCLIPEmbedder(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256)
assert model(["a photo of a cat"]).shape == (1, 77, 64)
heavy = [m for m in ("transformers", "open_clip", "torchvision", "huggingface_hub")
         if m in sys.modules]
assert not heavy, heavy
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_embedder_on_gpu_matches_cpu():
    model = randomize_(FrozenCLIPEmbedder(**TINY), seed=3)
    prompts = ["a photo of a cat", LONG_PROMPT]
    with torch.no_grad():
        cpu = model(prompts)
        gpu = model.cuda()(prompts)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-4 * cpu.abs().max().item()

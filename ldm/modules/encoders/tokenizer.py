"""OpenAI CLIP tokenizer (byte-level BPE), fully offline.

Reproduces what SD1.5 ran through `CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`
(transformers 4.19 with ftfy installed), without the hub:

* vocabulary: OpenAI's `bpe_simple_vocab_16e6.txt.gz`, which open_clip_torch ships inside its
  package. It is located with `importlib.util.find_spec` so that open_clip itself (and through it
  torchvision) is never imported.
* ids: 256 byte characters, the same with "</w>", 48894 merges, then <|startoftext|> = 49406 and
  <|endoftext|> = 49407.
* cleaning: `ftfy.fix_text` with its defaults (it also unescapes HTML entities, once), whitespace
  runs collapsed to one space and stripped, then lower-cased.
* framing: BOS, at most max_length - 2 content tokens, EOS, then padding with EOS (49407) up to
  max_length. (open_clip's own `tokenize` pads with 0, which gives different embeddings.)
"""

import functools
import gzip
import importlib.util
import os

import ftfy
import regex
import torch

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenizer: the two special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters. Applied to lower-cased text, hence IGNORECASE only matters
# for the contractions, as in the original.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def default_bpe_path():
    """Path of the BPE vocabulary bundled with open_clip_torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, BPE_FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {BPE_FILENAME!r} not found: install open_clip_torch "
        "(`pip install open_clip_torch`), which bundles it, or pass bpe_path=..."
    )


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
    """Reversible map byte -> printable unicode character used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, a few
    Latin-1 gaps) map, in byte order, to the code points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.lru_cache(maxsize=4)
def load_vocabulary(bpe_path, vocab_size=49408):
    """(token -> id dict, merge pair -> rank dict) for the first vocab_size ids of the BPE file."""
    num_merges = vocab_size - 2 * 256 - 2
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; the file holds more merges than the vocabulary uses.
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]
    if len(merges) != num_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {num_merges} merge lines after the header")
    byte_chars = list(bytes_to_unicode().values())
    tokens = (byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
              + [START_OF_TEXT, END_OF_TEXT])
    encoder = {token: i for i, token in enumerate(tokens)}
    ranks = {pair: i for i, pair in enumerate(merges)}
    return encoder, ranks


class CLIPBPETokenizer:
    """Callable: list[str] -> LongTensor [B, max_length] of OpenAI CLIP token ids."""

    def __init__(self, bpe_path=None, max_length=77, vocab_size=49408, bpe_cache_size=2 ** 16):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        self.encoder, self.bpe_ranks = load_vocabulary(bpe_path or default_bpe_path(), vocab_size)
        self.max_length = max_length
        self.bos_token_id = self.encoder[START_OF_TEXT]
        self.eos_token_id = self.encoder[END_OF_TEXT]
        self.pad_token_id = self.eos_token_id
        self._byte_chars = bytes_to_unicode()
        self._bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe_uncached)

    def __len__(self):
        return len(self.encoder)

    @staticmethod
    def clean(text):
        text = ftfy.fix_text(text)
        return _WHITESPACE.sub(" ", text).strip().lower()

    def _bpe_uncached(self, word):
        """Split one pre-token (already mapped to byte characters) into vocabulary tokens."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text):
        """Content token ids of one prompt (no BOS/EOS, no truncation)."""
        ids = []
        for word in _WORD_PATTERN.findall(self.clean(text)):
            if word in (START_OF_TEXT, END_OF_TEXT):
                ids.append(self.encoder[word])
                continue
            chars = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(chars))
        return ids

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id, *self.encode(text)[:self.max_length - 2], self.eos_token_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

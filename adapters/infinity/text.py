"""Text conditioning: the T5 encoder Infinity reads (reference §6.1) and a tiny stand-in.

Real models: ``google/flan-t5-xl`` encoder (``T5EncoderModel``) with its tokenizer (``legacy=True``,
``model_max_length=512``); prompts are padded to 512 and truncated; a prompt's features are the
encoder's last hidden states at its non-padding positions (end-of-sequence token included).

``infinity-tiny-random`` uses a T5 encoder built from a small ``transformers.T5Config`` with seeded random
weights and ``ByteTokenizer``: UTF-8 bytes + 3 (0 = pad, 1 = end of sequence, 2 = unknown), the ByT5
id layout, so no vocabulary file or download is needed. ``infinity-tiny`` uses the same encoder shape
with trained weights and ``WordTokenizer``: one id per word of a small vocabulary (the scene
captions' words, shipped as ``text_tokenizer.json`` next to the weights), every other word spelled in
bytes as ``ByteTokenizer`` does. Whole words keep the caption's word distances inside T5's exact
relative-position buckets, which is what lets a 2-layer encoder tie each colour to its place.

Deviation: the official scripts run T5 in fp16 on CUDA; we run it in float32 unless told otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
T5_MAX_LENGTH = 512


class ByteTokenizer:
    """UTF-8 byte tokenizer: id = byte + 3; pad 0, eos 1 (appended), unk 2 (unused); truncation
    keeps the end-of-sequence token. Called like a ``transformers`` tokenizer."""

    offset, pad_token_id, eos_token_id, unk_token_id = 3, 0, 1, 2
    vocab_size = 256 + 3

    def __init__(self, model_max_length: int = 64):
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 (a byte plus end of sequence), got {model_max_length!r}")
        self.model_max_length = model_max_length

    def encode(self, text: str, max_length: Optional[int] = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        limit = max_length or self.model_max_length
        ids = [b + self.offset for b in text.encode("utf-8")][: limit - 1]
        return ids + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts, *, max_length: Optional[int] = None, padding="max_length", truncation=True,
                 return_tensors="pt", **unused):
        texts = [texts] if isinstance(texts, str) else list(texts)
        limit = max_length or self.model_max_length
        rows = [self.encode(t, limit) for t in texts]
        width = limit if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"model_max_length": self.model_max_length}))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ByteTokenizer":
        data = json.loads((Path(folder) / BYTE_TOKENIZER_FILE).read_text())
        return cls(int(data["model_max_length"]))


WORD_TOKENIZER_FILE = "text_tokenizer.json"


class WordTokenizer(ByteTokenizer):
    """Whole-word ids for a fixed vocabulary with byte fallback (SentencePiece-style): a
    whitespace-separated word found in ``words`` is one id (``259 + its index``); any other word is its
    UTF-8 bytes (ids as ``ByteTokenizer``), preceded by the space byte unless it starts the text, so
    nothing a prompt says is dropped. End of sequence 1 appended, pad 0; called like a ``transformers``
    tokenizer."""

    def __init__(self, words: Sequence[str], model_max_length: int = 64):
        super().__init__(model_max_length)
        words = list(words)
        bad = [w for w in words if not isinstance(w, str) or not w or w != w.strip() or len(w.split()) != 1]
        if bad or len(set(words)) != len(words) or not words:
            raise ValueError(f"words must be distinct non-empty strings without whitespace, got {words!r}")
        self.words = tuple(words)
        self._ids = {w: ByteTokenizer.vocab_size + i for i, w in enumerate(words)}
        self.vocab_size = ByteTokenizer.vocab_size + len(words)

    def encode(self, text: str, max_length: Optional[int] = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        ids: list[int] = []
        for position, word in enumerate(text.split()):
            if word in self._ids:
                ids.append(self._ids[word])
            else:
                spelled = word.encode("utf-8") if position == 0 else b" " + word.encode("utf-8")
                ids.extend(b + self.offset for b in spelled)
        return ids[: (max_length or self.model_max_length) - 1] + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i >= ByteTokenizer.vocab_size:
                if pending:
                    out.append(pending.decode("utf-8", errors="replace").strip())
                    pending = bytearray()
                out.append(self.words[i - ByteTokenizer.vocab_size])
            elif i >= self.offset:
                pending.append(i - self.offset)
        if pending:
            out.append(pending.decode("utf-8", errors="replace").strip())
        return " ".join(out)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.save(Path(folder) / WORD_TOKENIZER_FILE)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"kind": "word+byte", "model_max_length": self.model_max_length,
                                          "words": list(self.words)}, indent=1))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "word+byte":
            raise ValueError(f"{path}: not a word tokenizer file (kind {data.get('kind')!r})")
        return cls(data["words"], int(data["model_max_length"]))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "WordTokenizer":
        return cls.from_file(Path(folder) / WORD_TOKENIZER_FILE)


class TextEncoder(nn.Module):
    """Prompts -> per-prompt T5 features ``(tokens_i, d_model)`` float32 (padding dropped)."""

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = T5_MAX_LENGTH):
        super().__init__()
        self.encoder, self.tokenizer, self.max_length = encoder, tokenizer, max_length

    @property
    def width(self) -> int:
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r}")
        tokens = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length",
                                truncation=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, :n] for i, n in enumerate(lengths)]


def tiny_t5_config(width: int, vocab_size: int = ByteTokenizer.vocab_size):
    """A small T5 encoder config (2 layers) whose output width matches the transformer's text width."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=width, d_kv=32, d_ff=2 * width,
                    num_layers=2, num_heads=max(1, width // 32), relative_attention_num_buckets=32,
                    relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


def random_text_encoder(width: int, *, seed: int = 0, max_length: int = 32) -> TextEncoder:
    """A T5 encoder with seeded random weights and the byte tokenizer (no download)."""
    from transformers import T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(tiny_t5_config(width))
    return TextEncoder(encoder.eval().requires_grad_(False), ByteTokenizer(max_length), max_length)


def trained_text_encoder(path, width: int, *, max_length: int) -> TextEncoder:
    """The trained tiny T5 (``tiny_t5_config(width, vocab)``, weights from a safetensors file) with
    the tokenizer it was trained with: ``WordTokenizer`` from ``text_tokenizer.json`` beside the
    weights when that file exists, else the byte tokenizer (weights trained before the word one)."""
    from transformers import T5EncoderModel

    from adapters.checkpoint_io import load_safetensors_file

    vocabulary = Path(path).parent / WORD_TOKENIZER_FILE
    tokenizer = (WordTokenizer(WordTokenizer.from_file(vocabulary).words, max_length) if vocabulary.is_file()
                 else ByteTokenizer(max_length))
    with torch.device("meta"):
        encoder = T5EncoderModel(tiny_t5_config(width, tokenizer.vocab_size))
    encoder = encoder.to_empty(device="cpu")
    state = load_safetensors_file(path, "tiny T5 text encoder")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    # T5 ties the shared embedding to encoder.embed_tokens: one of the two names may be absent
    missing = [k for k in missing if k not in ("shared.weight", "encoder.embed_tokens.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: not the tiny T5 encoder (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        encoder.shared.weight.data.copy_(state["encoder.embed_tokens.weight"])
    return TextEncoder(encoder.eval().requires_grad_(False), tokenizer, max_length)


def load_text_encoder(source: str | os.PathLike = "google/flan-t5-xl", *, tokenizer=None,
                      max_length: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load a T5 encoder with ``transformers`` from a hub name or a local folder.

    tokenizer: None reads it from the same place (``AutoTokenizer``, legacy=True), or the byte
    tokenizer when the folder holds ``byte_tokenizer.json``. Offline without a local copy this
    raises an error that says how to point at a folder.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    source = os.fspath(source)
    local = Path(source).is_dir()
    try:
        encoder = T5EncoderModel.from_pretrained(source)
        if tokenizer is None:
            if local and (Path(source) / WORD_TOKENIZER_FILE).is_file():
                tokenizer = WordTokenizer.from_pretrained(source)
            elif local and (Path(source) / BYTE_TOKENIZER_FILE).is_file():
                tokenizer = ByteTokenizer.from_pretrained(source)
            else:
                tokenizer = AutoTokenizer.from_pretrained(source, legacy=True, model_max_length=T5_MAX_LENGTH)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"could not load the T5 text encoder {source!r} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Download it once (e.g. `huggingface-cli download google/flan-t5-xl`) or pass a local folder "
            "saved with save_pretrained: text_encoder='/path/to/flan-t5-xl'") from error
    if max_length is None:
        max_length = getattr(tokenizer, "model_max_length", T5_MAX_LENGTH)
        max_length = T5_MAX_LENGTH if max_length is None or max_length > 10 ** 6 else int(max_length)
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return TextEncoder(encoder, tokenizer, max_length)

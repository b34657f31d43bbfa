"""Text tokenizers: a word-level one built from a vocabulary, or a local HF one.

Both map a string to (ids, mask) of a fixed length: int32 ids padded with
`pad_id`, and a bool mask that is True on real tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import collections
import os
import re

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_WORD_RE = re.compile(r"[a-z0-9']+")


def split_words(text: str) -> list[str]:
  """Lower-cases and splits on anything that is not a letter, digit or '."""
  return _WORD_RE.findall(text.lower())


class WordTokenizer:
  """Word-level tokenizer: id 0 is padding, 1 is unknown, then the vocabulary."""

  def __init__(self, vocabulary: Sequence[str]):
    words = [w for w in vocabulary if w not in (PAD, UNK)]
    if len(set(words)) != len(words):
      raise ValueError("vocabulary has duplicate words")
    self.itos = [PAD, UNK] + list(words)
    self.stoi = {w: i for i, w in enumerate(self.itos)}

  pad_id = 0
  unk_id = 1

  @property
  def vocab_size(self) -> int:
    return len(self.itos)

  @classmethod
  def from_texts(cls, texts: Iterable[str], *, min_count: int = 1,
                 max_size: int | None = None) -> "WordTokenizer":
    """Vocabulary of the words seen at least `min_count` times, most frequent
    first (ties alphabetical), at most `max_size` words."""
    counts = collections.Counter(w for t in texts for w in split_words(t))
    words = sorted((w for w, c in counts.items() if c >= min_count),
                   key=lambda w: (-counts[w], w))
    return cls(words[:max_size] if max_size else words)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "WordTokenizer":
    with open(path, encoding="utf-8") as f:
      return cls([line.rstrip("\n") for line in f if line.rstrip("\n")])

  def save(self, path: str | os.PathLike) -> None:
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(self.itos[2:]) + "\n")
    os.replace(tmp, path)

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [self.stoi.get(w, self.unk_id) for w in split_words(text)][:max_len]
    out = np.zeros(max_len, np.int32)
    out[:len(ids)] = ids
    return out, out != self.pad_id

  def decode(self, ids: Sequence[int], mask: Sequence[bool] | None = None) -> str:
    if mask is None:
      mask = [i != self.pad_id for i in ids]
    return " ".join(self.itos[int(i)] for i, m in zip(ids, mask) if m)


class HFTokenizer:
  """A Hugging Face tokenizer loaded from a local directory (no download)."""

  def __init__(self, directory: str | os.PathLike):
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"Tokenizer directory {directory!r} does not exist. `tokenizer` must "
          "be 'word' or a local directory saved with "
          "`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`."
      )
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if self._tok.pad_token_id is None:
      raise ValueError(f"Tokenizer in {directory} has no padding token.")
    self.directory = directory

  @property
  def pad_id(self) -> int:
    return int(self._tok.pad_token_id)

  @property
  def vocab_size(self) -> int:
    return len(self._tok)

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    enc = self._tok(text, max_length=max_len, padding="max_length",
                    truncation=True, return_attention_mask=True)
    return (np.asarray(enc["input_ids"], np.int32),
            np.asarray(enc["attention_mask"], bool))

  def decode(self, ids: Sequence[int], mask: Sequence[bool] | None = None) -> str:
    if mask is not None:
      ids = [i for i, m in zip(ids, mask) if m]
    return self._tok.decode(ids, skip_special_tokens=True)

  def __getstate__(self):  # pickled into grain worker processes
    return {"directory": self.directory}

  def __setstate__(self, state):
    self.__init__(state["directory"])

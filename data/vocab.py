"""SentencePiece vocabularies: training one locally, and a small tokenizer wrapper.

No TensorFlow here, so the LLM code (and the GPU machines without TF) can use it.
Our locally trained vocabularies follow seqio's ids (pad 0, eos 1, unk 2, no bos);
Gemma's tokenizer has pad 0, eos 1, bos 2, unk 3. `Tokenizer` reads the ids from
the model file, so both work the same.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from infra.errors import ModelFileError

SPACE = "\u2581"  # SentencePiece's whitespace symbol


def train_vocabulary(texts: list[str], model_path: str, vocab_size: int,
                     model_type: str = "unigram",
                     whole: tuple[str, ...] = ()) -> str:
  """Trains a SentencePiece model ("unigram" or "bpe") on `texts`, written
  atomically. On a small corpus (each title once) unigram stops at a few
  hundred pieces and splits words; BPE reaches `vocab_size` and keeps words
  whole (2.4x fewer tokens for a history of synthetic titles).

  `whole`: phrases (e.g. every catalogue title) each kept as one piece after a
  space, on top of `vocab_size` (SentencePiece's user-defined symbols, which
  match only with spaces written as its "▁").

  Ids follow seqio's convention: pad=0, eos=1, unk=2, no bos.
  """
  symbols = sorted({SPACE + phrase.replace(" ", SPACE) for phrase in whole})
  directory = os.path.dirname(model_path) or "."
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    prefix = os.path.join(tmp, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix,
        vocab_size=vocab_size + len(symbols), model_type=model_type,
        character_coverage=1.0, user_defined_symbols=symbols,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    os.replace(prefix + ".model", model_path)
  return model_path


class Tokenizer:
  """A SentencePiece model file with padding to fixed-shape id arrays."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist")
    self.path = model_path
    try:
      self.processor = spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as e:  # sentencepiece: "could not parse ..."
      raise ModelFileError(f"{model_path} is not a SentencePiece model: "
                           f"{str(e).splitlines()[0]}") from None
    self.pad_id = max(self.processor.pad_id(), 0)
    self.eos_id = self.processor.eos_id()
    self.bos_id = self.processor.bos_id()  # -1 when the vocabulary has none
    # Gemma's tokenizer adds no dummy prefix and keeps whitespace as written,
    # so "Heat" and " Heat" are different pieces. Prompts are assembled from
    # pieces tokenized apart (a title's ids are the same wherever it appears),
    # each a word after a space: encode writes that space where the model
    # does not add it itself.
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(self.processor.serialized_model_proto())
    self.adds_space = not model.normalizer_spec.add_dummy_prefix

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Each text's ids, as a word after a space (see __init__)."""
    if self.adds_space:
      texts = [" " + t for t in texts]
    return self.processor.encode(list(texts))

  def decode(self, ids) -> str:
    """Ids up to the first eos (pads dropped) -> text."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    text = self.processor.decode([i for i in ids if i != self.pad_id])
    return text[1:] if self.adds_space and text.startswith(" ") else text

  def pad(self, sequences: list[list[int]], length: int, left: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-length [n, length] ids and mask; longer sequences keep their last
    `length` ids when left-padding (prompts) and their first when right-padding."""
    ids = np.full((len(sequences), length), self.pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
      seq = seq[-length:] if left else seq[:length]
      if left:
        ids[row, length - len(seq):], mask[row, length - len(seq):] = seq, True
      else:
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, True
    return ids, mask

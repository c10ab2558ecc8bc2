"""Word-piece output units: a CTC vocabulary made of the teacher's own WordPiece tokens.

The English analogue of the Mandarin setting where the published transfer gains come from (the characters are both
the text model's tokens and the recogniser's output units): the CTC head spells each word with the teacher's pieces,
so that a teacher state and the frames it is aligned to stand for the same unit.

The vocabulary is an ordinary `Wav2Vec2CTCTokenizer` vocabulary whose entries are piece spellings ("the", "ing",
"s") next to every single character of the training text, so the saved tokenizer is the stock class and the stock
ASR pipeline decodes it (grouping repeats, dropping blanks, joining units, a space for the word delimiter). Only
encoding needs this module: the stock tokenizer splits text on its multi-character entries and strips the spaces
around them, which loses the word boundaries CTC must emit. `WordPieceUnits.encode` spells each word greedily,
longest unit first, as WordPiece does, with the `tokenizers` library's WordPiece model.

A piece and its "##" continuation share one unit (the word delimiter already marks where words start), so the
teacher's "s" and "##s" are both the unit "s".
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

CONTINUATION = "##"


def piece_spelling(piece: str) -> str:
    """The characters a WordPiece token spells (`"##"` marks a continuation of the word before it)."""
    return piece[len(CONTINUATION):] if piece.startswith(CONTINUATION) else piece


def word_piece_vocabulary(
    texts: Iterable[str], piece_tokenizer, size: int, pad_token: str = "[PAD]", unk_token: str = "[UNK]",
    word_delimiter_token: str = "|",
) -> dict[str, int]:
    """A CTC vocabulary (unit to id) of the most frequent word pieces of `texts`, and every character in them.

    Args:
        texts: the normalised training transcripts.
        piece_tokenizer: the teacher's tokenizer (its `tokenize` gives WordPiece tokens, `"##"` marking
            continuations), e.g. `AutoTokenizer.from_pretrained("bert-base-uncased")`.
        size: the number of entries, special tokens and single characters included. The multi-character pieces
            fill what is left, most frequent first (ties in alphabetical order); every word stays spellable through
            the single characters.
        pad_token, unk_token, word_delimiter_token: ids 0, 1 and 2, as in the script's character vocabulary (the
            padding token is CTC's blank).

    Returns:
        `{unit: id}`, ready for `vocab.json` of a `Wav2Vec2CTCTokenizer`.
    """
    texts = list(texts)
    characters = sorted({c for text in texts for c in text if c != " "})
    vocab = {pad_token: 0, unk_token: 1, word_delimiter_token: 2}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    if size < len(vocab):
        raise ValueError(f"`size` {size} leaves no room for the {len(vocab)} special tokens and single characters of "
                         "the text; give at least that many.")
    counts = Counter(
        piece_spelling(piece) for text in texts for piece in piece_tokenizer.tokenize(text)
    )
    # Pieces the text does not spell as they are (`[UNK]`, a cased or accent-stripped piece) cannot be labels.
    pieces = [s for s in counts if len(s) > 1 and s not in vocab and all(c in vocab for c in s)]
    for spelling in sorted(pieces, key=lambda s: (-counts[s], s))[: size - len(vocab)]:
        vocab[spelling] = len(vocab)
    return vocab


class WordPieceUnits:
    """Encodes text into the ids of a word-piece CTC vocabulary (`word_piece_vocabulary`).

    Args:
        vocab: `{unit: id}` of the CTC tokenizer (`tokenizer.get_vocab()`).
        unk_token: the unknown unit, for a word with a character outside the vocabulary.
        word_delimiter_token: the unit between two words.
        special_tokens: other entries that spell nothing (padding, sentence marks).
    """

    def __init__(self, vocab: dict[str, int], unk_token: str = "[UNK]", word_delimiter_token: str = "|",
                 special_tokens: Iterable[str] = ()):
        from tokenizers import Tokenizer, models, pre_tokenizers

        specials = {unk_token, word_delimiter_token, *special_tokens}
        if unk_token not in vocab or word_delimiter_token not in vocab:
            raise ValueError(f"the vocabulary lacks {unk_token!r} or {word_delimiter_token!r}.")
        self.vocab = dict(vocab)
        self.unk_id = vocab[unk_token]
        self.delimiter = word_delimiter_token
        self.delimiter_id = vocab[word_delimiter_token]
        # The WordPiece model wants each unit twice: as a word's start and as a continuation.
        pieces = {unk_token: 0}
        for unit in vocab:
            if unit not in specials:
                pieces.setdefault(unit, len(pieces))
                pieces.setdefault(CONTINUATION + unit, len(pieces))
        self._model = Tokenizer(models.WordPiece(pieces, unk_token=unk_token, continuing_subword_prefix=CONTINUATION,
                                                 max_input_chars_per_word=1000))
        self._model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self._units_of: dict[str, list[int]] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "WordPieceUnits":
        """The encoder of a `Wav2Vec2CTCTokenizer` over a word-piece vocabulary."""
        return cls(tokenizer.get_vocab(), str(tokenizer.unk_token), str(tokenizer.word_delimiter_token),
                   tokenizer.all_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        """The units spelling `text`, the word delimiter between words."""
        encoding = self._model.encode(text)
        units, previous_word = [], None
        for piece, word in zip(encoding.tokens, encoding.word_ids):
            if previous_word is not None and word != previous_word:
                units.append(self.delimiter)
            units.append(piece_spelling(piece))
            previous_word = word
        return units

    def encode(self, text: str) -> list[int]:
        """The label ids of `text` (a normalised transcript)."""
        return [self.vocab.get(unit, self.unk_id) for unit in self.tokenize(text)]

    def units_of(self, piece: str) -> list[int]:
        """The ids of the units spelling one teacher piece (its `"##"` dropped): the acoustic anchor's columns
        (`modeling_uot_ctc.data.token_characters`). A piece that is itself a unit gives that one id; one the units
        cannot spell (`[UNK]`, a character outside the vocabulary) gives the ids of the characters it has in the
        vocabulary, as a character vocabulary would, never the unknown unit, which no label holds."""
        spelling = piece_spelling(piece)
        if spelling not in self._units_of:
            ids = [i for i in self.encode(spelling) if i != self.delimiter_id]
            if self.unk_id in ids:
                ids = [self.vocab[c] for c in spelling if c in self.vocab and self.vocab[c] != self.unk_id]
            self._units_of[spelling] = ids
        return self._units_of[spelling]


def is_word_piece_vocabulary(tokenizer) -> bool:
    """Whether a CTC tokenizer's vocabulary has units longer than one character besides its special tokens: such
    a vocabulary needs `WordPieceUnits` to encode text (the stock tokenizer would lose the word boundaries)."""
    special = set(tokenizer.all_special_tokens) | {str(tokenizer.word_delimiter_token)}
    return any(len(unit) > 1 for unit in tokenizer.get_vocab() if unit not in special)


def anchor_units(tokenizer):
    """What `modeling_uot_ctc.data.token_characters` needs to read a CTC tokenizer's units for each teacher piece:
    `WordPieceUnits.units_of` for a word-piece vocabulary, None (a piece's characters) for a character one."""
    return WordPieceUnits.from_tokenizer(tokenizer).units_of if is_word_piece_vocabulary(tokenizer) else None

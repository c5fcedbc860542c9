"""Tokenizers built locally (no hub): a byte-level CLIP BPE and a character-level T5 Unigram.

Every byte of a prompt maps to a token, so any prompt encodes; vocabularies are small enough for
the tiny text encoders' embedding tables.
"""
from __future__ import annotations

import string

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, LlamaTokenizerFast, T5TokenizerFast

CLIP_VOCAB_SIZE = 514  # 256 byte symbols, each also as a word end, plus start and end of text
T5_VOCAB_SIZE = 3 + 2 * len(string.printable)
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<unk>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map of the 256 byte values onto printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clip_tokenizer() -> CLIPTokenizer:
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    # no merges: every word splits into its bytes, the last one marked as the word's end
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def _character_unigram(specials: list[tuple[str, float]], unk_id: int, words: tuple[str, ...] = ()) -> Tokenizer:
    """A Unigram model over printable characters (and whole `words`, preferred where they occur)."""
    pieces = specials + [(c, -2.0) for c in string.printable] + [("▁" + c, -1.0) for c in string.printable]
    pieces += [("▁" + w, -0.5) for w in dict.fromkeys(words) if len(w) > 1]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return tokenizer


def t5_tokenizer() -> T5TokenizerFast:
    # Built from its vocabulary, as from_pretrained rebuilds it: a backend of our own would lose its
    # pre-tokenizer on reload and split whitespace differently.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -2.0) for c in string.printable] + [("▁" + c, -1.0) for c in string.printable]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def llama_tokenizer(template_words: str = "", vocab_size_limit: int = 1024) -> LlamaTokenizerFast:
    """A Llama-style tokenizer whose vocabulary also holds the words of `template_words` whole, so a
    pipeline's prompt template tokenizes to about as many tokens as with the real vocabulary."""
    words = tuple(w for w in template_words.split() if w.isascii())[: vocab_size_limit - 250]
    tokenizer = _character_unigram([(t, 0.0) for t in LLAMA_SPECIALS], unk_id=LLAMA_SPECIALS.index("<unk>"), words=words)
    tokenizer.add_special_tokens(LLAMA_SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)])
    return LlamaTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                              pad_token="<pad>", unk_token="<unk>", model_max_length=512)

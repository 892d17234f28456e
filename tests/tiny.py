"""Real tiny transformers built from a config, with tokenizers trained on the fly.

Nothing here is a mock: these are ordinary Hugging Face model directories (config.json,
model.safetensors, tokenizer.json) that every loader in the project reads the normal way.
They build in well under a second, so every test tier can afford its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a an is are was were be been have has had do does did can could will would should may might "
    "what why how when where who which help please thanks sorry yes no maybe sure okay good bad great "
    "human assistant answer question tell me about you your i my we they it this that there here "
    "cook bake recipe food water coffee tea dog cat bird fish car bike train city country music song "
    "book movie game sport football weather rain sun snow cold hot day night week year time money "
    "work job school teacher doctor lawyer police therapist friend family mother father child kill "
    "steal hurt weapon drug illegal dangerous safe kind polite rude hate love idea plan list first "
    "second third step steps because so but and or not never always often one two three four five"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus() -> list[str]:
    lines = [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 6)]
    lines += [f"\n\nHuman: {a}\n\nAssistant: {b}" for a, b in zip(lines, reversed(lines))]
    lines += ["Human: Assistant: ? ! . , ' \" : ; ( ) - 0 1 2 3 4 5 6 7 8 9"]
    return lines


def bert_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    # The vocabulary is written out, not trained: the WordPiece trainer breaks frequency ties in hash order, so
    # a trained vocabulary (and every model and test figure built on it) changed from one process to the next.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for line in corpus() for c in line.lower() if not c.isspace()})
    words = sorted({w for w in WORDS if len(w) > 1})
    vocab = list(dict.fromkeys(specials + chars + [f"##{c}" for c in chars] + words))[:vocab_size]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
    )


def gpt2_tokenizer(vocab_size: int = 400, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<|endoftext|>", model_max_length=128,
    )
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def make_tiny_bert(path: Path, seed: int = 0, max_position: int = 128) -> Path:
    """A 2-layer BERT sequence classifier with one label, saved with its tokenizer."""
    torch.manual_seed(seed)
    tok = bert_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_position, num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    model = BertForSequenceClassification(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_gpt2(path: Path, seed: int = 0, chat_template: str | None = None, lm: bool = False) -> Path:
    """A 2-layer GPT-2: a one-label reward model (pad token distinct from EOS) or a causal LM."""
    torch.manual_seed(seed)
    tok = gpt2_tokenizer(chat_template=chat_template)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, num_labels=1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    model = (GPT2LMHeadModel(cfg) if lm else GPT2ForSequenceClassification(cfg)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

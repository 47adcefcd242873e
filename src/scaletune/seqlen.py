"""The data.max_length a run really uses: the configured value, lowered to what the tokenizer accepts and
to the model's position table.

Shared by training (model.load_tokenizer, before anything is tokenised) and `scaletune plan`, so the
plan estimates the sequence length training will use.
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig
from .errors import ConfigError
from .rope import factor as rope_factor
from .rope import scaled_rope_parameters, stretched_length

# Config keys of rotary positions (or, for Falcon, ALiBi): computed for any position, so
# max_position_embeddings is the length the model was trained on, not a table that longer input overruns.
_COMPUTED_POSITION_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct",
                           "rotary_emb_base", "partial_rotary_factor", "alibi")
# RoBERTa's scheme: position ids start after the padding index, so pad_token_id + 1 of the
# max_position_embeddings rows never hold a token (roberta-base: 514 rows, 512 tokens).
_PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                         "data2vec-text", "longformer", "ibert", "mpnet", "luke", "xmod", "esm"}


def read_model_config(cfg: RunConfig, **overrides: Any) -> Any:
    """The model's transformers config (config.json only, no weights), with `overrides` of its attributes (a
    task's num_labels, label maps) and model.rope_scaling applied; unreadable -> ConfigError (a model that
    cannot take model.rope_scaling too)."""
    from transformers import AutoConfig

    from .hub import check_model_source, hub_kwargs, trust_remote_code, unreachable_hint

    name = cfg.model.name_or_path
    check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code(cfg, name),
                                            revision=cfg.model.revision, **overrides, **hub_kwargs(name))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name_or_path: cannot read the model config of {name!r} "
                          f"({str(exc).splitlines()[0]}){unreachable_hint(name)}") from None
    if cfg.model.rope_scaling is not None:
        config.rope_parameters = scaled_rope_parameters(config, cfg.model.rope_scaling, name)
    return config


def _computed_positions(config: Any) -> bool:
    kind = getattr(config, "position_embedding_type", None)
    if kind in ("absolute", "rotary"):  # stated outright (ESM: absolute, though its config has a rope_theta)
        return kind == "rotary"
    if any(getattr(config, key, None) not in (None, False) for key in _COMPUTED_POSITION_KEYS):
        return True
    # DeBERTa-v3: relative attention only, no absolute position table added to the input
    return getattr(config, "position_biased_input", True) is False


def position_limit(config: Any) -> tuple[int | None, bool]:
    """(tokens the model's positions cover, whether longer input fails) from its config.

    Learned position tables (BERT, RoBERTa, GPT-2, OPT, ...) fail past their size with a shape or index
    error; rotary models (Llama, Mistral, Qwen, ...) run past max_position_embeddings, which is then
    only the length they were trained on. (None, False) when the config states no limit (T5, BLOOM).
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(c, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None, False
    if _computed_positions(c):
        return n, False
    if getattr(c, "model_type", None) in _PADDING_OFFSET_TYPES and isinstance(getattr(c, "pad_token_id", None), int):
        n -= c.pad_token_id + 1
    return n, True


def effective_max_length(cfg: RunConfig, tokenizer: Any | None, config: Any | None,
                         tokenizer_source: str | None = None) -> tuple[int, list[str]]:
    """(data.max_length training uses, warnings saying why it differs or what it risks).

    Lowered to the tokenizer's model_max_length (where it states one: many say 1e30, "no limit") and to
    a learned position table's size; above a rotary model's max_position_embeddings it is kept, with a
    warning. `tokenizer` and `config` may be None (plan on a config.json-only directory has no tokenizer).
    """
    length, notes = cfg.data.max_length, []
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < length:
        notes.append(f"data.max_length={length} is above what {tokenizer_source or cfg.model.name_or_path} "
                     f"accepts; using its limit {limit}")
        length = limit
    positions, hard = position_limit(config) if config is not None else (None, False)
    if positions is not None and positions < length and hard:
        # indexing past a learned table crashes on the first long example ("expanded size ... must match")
        notes.append(f"data.max_length={length} is above the {positions} positions of {cfg.model.name_or_path} "
                     f"(a learned position table: max_position_embeddings); using {positions}")
        length = positions
    elif positions is not None and (covered := stretched_length(config, positions)) < length:
        notes.append(_beyond_rotary(cfg, length, positions, covered))
    return length, notes


def _beyond_rotary(cfg: RunConfig, length: int, positions: int, covered: int) -> str:
    """The warning for a max_length past the `covered` positions of a rotary model (`positions`: its
    max_position_embeddings), scaled by model.rope_scaling or not."""
    f = rope_factor(cfg)
    if f > 1:
        return (f"data.max_length={length} is above the {covered} positions model.rope_scaling stretches "
                f"{cfg.model.name_or_path} to (factor {f:g} x the length it was pretrained on); kept, but "
                "positions past that are extrapolated; raise model.rope_scaling's factor")
    return (f"data.max_length={length} is above the {positions} positions {cfg.model.name_or_path} was trained on "
            "(max_position_embeddings); kept, since rotary positions have no table to overrun, but the model has "
            "not seen longer sequences (model.rope_scaling: {type: linear, factor: F} stretches them)")

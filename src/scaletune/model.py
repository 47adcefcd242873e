"""Base model (dtype, 4/8-bit via bitsandbytes) + tokenizer + the peft adapter named in the config."""

from __future__ import annotations

import difflib
import json
import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import CAUSAL_TASKS, RunConfig
from .errors import ConfigError, UserError
from .hub import check_model_source, hub_kwargs, trust_remote_code, unreachable_hint
from .peft_options import peft_config

log = logging.getLogger("scaletune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# train.mixed_precision -> the dtype it computes in ("no": none, the weights' own)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def read_tokenizer(cfg: RunConfig, src: str) -> Any:
    """The tokenizer saved at `src` (a model directory, hub id or adapter directory); unreadable -> ConfigError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code(cfg, src),
                                             revision=cfg.model.revision, **hub_kwargs(src))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # Key/TypeError: a damaged tokenizer.json
        raise ConfigError(f"model.name_or_path: cannot load a tokenizer from {src!r} "
                          f"({str(exc).splitlines()[0]}){unreachable_hint(src)}") from None


def load_tokenizer(cfg: RunConfig, path: str | None = None) -> Any:
    """The model's tokenizer (or the one saved at `path`), with a pad token; lowers `cfg.data.max_length`
    to the tokenizer's `model_max_length` and to the model's learned position table where those are
    smaller (seqlen.effective_max_length, which `plan` applies too)."""
    from .seqlen import effective_max_length, read_model_config

    check_model_source(cfg.model.name_or_path)  # (with `path` too: the model's config is read below)
    if path is None and cfg.model.revision is not None and Path(cfg.model.name_or_path).exists():
        # transformers ignores a revision for a local directory (eval/predict of a hub model's run pointed at
        # a local snapshot pass `path`: no error there)
        raise ConfigError(f"model.revision: {cfg.model.revision!r} names a version of a hub model, but "
                          f"model.name_or_path {cfg.model.name_or_path} is a local directory (one version); drop "
                          "model.revision")
    src = path or cfg.model.name_or_path
    tok = read_tokenizer(cfg, src)
    if path is None and cfg.data.chat_template is not None:  # (an adapter's tokenizer holds the one it trained with)
        from .data.templates import chat_template_text

        tok.chat_template = chat_template_text(cfg.data.chat_template)
    if path is None and cfg.model.new_special_tokens:  # (an adapter's tokenizer has them: new_tokens.restore)
        from .new_tokens import add_to_tokenizer

        add_to_tokenizer(tok, cfg.model.new_special_tokens)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do.
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:  # (else every batch failed in the collator with a TypeError traceback)
        raise ConfigError(f"model.name_or_path: the tokenizer of {src} has no pad, eos or unk token, so batches "
                          "cannot be padded", hint="give it a pad token and save it (tok.pad_token = ...; "
                          "tok.save_pretrained(DIR)), then point model.name_or_path at DIR")
    # Models with learned positions (BERT family: 512) index past their table and crash with a shape
    # error on the first long example, so truncate there, before anything is tokenised.
    length, notes = effective_max_length(cfg, tok, read_model_config(cfg), src)
    for note in notes:
        log.warning("%s", note)
    cfg.data.max_length = length
    return tok


def quantization_config(cfg: RunConfig) -> Any:
    """transformers' BitsAndBytesConfig for `model.quantization` (None without); ConfigError without
    bitsandbytes."""
    if not cfg.model.quantization:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("model.quantization needs bitsandbytes: pip install bitsandbytes") from None
    dtype = DTYPES[cfg.model.dtype]
    # The classification head is new and trained whole (modules_to_save), so it stays unquantized.
    # transformers' default keeps only the module of the model's last parameter: a BERT head ends in
    # `classifier.bias`, which names no module, and its quantized head crashed the first step. Naming
    # modules replaces that default, so it is done only for the cls tasks (causal_lm keeps lm_head so).
    skip = None if cfg.task in CAUSAL_TASKS else ["classifier", "pre_classifier", "score"]
    if cfg.model.quantization == "4bit":
        # quant_storage = compute dtype lets ZeRO-3 shard the packed weights like ordinary params.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _damaged_checkpoint(exc: BaseException) -> bool:
    """Whether loading failed because the model's files are broken: a truncated safetensors
    (SafetensorError) or weights that do not match config.json (RuntimeError "size mismatch") -- not a
    bug or a resource limit such as running out of memory."""
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError) and ("size mismatch" in text or "ignore_mismatched_sizes" in text))


def load_model(cfg: RunConfig, task: Any, labels: list[str] | None, tokenizer: Any,
               total_steps: int | None = None, adapter_path: str | None = None, resuming: bool = False) -> Any:
    """Frozen base + trainable adapter (new, or loaded from `adapter_path`), trainables in `trainable_dtype`.
    `resuming`: a checkpoint's weights replace the new adapter's (and new head's) once loaded."""
    import peft

    from . import adapters  # noqa: F401  (scaletune's own methods must be registered to load them)

    check_model_source(cfg.model.name_or_path)
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.model.dtype],
                              "trust_remote_code": trust_remote_code(cfg, cfg.model.name_or_path),
                              "revision": cfg.model.revision, **task.model_kwargs(labels)}
    if cfg.model.attn_implementation == "varlen":
        from .attention import register

        kwargs["attn_implementation"] = register()
    elif cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.rope_scaling is not None:
        from .seqlen import read_model_config

        # (the model builds its rotary embedding from these at construction: set on the loaded config after, too late)
        kwargs["rope_parameters"] = read_model_config(cfg).rope_parameters
    qconf = quantization_config(cfg)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    if offline := hub_kwargs(cfg.model.name_or_path):
        # transformers' probe for an adapter repo under the model's name does not take local_files_only
        kwargs.update(offline, adapter_kwargs=offline)
    try:
        with _quiet_load_report():
            model, info = task.auto_model_class().from_pretrained(cfg.model.name_or_path, output_loading_info=True,
                                                                  **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name_or_path: cannot load {cfg.model.name_or_path!r} "
                          f"({str(exc).splitlines()[0]}){unreachable_hint(cfg.model.name_or_path)}") from None
    except Exception as exc:  # noqa: BLE001
        if not _damaged_checkpoint(exc):
            raise
        raise ConfigError(f"model.name_or_path: {cfg.model.name_or_path!r} looks damaged "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None
    _report_loading(cfg, info, new_head=adapter_path is None, resuming=resuming)
    pad = tokenizer.pad_token_id
    if pad is not None and model.config.pad_token_id != pad and (
            model.config.pad_token_id is None or task.peft_task_type == "SEQ_CLS"):
        # a decoder's sequence head reads each row at its last token that is not config.pad_token_id: another
        # id than the one rows are padded with read a shorter row's score at its padding (a config's pad 0 with
        # the tokenizer padding with eos), and a merged model would score otherwise than training did
        if model.config.pad_token_id is not None:
            log.info("model: config.pad_token_id %s is not the tokenizer's pad token %r (id %d), which pads the "
                     "rows: the model config takes the tokenizer's", model.config.pad_token_id, tokenizer.pad_token, pad)
        model.config.pad_token_id = pad
    from .new_tokens import fit_embeddings

    new_ids = fit_embeddings(model, tokenizer)  # (before peft wraps the tables; eval's adapter needs the rows)
    if qconf is not None:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter_path is not None:
        # the forward training used (whether the adapter is plain LoRA, its own config says)
        model = _load_adapter(model, adapter_path, fused=fused_lora_applies(cfg, method="lora"))
        if inference_precision(cfg) != "no":  # (without autocast a float32 copy would meet 16-bit inputs)
            model = _saved_copies_in_float32(model, adapter_path)
    else:
        model = apply_adapter(model, cfg, task, total_steps, new_ids)
        if cfg.model.init_adapter is not None and not resuming:  # (a checkpoint's weights replace them anyway)
            from .init_adapter import load_initial

            load_initial(model, cfg, labels)
        if cfg.train.neftune_noise_alpha:
            add_embedding_noise(model, cfg.train.neftune_noise_alpha)
    why_not = prefix_forward_problem(model)
    if why_not:
        raise ConfigError(f"peft.method={cfg.peft_method} with task {cfg.task}: {why_not}")
    return cast_trainables(model, trainable_dtype(cfg))


def embedding_rows(model: Any, tokenizer: Any) -> int | None:
    """The model's embedding rows where the tokenizer has more tokens than that (ids past them would fail the
    lookup with torch's IndexError); None otherwise, or for a model without a lookup table."""
    rows = getattr(getattr(model, "get_input_embeddings", lambda: None)(), "num_embeddings", None)
    # (the common case: a vocabulary padded up to a round number of rows)
    return rows if rows is not None and len(tokenizer) > rows else None


def beyond_embeddings(tokenizer: Any, rows: int, ids: Any = None) -> list[str]:
    """The tokenizer's added tokens (of `ids` only, if given) whose ids the model has no embedding row for,
    as "'<tok>' (id)"."""
    return [f"{t!r} ({i})" for t, i in sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])
            if i >= rows and (ids is None or i in ids)]


def check_vocabulary(model: Any, tokenizer: Any, datasets: dict, eval_key: str = "data.eval") -> None:
    """Refuse token ids the model has no embedding row for: tokens added to a tokenizer (a chat format's
    markers, say) without resizing the model's embeddings. They failed at the first step with an
    IndexError deep in torch."""
    rows = embedding_rows(model, tokenizer)
    if rows is None:
        return
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= rows:  # (batches are padded with it: a [PAD] added to a Llama tokenizer)
        raise ConfigError(f"model: the tokenizer's pad token {tokenizer.pad_token!r} is id {pad}, but the model has "
                          f"embeddings for ids below {rows} only (its tokenizer has {len(tokenizer)} tokens)",
                          hint="resize the model's embeddings to the tokenizer (model.resize_token_embeddings("
                               "len(tokenizer)), then save_pretrained with its tokenizer), or use a pad token the "
                               "model has (e.g. the eos token)")
    import pyarrow.compute as pc

    for split in ("train", "eval"):
        ds = datasets.get(split)
        top = pc.max(pc.list_flatten(ds.data.column("input_ids"))).as_py() if ds is not None and len(ds) else None
        if top is None or top < rows:
            continue
        added = beyond_embeddings(tokenizer, rows)
        raise ConfigError(
            f"{'data.train' if split == 'train' else eval_key}: the examples hold token ids up to {top}, but the "
            f"model has embeddings for ids below "
            f"{rows} only (its tokenizer has {len(tokenizer)} tokens"
            + (f"; added beyond the model's: {', '.join(added[:8])}{' ...' if len(added) > 8 else ''})" if added
               else ")"),
            hint="tokens added to a tokenizer need new embedding rows: resize the model once "
                 "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained with its tokenizer) and "
                 "train the new rows with peft.modules_to_save (e.g. [embed_tokens, lm_head]); or list the tokens "
                 "in model.new_special_tokens, which resizes and trains them; or use the tokenizer without the "
                 "added tokens")


def _load_adapter(model: Any, adapter_path: str, fused: bool = False) -> Any:
    """The trained adapter on `model`; a damaged file (a copy cut short, a disk that filled while saving) is
    one error naming it, not safetensors' traceback. `fused`: a LoRA adapter gets the forward training
    used (train.fused_lora), so eval and predict compute what training's evals did (in bf16 peft's own
    forward rounds differently: an eval accuracy 2.5 points off the logged one was seen)."""
    import peft
    from safetensors import SafetensorError

    weights = [Path(adapter_path) / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    if not any(w.is_file() for w in weights):  # (peft would look for it on the hub next)
        raise UserError(f"the adapter at {adapter_path} has no weights (adapter_model.safetensors)",
                        hint="point --adapter at a complete adapter directory, or a checkpoint's: "
                             "--adapter OUTPUT_DIR/checkpoints/step-N")
    try:
        config, conf_file = None, Path(adapter_path) / "adapter_config.json"
        if fused and conf_file.is_file() and json.loads(conf_file.read_text(encoding="utf-8")).get("peft_type") == "LORA":
            from .adapters.lora_addmm import use_addmm_lora

            config = peft.LoraConfig.from_pretrained(adapter_path)
            use_addmm_lora(config)
        with warnings.catch_warnings():
            # AdaLoRA's saved rank_pattern is keyed by its lora_E parameters (peft's adalora/layer.py), and
            # peft 0.21's check of pattern keys against module names prints the whole pattern as "ignored"
            warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
            return peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=False, config=config)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        # name the file at fault: a weights error is the weights', a text error adapter_config.json's
        text = isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError))
        files = sorted(p.name for p in Path(adapter_path).glob("adapter_*") if (p.suffix == ".json") == text)
        raise UserError(f"the adapter at {adapter_path} is damaged ({', '.join(files) or 'its files'}: "
                        f"{str(exc).strip().splitlines()[0]})",
                        hint="use another copy of it, or a checkpoint's: --adapter OUTPUT_DIR/checkpoints/step-N "
                             "(`train --resume auto` checks a checkpoint's files against its manifest)") from None
    except pickle.UnpicklingError as exc:
        # an adapter_model.bin is a pickle, read (by peft) with torch's weights-only unpickler: one that holds more
        # than tensors (code to run, say) is refused unread, or it is damaged
        why = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise UserError(f"the adapter at {adapter_path}: its adapter_model.bin is not plain tensors ({why[:200]}); "
                        "it was not loaded (a pickle that holds more than tensors could run code)",
                        hint="use the adapter as safetensors (adapter_model.safetensors: what scaletune and peft "
                             "write), or another copy of it") from None
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, (torch.OutOfMemoryError, NotImplementedError)):
            raise  # the machine's or the program's, not the adapter's
        # shapes that do not match (another base model's adapter), modules the base lacks, a config that is
        # not peft's (or a newer peft's)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        other_base = "size mismatch" in str(exc) or "Target modules" in str(exc) or "NoMatching" in type(exc).__name__
        record = "its scaletune.json says which: base_model" if (Path(adapter_path) / "scaletune.json").is_file() \
            else "its adapter_config.json names it: base_model_name_or_path"
        raise UserError(f"the adapter at {adapter_path} cannot be loaded onto {model.name_or_path}: "
                        f"{type(exc).__name__}: {first}",
                        hint=f"load it onto the base model it was trained on ({record}), with that run's config"
                        if other_base else
                             "its adapter_config.json is not one this peft reads: written by another (newer?) "
                             f"peft version (this is {peft.__version__}), or damaged") from None


def inference_precision(cfg: RunConfig) -> str:
    """The autocast of `eval` and `predict`: the run's train.mixed_precision, except fp16 off a GPU (float32)."""
    return cfg.train.mixed_precision if cfg.train.mixed_precision != "fp16" or torch.cuda.is_available() else "no"


def _saved_copies_in_float32(model: Any, adapter_path: str) -> Any:
    """`model` with its modules_to_save copies (a task head, a norm) in float32, holding the float32 values
    training saved, as training had them (`cast_trainables`): loaded for inference they are not
    trainable, so they took the base's 16-bit dtype, and a norm or an embedding (which autocast leaves in
    their own dtype) then computed otherwise than in training's evals."""
    import peft
    from peft.utils import ModulesToSaveWrapper

    copies = [saved for m in model.modules() if isinstance(m, ModulesToSaveWrapper)
              for saved in m.modules_to_save.values()]
    if not any(p.is_floating_point() and p.dtype != torch.float32 for c in copies for p in c.parameters()):
        return model
    for saved in copies:
        for module in saved.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Embedding) and weight is not None and weight.dtype != torch.float32:
                keep_output_dtype(module, weight.dtype)  # (as cast_trainables does in training)
        saved.float()
    peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(adapter_path))  # (again, into float32)
    return model


def add_embedding_noise(model: Any, alpha: float) -> None:
    """NEFTune (Jain et al. 2023): uniform noise on the input embeddings of training forwards, scaled by
    alpha / sqrt(width x hidden) of the batch's embedding output. A forward hook, so eval and the adapter
    saved are untouched; it draws from torch's generator, which the loop seeds per step."""
    embeddings = model.get_input_embeddings()

    def noisy(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    embeddings.register_forward_hook(noisy)


HEAD_MODULES = ("classifier", "score", "pre_classifier")  # the task heads seq_cls/token_cls add to a base model


class _quiet_load_report:
    """transformers logs a table of every weight the checkpoint lacks as a warning, which for a base model
    loaded under a new classification head lists the head on every run (and on every eval and predict,
    where the adapter brings it). `_report_loading` says what matters in a line instead. (A filter, not a
    level: transformers runs extra checks when its logger is set above WARNING.)"""

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    def __enter__(self) -> None:
        logging.getLogger("transformers.modeling_utils").addFilter(self.filter)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("transformers.modeling_utils").removeFilter(self.filter)


def _report_loading(cfg: RunConfig, info: dict, *, new_head: bool, resuming: bool = False) -> None:
    """One line for the new head (when training starts it from random), a warning for anything else the
    checkpoint lacks or has in excess: weights that start random without being trained are a real problem."""
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if k.split(".")[0] in HEAD_MODULES]
    other = [k for k in missing if k not in head]
    if head and new_head:
        log.info("new task head (%s) %s and trains in full", ", ".join(head),
                 "comes from the checkpoint resumed" if resuming else
                 f"comes from {cfg.model.init_adapter}" if cfg.model.init_adapter else "starts from random weights")
    unexpected = sorted(info.get("unexpected_keys") or ())
    # Weights left unused are the checkpoint's own heads (BERT's pooler under a token classifier): expected
    # when the task differs from pretraining, so a note, not a warning at every load; pretraining's pooler and
    # MLM/NSP heads (pooler.*, cls.*) are always left so by a task head, not worth a line at every predict.
    pretraining_heads = all("pooler" in k.split(".") or k.startswith("cls.") for k in unexpected)
    for level, keys, what in ((logging.WARNING, other, "are not in the checkpoint and start from random weights"),
                              (logging.DEBUG if pretraining_heads else logging.INFO, unexpected,
                               "in the checkpoint are not used by this model class")):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            log.log(level, "model.name_or_path %s: %d weight(s) %s: %s%s", cfg.model.name_or_path, len(keys), what,
                    ", ".join(keys[:5]), more)


def prefix_forward_problem(model: Any) -> str | None:
    """Why peft's prefix tuning cannot run this classifier's forward, or None if it can.

    peft hands its virtual key/values over as `past_key_values`: to the classifier if its forward
    names that parameter, else to the backbone, and raises on the first forward if neither does.
    transformers 5.24 renamed the parameter `cache` on encoder models (BERT family), so that
    combination would fail at step 1, after data and model loaded. This is peft's own test, asked once."""
    import inspect

    from peft import PeftModelForSequenceClassification, PeftModelForTokenClassification

    # (peft's causal-LM forward passes them on without this test; transformers still maps the old name)
    if not isinstance(model, (PeftModelForSequenceClassification, PeftModelForTokenClassification)):
        return None
    pconf = model.active_peft_config
    backbone_name = getattr(model, "transformer_backbone_name", None)
    if str(getattr(pconf.peft_type, "value", pconf.peft_type)) != "PREFIX_TUNING" or backbone_name is None:
        return None
    base = model.base_model
    for module in (base, base.get_submodule(backbone_name)):
        if "past_key_values" in inspect.signature(module.forward).parameters:
            return None
    import peft
    import transformers

    return (f"peft {peft.__version__} passes the virtual key/values as `past_key_values`, which "
            f"{type(base).__name__}.forward no longer accepts under transformers {transformers.__version__} "
            "(it is called `cache` since 5.24); use peft.method prompt_tuning, lora or ia3, or transformers<5.24")


def apply_adapter(model: Any, cfg: RunConfig, task: Any, total_steps: int | None,
                  new_ids: list[int] | None = None) -> Any:
    """Wrap `model` with the run's new peft adapter (also used on the meta device by `plan`); `new_ids`: the
    embedding rows of model.new_special_tokens, trained as peft's trainable tokens."""
    import peft

    from .methods import name_ia3_feedforward_in_full
    from .new_tokens import set_token_indices, token_indices

    pconf = peft_config(cfg, task.peft_task_type, total_steps)
    set_token_indices(pconf, token_indices(model, new_ids or [], cfg.peft.get("modules_to_save")),
                      cfg.peft_method)
    if fused_lora_applies(cfg):
        from .adapters.lora_addmm import use_addmm_lora

        if not use_addmm_lora(pconf):
            log.info("train.fused_lora: this peft has no custom-module mapping; using peft's LoRA forward")
    wanted = list(cfg.peft.get("modules_to_save") or [])  # the user's own; peft adds the task's head itself
    names = [name for name, _ in model.named_modules() if name]
    arch = type(model).__name__
    try:
        model = peft.get_peft_model(model, pconf)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        targets = cfg.peft.get("target_modules")
        # (LLaMA-Factory's lora_target: q_proj carried over: peft matches a string whole against the full name)
        hint = (f"; a string is one regular expression matched against whole module names, for the modules "
                f"named {targets} write a list: [{targets}]" if isinstance(targets, str)
                and any(n.rsplit(".", 1)[-1] == targets for n in names) else "")
        raise UserError(f"peft.method={cfg.peft_method}: cannot apply to {arch} "
                        f"({str(exc).splitlines()[0]}){hint}") from None
    check_modules_to_save(model, wanted, names, arch)
    name_ia3_feedforward_in_full(model)
    for name, p in model.named_parameters():
        if "ranknum" in name.split("."):  # AdaLoRA's fixed divisor: peft 0.21 makes it trainable on a 16-bit base
            p.requires_grad_(False)
    return model


def check_modules_to_save(model: Any, wanted: list[str], names: list[str], arch: str) -> None:
    """peft silently skips a `peft.modules_to_save` entry that matches no module, and the run then trains nothing
    for it. Raise naming each such entry and the closest of the base model's module `names`."""
    if not wanted:
        return
    from peft.utils import ModulesToSaveWrapper

    wrapped = [name for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    # peft's rule: an entry matches every module whose full name ends with it; the match is wrapped (for a weight
    # tied to another module, a wrapper may sit one level up, so a name inside a wrapper counts as well)
    inside = [name for name, _ in model.named_modules(remove_duplicate=False)
              if any(name == w or name.startswith(w + ".") for w in wrapped)]
    problems = []
    for entry in wanted:
        if any(name.endswith(entry) for name in inside):
            continue
        candidates = sorted({n.rpartition(".")[2] for n in names if not n.rpartition(".")[2].isdigit()} | set(names))
        close = difflib.get_close_matches(entry, candidates, n=3, cutoff=0.5)
        if close:
            hint = f"close names: {', '.join(close)}"
        else:
            hint = f"its top-level modules: {', '.join(n for n in names if '.' not in n)}"
        problems.append(f"peft.modules_to_save: {entry!r} matches no module of {arch}, so nothing would be trained "
                        f"for it ({hint})")
    if problems:
        raise ConfigError(problems)


def fused_lora_applies(cfg: RunConfig, method: str | None = None) -> bool:
    """Whether `train.fused_lora` takes effect: plain peft LoRA (variants such as DoRA fall back to peft's
    forward layer by layer), a base bitsandbytes does not quantize, and no ZeRO-3 partitioning. `method`:
    the adapter's, where it is not the config's peft.method (an adapter loaded by eval/predict)."""
    return (cfg.train.fused_lora and (method or cfg.peft_method).lower() == "lora" and not cfg.model.quantization
            and cfg.distributed.zero_stage != 3)


def trainable_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype trainable parameters are held in on the model: float32, as Adam on bf16/fp16 weights
    loses small updates. Under ZeRO-3 with bf16/fp16, the compute dtype: DeepSpeed runs the model in it
    without autocast and keeps float32 masters for the optimizer itself (ZeRO-1/2 cast every parameter to
    it when they start); a float32 module copy (modules_to_save: a norm, a classification head) there
    handed float32 to the next bf16 matmul, which failed."""
    if cfg.distributed.zero_stage == 3 and cfg.train.mixed_precision in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[cfg.train.mixed_precision]
    return torch.float32


def cast_trainables(model: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Every trainable parameter in `dtype` (see trainable_dtype)."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != dtype]
        if own and isinstance(module, torch.nn.Embedding) and dtype == torch.float32:
            keep_output_dtype(module, own[0].dtype)
        for p in own:
            p.data = p.data.to(dtype)
    return model


def keep_output_dtype(embedding: torch.nn.Embedding, dtype: torch.dtype) -> None:
    """An embedding table kept in float32 (trained: modules_to_save) still hands the model the 16-bit
    vectors it was built for: a lookup is not autocast, and BERT's embedding LayerNorm (16-bit weights)
    failed on float32 input ("mixed dtype (CPU)")."""
    embedding.register_forward_hook(lambda module, args, output: output.to(dtype))


def compile_blocks(model: Any) -> int:
    """`train.torch_compile`: compile each repeated block (the classes transformers lists in
    `_no_split_modules`, e.g. LlamaDecoderLayer, adapters inside) in place. One compiled graph is reused
    by every layer, so compile time does not grow with depth; mask building, the loss and peft's
    wrappers stay eager (the chunked loss's decoder hook keeps working). Returns the blocks compiled."""
    from .trainable_state import unwrap

    inner = unwrap(None, model)  # under DDP after accelerator.prepare
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile()
    return len(blocks)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters, each at its full size: a ZeRO-3 parameter partitioned at load holds
    no elements here and a 4-bit one packs several per element, so `numel()` undercounts both (peft's
    count knows; the MFU's FLOPs are made of these)."""
    from .trainable_state import unwrap

    inner = unwrap(None, model)
    if hasattr(inner, "get_nb_trainable_parameters"):
        return inner.get_nb_trainable_parameters()
    sizes = [(p.requires_grad, getattr(p, "ds_numel", None) or p.numel()) for p in inner.parameters()]
    return sum(n for grad, n in sizes if grad), sum(n for _, n in sizes)

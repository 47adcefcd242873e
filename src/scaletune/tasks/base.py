"""What every task provides, and the registry that maps `task:` names to them.

A task knows how to turn records into token ids + labels, how to batch them, how to compute the
*summed* loss of a batch with the number of target items it covers (the loop normalises over the
whole optimizer step, not per micro-batch), and how to score predictions.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F

from ..data.readers import WHERE, fields_of
from ..errors import DataError

IGNORE = -100
TRUNCATED = "truncated"  # key of `encode`'s result: data.max_length cut the example (counted, not stored)
# key of `encode`'s result: a whole answer ends in no special token, so a model trained on it never learns
# to stop (a chat template that closes no assistant turn, a tokenizer without eos_token; counted, not stored)
UNSTOPPED = "unstopped"
# key of `encode`'s result: the example is longer than data.max_length and data.too_long dropped it (the result
# holds nothing else) or split it (on the first of its pieces); counted, not stored
TOO_LONG = "too_long"
TASKS: dict[str, type[Task]] = {}


def register(name: str):
    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> Task:
    return TASKS[name]()


class Task:
    name: str = ""
    peft_task_type: str = ""
    eval_only_columns: tuple[str, ...] = ()  # keys of `encode` that only scoring reads: not kept for training

    # --- model ---
    def auto_model_class(self) -> Any:
        raise NotImplementedError

    def model_kwargs(self, labels: list[str] | None) -> dict:
        """Extra from_pretrained kwargs (e.g. num_labels and label maps for classification)."""
        if not labels:
            return {}
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def configure(self, cfg: Any) -> None:
        """Take the run settings the loss reads (not the data's: a cached dataset skips `setup`)."""

    # --- data ---
    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        """Inspect the training records once (format, label set); returns the label names if any."""
        return None

    def check_eval(self, records: list[dict], cfg: Any, source: str) -> None:
        """Refuse eval records `setup` (made from the training records) cannot encode; a DataError."""

    def ignored_fields(self, records: list[dict], key: str) -> str | None:
        """A warning naming the record fields `encode` does not read, to log once per dataset (after `setup`)."""
        return None

    def cache_meta(self) -> dict:
        """What `setup` learned (columns, format), so a cached dataset can skip reading records."""
        # Private attributes are runtime state (e.g. the model's head), not something a cache can hold.
        return {"task_state": {k: getattr(v, "name", v) for k, v in vars(self).items() if not k.startswith("_")}}

    def setup_cached(self, meta: dict) -> None:
        from ..data.formats import FORMATS

        for k, v in meta.get("task_state", {}).items():
            setattr(self, k, FORMATS[v] if k == "format" else v)

    def examples_of(self, record: dict) -> list[dict]:
        """The records `encode` takes for `record`, each one example (kto: a preference pair is two); the
        record itself by default. Records are split into train and eval as they were read, before this."""
        return [record]

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        """One record -> {'input_ids': [...], 'labels': ..., TRUNCATED: bool} (any further key, returned for
        every record, becomes a column of the dataset too); None drops the example (logged); a list is several
        examples (causal_lm's data.too_long: split); {TOO_LONG: True} alone leaves a too-long example out."""
        raise NotImplementedError

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_batch(examples, pad_id)

    def eval_warning(self, dataset: Any, labels: list[str] | None, cfg: Any) -> str | None:
        """What the tokenised eval set leaves out of the scores (e.g. cut by max_length), to log once."""
        return None

    # --- step ---
    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-target losses, logits) for one micro-batch."""
        raise NotImplementedError

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    # --- class weights (train.class_weights; classification tasks) ---
    _class_weights: torch.Tensor | None = None  # one weight per label id; private: no cache or adapter keeps it

    _label_smoothing = 0.0  # train.label_smoothing (single-label cross-entropy); private as _class_weights

    def set_label_smoothing(self, smoothing: float) -> None:
        """Smooth the training cross-entropy's targets by `smoothing` (train.label_smoothing); eval's stays plain."""
        self._label_smoothing = smoothing

    def set_class_weights(self, weights: list[float] | None) -> None:
        """Weigh the training loss by class (`class_weights.resolve`, in label order); None: unweighted."""
        self._class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def train_loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, Any]:
        """The training objective's numerator for one micro-batch: `loss_sum`, which tasks with class weights
        weigh (eval's `loss_sum` stays unweighted)."""
        return self.loss_sum(model, batch)

    def step_weight(self, batches: list[dict]) -> float | None:
        """These micro-batches' share of the training loss's denominator where it is not their target count:
        with class weights, the targets' summed weight (so the step's loss is sum(w_y * loss) / sum(w_y) over
        every micro-batch and rank); None without them (the count, which the loop has, is the denominator)."""
        if self._class_weights is None:
            return None
        return sum(target_weight(b["labels"], self._class_weights) for b in batches)

    # --- eval ---
    per_example = False  # `eval --predictions` is scoring: keep what `example_outputs` needs (evaluate_examples)

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        return []

    def example_outputs(self, logits: torch.Tensor | None, batch: dict) -> list:
        """Per example of `batch`, what its `eval --predictions` line needs beyond `predictions` (a score, a
        loss): None each unless the task says otherwise."""
        return [None] * len(batch["input_ids"])

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        """One eval example's `eval --predictions` line (without its "line"), from its `predictions` entry
        (None where the task has none), `example_outputs` entry and the record it was encoded from."""
        raise NotImplementedError

    def joined_examples(self, records: list[dict], examples: list[tuple]) -> tuple[list[dict], list[tuple]]:
        """Each eval example's record and (prediction, extra), in dataset order, as `eval --predictions` writes
        them: one line per example, unless the task joins examples of one record (token_cls' split windows)."""
        return records, examples

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        """The eval metrics of every example's `predictions` row, in dataset order."""
        raise NotImplementedError


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest example of this micro-batch (never to max_length)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    seq_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if seq_labels else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(e["labels"])
    if not seq_labels:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "token_type_ids" in examples[0]:  # text pairs (seq_cls); padding is segment 0, as tokenizers pad it
        batch["token_type_ids"] = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            batch["token_type_ids"][i, :len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
    return batch


def overflowed(enc: Any, max_length: int, i: int = 0) -> bool:
    """Whether the tokenizer call behind `enc` (truncation=True) cut tokens off text `i` at `max_length`.
    Tokenizers without a Rust backend keep no overflow record: there an example that fills `max_length`
    exactly counts as cut too."""
    encodings = getattr(enc, "encodings", None)
    if encodings:
        return bool(encodings[i].overflowing)
    ids, mask = enc["input_ids"], enc.get("attention_mask")
    if len(ids) and not isinstance(ids[0], int):  # a batch (lists or a tensor): text i, without its padding
        ids, mask = ids[i], (mask[i] if mask is not None else None)
    return int(sum(mask) if mask is not None else len(ids)) >= max_length


def ce_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
           smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over non-ignored targets, computed in float32 for stability; with `weights` (one per
    class) each target's loss times its class's weight; `smoothing`: torch's label_smoothing (divided by the
    summed target weight, as the loop does, it is CrossEntropyLoss(weight, label_smoothing)'s mean)."""
    if weights is not None:
        weights = weights.to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), weight=weights,
                           ignore_index=IGNORE, reduction="sum", label_smoothing=smoothing)


def target_weight(labels: torch.Tensor, weights: torch.Tensor) -> float:
    """The summed class weight of the non-ignored targets in `labels`: weighted cross-entropy's denominator."""
    targets = labels[labels != IGNORE]
    return float(weights.double()[targets.cpu()].sum())


def label_name(value: Any) -> str:
    """A label's name in the label set: JSON's true/false as `true`/`false` (the JSON spelling, which a CSV cell
    and a quoted data.labels entry use too; Python's would be True/False), anything else as str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def id_names_for(found: list[str], given: list | None) -> list[str] | None:
    """The names data.labels gives integer labels by id (HF datasets' ClassLabel ids: SST-2's 0/1, CoNLL's
    ner_tags), when the data's labels `found` are all integers and data.labels names them; else None (the
    labels are their own names)."""
    # (-1 is how HF datasets mark an unlabelled row: an id, refused as one, not a reason to read 0 and 1 as names)
    if given is None or not all(name.removeprefix("-").isdecimal() for name in found):
        return None
    names = [str(x) for x in given]
    return names if not all(name.isdecimal() for name in names) else None


def named_by_id(value: Any, id_names: list[str] | None, where: str, what: str) -> str:
    """A label's name: its own (`label_name`), or with `id_names` the name of its id."""
    if id_names is None:
        return label_name(value)
    if not (str(value).isdecimal() and int(value) < len(id_names)):
        raise DataError(f"{where}: {what} {value!r} is not an id of data.labels (0..{len(id_names) - 1})")
    return id_names[int(value)]


def unknown_label(where: str, what: str, value: Any, label2id: dict) -> DataError:
    """The error for a label `value` (`what`: label, tag) not in the label set, with the likely reason."""
    name = label_name(value)
    hint = ""
    if name.strip() in label2id:
        hint = f" (it differs from {name.strip()!r} only in spaces)"
    elif isinstance(value, bool):
        hint = f" (JSON {name} is the label {name!r}: list it so in data.labels)"
    elif name == "0" and "O" in label2id:  # (a digit zero for the letter O of "outside")
        hint = " (a typo of 'O'? correct it in the file)"
    elif close := difflib.get_close_matches(name, _same_scheme(name, label2id), n=1, cutoff=0.8):
        # a misspelt label ('postive', 'B-PRE'): adding it to data.labels would train a class of the typo
        hint = f" (a typo of {close[0]!r}? correct it in the file)"
    elif value is not None:  # (the label set is the training data's unless data.labels gives it)
        hint = " (a label the training data lacks: give the whole label set in data.labels)"
    return DataError(f"{where}: {what} {value!r} is not in the label set {list(label2id)}{hint}")


def _same_scheme(name: str, label2id: dict) -> list[str]:
    """The labels a misspelling of `name` may be: a tag's (B-PRE) only those of its own prefix, so a B-/I- tag
    the training data lacks (I-LOC beside B-LOC) is not taken for a typo of the other."""
    labels = [str(k) for k in label2id]
    return [k for k in labels if k[:2] == name[:2]] if name[1:2] == "-" else labels


def collect_labels(records: list[dict], column: str, *, is_list: bool, multi_label: bool = False) -> list[str]:
    """Sorted label set of a column; numbers sort numerically, mixed types are refused, and so are labels
    that differ only in leading/trailing spaces (they would silently be separate classes). `is_list`: each
    value is a list of tags (token_cls); `multi_label`: a list of class labels (seq_cls, any number each)."""
    seen: dict[str, tuple[type, str]] = {}  # label name -> (its type, where it first is)
    first: tuple[type, str] | None = None  # type of the first label, and where it is
    for rec in records:
        values = rec.get(column)
        where = rec.get(WHERE, "?")
        if column not in rec:
            raise DataError(f"{where}: the label column {column!r} is missing (the record has: {fields_of(rec)})")
        for v in (values if is_list or multi_label else [values]):
            if not isinstance(v, (str, int)):  # (a bool is an int: JSON true/false are labels "true"/"false")
                why = (" (a list holds labels, not lists)" if is_list or multi_label else " (a list of labels in "
                       "every record makes the run multi-label)") if isinstance(v, list) \
                    else " (seq_cls is classification: regression targets are not supported)" \
                    if isinstance(v, float) else ""
                raise DataError(f"{where}: label {v!r} must be a string or an integer{why}")
            if isinstance(v, str) and not v.strip():  # an empty CSV cell: a missing label, not a class ""
                raise DataError(f"{where}: the {'tag' if is_list else 'label'} in column {column!r} is empty",
                                hint="fill it in, or leave the record out")
            if is_list and isinstance(v, str) and v[-1:] == "-" and len(v) <= 2:  # "B-", "I-", "-"
                raise DataError(f"{where}: tag {v!r} in column {column!r} has a scheme prefix but no entity type "
                                "(write e.g. B-PER, or O outside entities)")
            if first is None:
                first = (type(v), where)
            elif type(v) is not first[0]:
                raise DataError(f"{where}: column {column!r} mixes label types: {v!r} is {type(v).__name__}, but "
                                f"the label at {first[1]} is {first[0].__name__}; use one type (all strings or all "
                                "integers)")
            seen.setdefault(label_name(v), (type(v), where))
    _refuse_space_variants(seen, column)
    if not is_list and len(seen) > 2 and all(_decimal_number(label) for label in seen):
        # (a TSV's float scores, STS-B's 0.0-5.0, trained as one class per distinct value, without a word)
        raise DataError(f"column {column!r}: every label is a number with decimals ({', '.join(sorted(seen)[:4])}, "
                        "...): regression targets? seq_cls trains classes, and regression is not supported",
                        hint="if they are class names, list them in data.labels")
    kinds = {kind for kind, _ in seen.values()}
    # CSV/TSV cells are strings: "0".."11" must get the class indices that JSON's 0..11 get
    if kinds == {int} or all(label.isdecimal() for label in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def _decimal_number(label: str) -> bool:
    """Whether `label` is written as a number with a fraction ("2.5", "0.0"): no class name looks so."""
    try:
        float(label)
    except ValueError:
        return False
    return "." in label


def _refuse_space_variants(seen: dict[str, tuple[type, str]], column: str) -> None:
    """Raise naming two labels of `seen` that differ only in leading/trailing spaces ("neg " and "neg"), with
    where each first is. (data.labels that lists both keeps them apart: collect_labels is not asked then.)"""
    spellings: dict[str, list[str]] = {}
    for name in seen:
        spellings.setdefault(name.strip(), []).append(name)
    for names in spellings.values():
        if len(names) > 1:
            places = ", ".join(f"{n!r} at {seen[n][1]}" for n in names)
            raise DataError(f"column {column!r} has labels that differ only in spaces: {places}; they would be "
                            "separate classes. Strip the spaces in the data (or list every spelling in data.labels "
                            "to keep them apart)")

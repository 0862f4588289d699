"""Training configuration: the fields every model's training shares, read from YAML/flags.

:class:`TrainConfig` holds the generic fields (output directory, optimisation,
learning-rate schedule, faults, evaluation and checkpoints, machine). A model's
config subclasses it, adds its own data/loss/evaluation fields, and nests its
model's settings as a dataclass field (``model``)::

    @dataclass
    class Seq2SeqConfig(TrainConfig):
        BEST_METRICS = ("val_bleu", "val_loss")
        corpus: str = "multi30k"
        ...
        model: Architecture = field(default_factory=Architecture)

In YAML the nested dataclass is a section, and on the command line its keys are
dotted::

    lr: 0.002
    model:
      dropout: 0.2        # fastseq train --set model.dropout=0.2

:meth:`TrainConfig.from_dict` checks every key (unknown keys are listed with the
valid ones), every type and every range before any work starts; the messages
name the key (``config key 'model.dropout': ...``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, TypeVar

from fastseq.training.faults import NONFINITE_POLICIES
from fastseq.training.precision import PRECISIONS
from fastseq.training.schedule import KINDS, LRSchedule

C = TypeVar("C", bound="TrainConfig")
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass
class TrainConfig:
    """The generic training fields; a YAML config file holds these keys (and its
    model's, see the module docstring).

    Class attributes:
        BEST_METRICS: the validation metrics ``best_metric`` may name (a subclass
            lists its task's).
    """

    BEST_METRICS: ClassVar[Tuple[str, ...]] = ("val_loss",)
    TASK: ClassVar[str] = ""  # the model job a subclass configures ("translation", "lm"): key ``task``

    out: str = "runs/run"             # checkpoints, logs, metrics.json
    # optimisation
    epochs: int = 10
    max_steps: int = 0                # stop after this many updates (0: no limit)
    max_minutes: float = 0.0          # stop training after this much wall time (0: no limit)
    accum_steps: int = 1              # micro-batches per update and process
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    lr: float = 1e-3
    lr_schedule: str = "constant"     # after warm-up: constant | inverse_sqrt | linear | cosine
    min_lr_ratio: float = 0.0         # linear/cosine: final lr / lr
    warmup_steps: int = 200
    lr_decay: float = 0.5             # multiply lr when validation loss does not improve (1: off)
    clip_norm: float = 1.0
    nonfinite_loss: str = "skip"      # non-finite loss/gradients: skip the update | stop
    max_skipped_updates: int = 10     # skip: stop after this many non-finite updates in a row
    # evaluation and checkpoints
    eval_every: int = 0               # evaluate + checkpoint every N updates (0: once per epoch)
    save_every: int = 0               # also write last.pt every N updates (0: only at evaluations)
    keep_checkpoints: int = 3         # step checkpoints kept: the best K by best_metric
    best_metric: str = "val_loss"     # one of BEST_METRICS
    patience: int = 0                 # early stopping: evaluations without improvement (0: off)
    # machine
    device: str = "auto"
    threads: int = 0                  # torch CPU threads per process (0: torch's default)
    seed: int = 1234
    progress: bool = True

    @classmethod
    def from_dict(cls: Type[C], values: Mapping[str, Any]) -> C:
        """Build from a mapping (e.g. parsed YAML), checking keys and values.

        Nested sections (dataclass fields such as ``model``) are mappings; a key may
        also be dotted (``"model.dropout"``), applied after the keys before it.

        Raises:
            ValueError: an unknown key (the message lists the valid ones), or a
                value of the wrong type or range.
        """
        values = dict(values)
        task = values.pop("task", cls.TASK)
        if task != cls.TASK:
            raise ValueError(f"config key 'task': this is a {cls.TASK!r} config, got {task!r}")
        cfg = cls(**_parse(cls, nest(values), ""))
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        """The config as plain data (sections as nested dicts; ``task`` first when the
        class names one), as stored in checkpoints; :meth:`from_dict` reads it back."""
        return {**({"task": self.TASK} if self.TASK else {}), **asdict(self)}

    def validate(self) -> None:
        """Raise ValueError for values out of range, before any work starts.

        Subclasses extend it (calling ``super().validate()``) with their own fields."""
        for key in ["epochs", "accum_steps", "keep_checkpoints", "max_skipped_updates"]:
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r}: expected > 0, got {getattr(self, key)}")
        for key in ["max_steps", "warmup_steps", "threads", "eval_every", "save_every", "patience"]:
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r}: expected >= 0, got {getattr(self, key)}")
        if self.max_minutes < 0:
            raise ValueError(f"config key 'max_minutes': expected >= 0, got {self.max_minutes}")
        if not self.lr > 0:
            raise ValueError(f"config key 'lr': expected > 0, got {self.lr}")
        if not self.clip_norm > 0:
            raise ValueError(f"config key 'clip_norm': expected > 0, got {self.clip_norm}")
        choices = {"precision": PRECISIONS, "lr_schedule": KINDS, "best_metric": self.BEST_METRICS,
                   "nonfinite_loss": NONFINITE_POLICIES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.lr_schedule in ("linear", "cosine") and not self.max_steps:
            raise ValueError(f"config key 'lr_schedule': {self.lr_schedule!r} decays to max_steps; set max_steps")
        LRSchedule(self.lr, self.lr_schedule, self.warmup_steps, self.max_steps, self.min_lr_ratio,
                   self.lr_decay)  # checks the schedule's values
        for f in fields(self):  # sections check their values when built: rebuild them
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                _build(type(section), asdict(section), f"{f.name}.")


def nest(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` with dotted keys expanded into nested mappings, in order: a later key
    overrides an earlier one; a mapping given for a section is merged into it (deeply).

    ``{"model": {"dropout": 0.1}, "model.dropout": 0.2, "lr": 1}`` ->
    ``{"model": {"dropout": 0.2}, "lr": 1}``.

    Raises:
        ValueError: a dotted key with an empty part, or one that goes through a key
            holding a non-mapping value.
    """
    out: Dict[str, Any] = {}
    for key, value in values.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ValueError(f"config key {key!r}: empty name in a dotted key")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"config key {key!r}: {'.'.join(parts[:i + 1])!r} is {child!r}, not a section")
            node = child
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            _merge(node[leaf], nest(value))
        else:
            node[leaf] = nest(value) if isinstance(value, Mapping) else value
    return out


def _merge(into: Dict[str, Any], values: Mapping[str, Any]) -> None:
    """Merge nested ``values`` into ``into``, section by section; values win."""
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _section_type(f: dataclasses.Field) -> Optional[type]:
    """The dataclass of a section field (its default_factory's), or None for a scalar field."""
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return None
    default = f.default_factory()  # type: ignore[misc]
    return type(default) if dataclasses.is_dataclass(default) else None


def _parse(cls: type, values: Mapping[str, Any], prefix: str, outer: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Constructor arguments of dataclass ``cls`` from ``values``: types checked, sections built.

    ``prefix`` names the section (``"model."``) in messages; ``outer`` are the keys of the
    level above it, named in the hint when one of them is given inside the section."""
    names = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(values) - set(names))
    if unknown:
        message = (f"unknown config key(s) {[prefix + k for k in unknown]}; "
                   f"valid keys: {sorted(prefix + n for n in names)}")
        for f in names.values():  # a section's key given at this level
            section = _section_type(f)
            inner = {g.name for g in fields(section)} if section is not None else set()
            for k in unknown:
                if k in inner:
                    message += f"; {k!r} is a key of the {prefix + f.name!r} section: {prefix}{f.name}.{k}"
        for k in unknown:  # a key of the level above given in this section
            if k in outer:
                message += f"; {k!r} is not a key of the {prefix[:-1]!r} section but of the level above"
        raise ValueError(message)
    kwargs: Dict[str, Any] = {}
    for key, value in values.items():
        f = names[key]
        section = _section_type(f)
        if section is not None:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {prefix + key!r}: expected a section (a mapping of "
                                 f"{section.__name__} keys), got {value!r}")
            inner = _parse(section, value, f"{prefix}{key}.", tuple(names))
            kwargs[key] = _build(section, inner, f"{prefix}{key}.")
            continue
        kind = _SCALARS.get(f.type) if isinstance(f.type, str) else f.type
        if kind not in _SCALARS.values():
            raise TypeError(f"{cls.__name__}.{key}: config fields are int, float, str, bool or a "
                            f"dataclass section, not {f.type!r}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"config key {prefix + key!r}: expected {kind.__name__}, got {value!r}")
        kwargs[key] = value
    return kwargs


def _build(section: type, kwargs: Mapping[str, Any], prefix: str) -> Any:
    """``section(**kwargs)``; its ValueError names the dotted key (``config key 'model.dropout': ...``)
    when the message starts with a field name, else the section."""
    try:
        return section(**kwargs)
    except ValueError as exc:
        text = str(exc)
        name, sep, rest = text.partition(": ")
        if sep and name in {f.name for f in fields(section)}:
            raise ValueError(f"config key {prefix + name!r}: {rest}") from None
        raise ValueError(f"config section {prefix[:-1]!r}: {text}") from None

"""The registry of op implementations: ``{op: {backend: Implementation}}``, and the dispatcher.

Every op (``"gru_recurrence"``, ``"additive_attention_backward"``, ...) registers
one implementation per backend (``"reference"``, ``"triton"``, ``"cpp"``) with
:func:`register`, next to its custom-op definition (``fastseq/ops/<op>/op.py``).
All implementations of an op share one signature and one output convention:
the op's arguments in the op's order, and **absent outputs are empty ``[0]``
tensors** (a bias gradient without a bias, gates not saved), in every backend.

:func:`implementation` picks the one that runs for a call: the backend from
:func:`fastseq.backend.selection.select` (the setting in force, the tensor's
device and dtype), then the shape: if that backend registered limits and the
shape is past them, it falls back -- Triton to the C++ extension when that can
run and take the shape, else the reference -- with one ``RuntimeWarning`` per
(backend, kind of limit) (:mod:`fastseq.backend.limits`). Decisions are cached
per (op, backend, device type, dtype, sizes), so the limit check costs a dict
lookup on repeated shapes.

Adding a backend to an op, or an op, is one :func:`register` call per
(op, backend) in the op's folder; nothing here changes.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from fastseq.backend import selection
from fastseq.backend.limits import Unsupported, warn_limit
from fastseq.backend.warn import warn_once

Sizes = Mapping[str, Any]
Limits = Callable[[Sizes], Optional[Unsupported]]
_FALLBACK = {"triton": "cpp", "cpp": "reference"}


class Implementation:
    """One backend's implementation of one op.

    Args:
        fn: the implementation, or ``None`` with ``load``.
        load: a function returning ``(fn, limits)`` on first use, for backends
            whose import is costly or may fail (Triton: importing it takes a
            third of a second and needs it installed).
        limits: ``limits(sizes)`` -> None, or the :class:`Unsupported` shape.
            None: any shape.
        limited_devices: device types the limits apply to (the C++ extension's
            CPU kernels take any shape, so their limits are skipped on the CPU,
            where a decoder step costs tens of microseconds).
    """

    __slots__ = ("_fn", "_load", "_limits", "_error", "limited_devices")

    def __init__(self, fn: Optional[Callable] = None, *, load: Optional[Callable[[], Tuple[Callable, Optional[Limits]]]] = None,
                 limits: Optional[Limits] = None, limited_devices: Tuple[str, ...] = ("cpu", "cuda")):
        if (fn is None) == (load is None):
            raise TypeError("Implementation: give exactly one of fn and load")
        self._fn, self._load, self._limits = fn, load, limits
        self._error: Optional[str] = None
        self.limited_devices = limited_devices

    def _resolve(self) -> None:
        if self._fn is None:
            self._fn, self._limits = self._load()  # type: ignore[misc]

    def load_error(self) -> Optional[str]:
        """None if the implementation loads (loading it now if needed), else why not."""
        if self._fn is None and self._error is None:
            try:
                self._resolve()
            except Exception as exc:  # noqa: BLE001 - reported by the dispatcher
                self._error = f"{type(exc).__name__}: {exc}"
        return self._error

    @property
    def fn(self) -> Callable:
        self._resolve()
        return self._fn  # type: ignore[return-value]

    def unsupported(self, t: Tensor, sizes: Sizes) -> Optional[Unsupported]:
        """None if this implementation takes ``sizes`` for tensors like ``t``, else why not."""
        if t.device.type not in self.limited_devices:
            return None
        self._resolve()
        return None if self._limits is None else self._limits(sizes)

    def has_limits(self, t: Tensor) -> bool:
        return t.device.type in self.limited_devices and (self._load is not None or self._limits is not None)


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
# (op, backend, device type, dtype, *sizes) -> the backend that runs it.
_DECISIONS: Dict[tuple, str] = {}
_MAX_DECISIONS = 4096


def register(op: str, backend: str, impl: Union[Callable, Implementation]) -> None:
    """Register ``impl`` as ``backend``'s implementation of ``op`` (a plain function
    takes any shape on any device)."""
    if backend not in ("reference", "triton", "cpp"):
        raise ValueError(f"backend: expected 'reference', 'triton' or 'cpp', got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl if isinstance(impl, Implementation) else Implementation(impl)
    clear_decisions()


def registered() -> Dict[str, Tuple[str, ...]]:
    """Every registered op and the backends that implement it."""
    return {op: tuple(impls) for op, impls in _REGISTRY.items()}


def get(op: str, backend: str) -> Implementation:
    """The registered implementation of ``op`` on ``backend``.

    Raises:
        KeyError: nothing is registered for ``(op, backend)``.
    """
    try:
        return _REGISTRY[op][backend]
    except KeyError:
        raise KeyError(f"no {backend!r} implementation of op {op!r} is registered") from None


def clear_decisions() -> None:
    """Forget the cached shape decisions (after changing a limit constant)."""
    _DECISIONS.clear()


def choose(op: str, t: Tensor, sizes: Union[None, Sizes, Callable[[], Sizes]] = None) -> str:
    """The backend that runs ``op`` for main input ``t`` and these sizes (see the module
    docstring). ``sizes`` may be a callable, called only when a limit has to be checked.

    Raises:
        RuntimeError: a forced backend cannot run on ``t`` at all (its device or dtype).
    """
    name = selection.select(t)
    if name != "reference" and get(op, name).load_error() is not None:
        name = _not_loading(op, name, t)
    if name == "reference" or sizes is None or not get(op, name).has_limits(t):
        return name
    if callable(sizes):
        sizes = sizes()
    key = (op, name, t.device.type, t.dtype, *sizes.values())
    final = _DECISIONS.get(key)
    if final is None:
        final = _fall_back(op, name, t, sizes)
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.clear()
        _DECISIONS[key] = final
    return final


def implementation(op: str, t: Tensor, sizes: Union[None, Sizes, Callable[[], Sizes]] = None) -> Callable:
    """The function that runs ``op`` for main input ``t`` (:func:`choose`, then the registry)."""
    return get(op, choose(op, t, sizes)).fn


def _not_loading(op: str, name: str, t: Tensor) -> str:
    """The backend to use when ``name``'s implementation of ``op`` does not load
    (e.g. fastseq's Triton kernels against an incompatible Triton)."""
    why = get(op, name).load_error()
    if selection.get_backend() != "auto":
        raise RuntimeError(f"FASTSEQ_BACKEND={selection.get_backend()}, but its {op} does not load: {why}")
    nxt = _FALLBACK[name]
    if nxt == "cpp" and ("cpp" not in _REGISTRY[op] or selection.cpp_reason(t) is not None):
        nxt = "reference"
    warn_once(f"load:{name}:{op}", f"fastseq: the {name} implementation of {op} does not load ({why}); "
                                   f"running it on the {nxt} backend instead")
    return nxt


def _fall_back(op: str, name: str, t: Tensor, sizes: Sizes) -> str:
    """``name`` if it takes ``sizes``, else the fallback (warning once per limit)."""
    while name != "reference":
        why = get(op, name).unsupported(t, sizes)
        if why is None:
            break
        nxt = _FALLBACK[name]
        if nxt == "cpp" and ("cpp" not in _REGISTRY[op] or selection.cpp_reason(t) is not None):
            nxt = "reference"
        warn_limit(name, nxt, why)
        name = nxt
    return name


def needs_grad(*tensors) -> bool:
    """Autograd will need a backward through an op taking ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def direct_call_ok(*tensors) -> bool:
    """True when an op can skip its torch.library wrapper and call the implementation
    directly: nothing needs a gradient and no torch.compile trace is running. The
    wrapper (autograd + fake tensors) costs ~30 us per call, which is most of a
    small decoder step at inference time; the result is the same.
    """
    return not torch.compiler.is_compiling() and not needs_grad(*tensors)

"""Swap torch.nn's LSTM / GRU / LSTMCell / GRUCell for lstmgru's throughout a model, and back.

``convert(model)`` replaces every ``torch.nn.LSTM``, ``GRU``, ``LSTMCell`` and ``GRUCell`` in
``model`` (and ``model`` itself if it is one) with the lstmgru module of the same kind;
``to_torch(model)`` does the reverse. Both follow ``torch.nn.SyncBatchNorm.
convert_sync_batchnorm``: children are replaced in place and the function returns the model,
or the replacement when the model itself was replaced.

A replacement is built on the meta device (nothing is allocated or initialised) and then
takes over the old module's state as it is, so that nothing is copied and no tensor data is
read (a model on the meta device converts too):

* the parameters and buffers themselves (the same ``nn.Parameter`` objects, so device, dtype,
  ``requires_grad``, hooks registered on a tensor, and optimizer state keyed by parameter all
  carry over), in the same order, with the same non-persistent buffers;
* parametrizations (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm``,
  ``orthogonal``, ``spectral_norm``): the same ``ParametrizationList`` objects move over and the
  replacement is parametrized the same way;
* child modules, the ``training`` flag, and every hook dictionary ``nn.Module`` keeps (forward,
  forward-pre, backward, state-dict and load-state-dict hooks): the dictionaries themselves
  move, so handles returned by ``register_*_hook`` still remove the hook;
* attributes set on the instance that the module's class does not set itself (a ``qconfig``,
  a tag of yours, what a subclass's ``__init__`` added);
* torch.nn's flat-weight bookkeeping (``_flat_weights``), so cuDNN's flattened weights stay
  as they are.

Which modules are converted: instances of the four torch.nn classes and of their subclasses
(including the classes ``parametrize`` derives), except lstmgru modules, which a future
lstmgru may derive from torch.nn's: they are never converted again.

Subclasses keep their class. An instance of ``MyLSTM(SomeMixin, nn.LSTM)`` becomes an
instance of a class derived from ``MyLSTM`` whose method resolution order is ``MyLSTM``'s with
torch.nn's classes (``nn.LSTM``, ``nn.RNNBase``) replaced, in place, by lstmgru's
(``lstmgru.LSTM``, its base): ``[derived, MyLSTM, SomeMixin, lstmgru.LSTM, ..., nn.Module,
object]``. So every method, property and class attribute the user's classes define is found
first, exactly as before, ``super().forward(...)`` in them reaches lstmgru's ``forward``, and
``isinstance(m, MyLSTM)`` still holds (``isinstance(m, nn.LSTM)`` no longer does). The order is
set by a metaclass derived from ``MyLSTM``'s own (``type`` or ``abc.ABCMeta``) whose ``mro()``
makes the substitution; the user's functions are not copied or rebuilt, so the ``__class__``
cells of their ``super()`` calls stay right. ``MyLSTM.__init__`` is never called: a plain
lstmgru module is built (on meta) and an empty instance of the derived class takes its state;
what
``MyLSTM.__init__`` set on the instance is carried over like any instance attribute (below).
The classes ``parametrize`` creates (``ParametrizedMyLSTM``) are unwrapped first and made
again over the derived class. One derived class is made per user class (cached); instances
pickle (``__reduce_ex__`` names the user's class and ``lstmgru.convert._derived_instance``,
which makes the derived class again when unpickled in a new process) and ``deepcopy``.
``to_torch`` gives back the user's class itself (``type(m) is MyLSTM``).

Why not copy the subclass's namespace onto a new class over ``lstmgru.LSTM``: the functions'
``super()`` cells name the original class, so each would have to be rebuilt (also inside
properties, class and static methods, decorators' closures), the copies would not be
instances of the user's class, and a mixin's methods would have to be copied level by level.
Substituting in the MRO keeps every function as it is. The cost: ``__init_subclass__`` of the
user's classes runs once when the derived class is made.

``torch.load(path, weights_only=True)`` of a whole pickled model: ``import lstmgru`` allows
lstmgru's classes (``torch.serialization.add_safe_globals``); a converted subclass loads once
the user allows their own class, ``torch.serialization.add_safe_globals([MyLSTM])``, which
torch's error message names.

What cannot be carried over is named in a ``UserWarning``: a subclass that overrides
torch.nn internals which only torch's own kernel path calls (``check_forward_args``,
``permute_hidden``, ...): lstmgru's own implementations check the arguments themselves. A
subclass of an lstmgru class that ``to_torch`` converts becomes the plain torch.nn class,
and what it defines is named in a ``UserWarning`` the same way.

Not kept: references to the old module held outside the model's module tree (a plain Python
list, a closure; ``optimizer`` state is keyed by parameter and is kept), and a
``module.compile()`` done on the old module itself. The old module shares its state with
the replacement and should not be used any more.

``to_torch`` raises ``ValueError`` for what torch.nn cannot compute, naming the module's path
and the option: ``GRU(reset_after=False)`` and ``GRUCell(reset_after=False)`` (the original
GRU), any other lstmgru-only constructor option (a keyword-only argument of an lstmgru class)
that is not at its default, and cell variants (a non-empty ``variants`` attribute). Nothing is
changed when it raises.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import parametrize

from .modules import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["convert", "to_torch"]

_RNN_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
             "bidirectional")
_CELL_ARGS = ("input_size", "hidden_size", "bias")

# (torch.nn class, lstmgru class, the constructor arguments both take), the subclasses first
# should one pair ever derive from another.
_PAIRS: Tuple[Tuple[Type[nn.Module], Type[nn.Module], Tuple[str, ...]], ...] = (
    (nn.LSTM, LSTM, _RNN_ARGS + ("proj_size",)),
    (nn.GRU, GRU, _RNN_ARGS),
    (nn.LSTMCell, LSTMCell, _CELL_ARGS),
    (nn.GRUCell, GRUCell, _CELL_ARGS),
)
_LSTMGRU_CLASSES = tuple(ours for _, ours, _ in _PAIRS)

# What nn.Module.__init__ sets besides the containers moved one by one below: the hook
# dictionaries (and the flag saying whether the backward hooks are full ones).
_MODULE_CONTAINERS = {"training", "_parameters", "_buffers", "_non_persistent_buffers_set",
                      "_modules"}
_HOOK_ATTRIBUTES = tuple(sorted(set(nn.Module().__dict__) - _MODULE_CONTAINERS))
# Bound to the old module (``module.compile()``), so never carried over.
_NOT_CARRIED = {"_compiled_call_impl"}

# Why torch.nn cannot take an lstmgru option at a value other than its default: one line per
# option. An lstmgru-only option missing here is still refused, with a generic reason.
_TORCH_CANNOT: Dict[str, str] = {
    "reset_after": "the original GRU (reset gate applied to h before the recurrent product), "
                   "which torch.nn and cuDNN cannot compute",
}
# Checks beyond the constructor options: each returns a description of what torch.nn cannot
# represent, or None. Adding a check is one line here.
_EXTRA_CHECKS: Tuple[Callable[[nn.Module], Optional[str]], ...] = (
    lambda m: (f"variants={tuple(m.variants)!r}: cell variants, which torch.nn does not have"
               if getattr(m, "variants", None) else None),
)


def _where(path: str) -> str:
    return f"'{path}'" if path else "the model itself"


def _public_name(cls: Type[nn.Module]) -> str:
    return ("lstmgru." if cls in _LSTMGRU_CLASSES else "torch.nn.") + cls.__qualname__


def _pair_of_torch(module: nn.Module):
    if isinstance(module, _LSTMGRU_CLASSES):  # never re-convert ours, even if it derives torch's
        return None
    for pair in _PAIRS:
        if isinstance(module, pair[0]):
            return pair
    return None


def _pair_of_lstmgru(module: nn.Module):
    for pair in _PAIRS:
        if isinstance(module, pair[1]):
            return pair
    return None


@functools.lru_cache(maxsize=None)
def _own_attributes(cls: Type[nn.Module]) -> frozenset:
    """The instance attributes ``cls.__init__`` sets (read off a tiny instance on meta)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return frozenset(cls(1, 2, device="meta").__dict__)


@functools.lru_cache(maxsize=None)
def _lstmgru_only_options(cls: Type[nn.Module]) -> Tuple[inspect.Parameter, ...]:
    """lstmgru's own constructor options: the keyword-only arguments (torch.nn has none)."""
    return tuple(p for p in inspect.signature(cls.__init__).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _torch_cannot(module: nn.Module, ours: Type[nn.Module]) -> List[str]:
    problems = []
    for option in _lstmgru_only_options(ours):
        value = getattr(module, option.name, option.default)
        if value != option.default:
            reason = _TORCH_CANNOT.get(option.name, "an lstmgru option torch.nn does not have")
            problems.append(f"{option.name}={value!r}: {reason}")
    problems += [p for p in (check(module) for check in _EXTRA_CHECKS) if p is not None]
    return problems


# torch.nn methods that only torch.nn's own forward calls (lstmgru's "native" path); lstmgru's
# own implementations check and arrange the arguments themselves, so an override of one of
# these is honoured on torch's kernels only.
_TORCH_FORWARD_ONLY = frozenset({"check_input", "check_hidden_size", "check_forward_args",
                                 "get_expected_hidden_size", "get_expected_cell_size",
                                 "permute_hidden"})
# Names Python's machinery puts in class namespaces (abc, typing): never "defined by the user".
_PYTHON_INTERNALS = frozenset({"_abc_impl", "_is_protocol", "_is_runtime_protocol"})
# Modules whose classes are no user's definitions (torch's, ours, abc's and typing's bases).
_LIBRARIES = ("torch", "lstmgru", "abc", "typing", "builtins")

# One derived class per user class (a subclass of a torch.nn RNN class) and back.
_DERIVED: Dict[type, type] = {}
_ORIGINAL: Dict[type, type] = {}
_METACLASSES: Dict[Tuple[type, type], type] = {}


def _unparametrized(module: nn.Module) -> type:
    """The module's class as it was before ``parametrize`` derived ``Parametrized<Name>``."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _user_definitions(cls: type, base: type, parametrized=frozenset()) -> List[str]:
    """Names the user's classes in ``cls``'s hierarchy (subclasses and mixins; not torch's or
    lstmgru's) define, without Python's own (dunders, abc's and typing's bookkeeping) and the
    properties parametrize injects."""
    names: List[str] = []
    for klass in cls.__mro__:
        if klass in base.__mro__ or klass.__module__.split(".")[0] in _LIBRARIES:
            continue
        names += [name for name in vars(klass)
                  if not (name.startswith("__") and name.endswith("__"))
                  and name not in _PYTHON_INTERNALS and name not in parametrized
                  and name not in names]
    return names


def _substituting_metaclass(meta: type, torch_class: type, ours: type) -> type:
    """A metaclass derived from ``meta`` whose ``mro()`` puts lstmgru's classes where
    ``torch_class`` and its torch.nn bases were (see the module docstring)."""
    key = (meta, torch_class)
    made = _METACLASSES.get(key)
    if made is not None:
        return made
    module_mro = set(nn.Module.__mro__)
    replaced = frozenset(c for c in torch_class.__mro__ if c not in module_mro)
    inserted = tuple(c for c in ours.__mro__ if c not in module_mro)

    class OnLstmgru(meta):
        def mro(cls):
            order: List[type] = []
            for klass in super().mro():
                if klass is torch_class:
                    order += inserted
                elif klass not in replaced:
                    order.append(klass)
            return order

    OnLstmgru.__name__ = OnLstmgru.__qualname__ = f"On{ours.__name__}({meta.__qualname__})"
    _METACLASSES[key] = OnLstmgru
    return OnLstmgru


def _derived_class(user_class: type, torch_class: type, ours: type) -> type:
    """``user_class`` (a subclass of ``torch_class``) on lstmgru's ``ours``: made once."""
    derived = _DERIVED.get(user_class)
    if derived is None:
        meta = _substituting_metaclass(type(user_class), torch_class, ours)
        derived = meta(user_class.__name__, (user_class,), {
            "__module__": user_class.__module__, "__qualname__": user_class.__qualname__,
            "__doc__": user_class.__doc__, "__reduce_ex__": _reduce_derived})
        _DERIVED[user_class] = derived
        _ORIGINAL[derived] = user_class
        # torch.load(weights_only=True) rebuilds (BUILD) only objects of allow-listed classes;
        # the user allows their own class, whose derived class this is. The name is a key
        # only: no pickle refers to the derived class by name (see _reduce_derived).
        torch.serialization.add_safe_globals(
            [(derived, f"lstmgru.convert.derived:{user_class.__module__}."
                       f"{user_class.__qualname__}")])
    return derived


def _original_class(cls: type) -> Optional[type]:
    """The user class a derived class (or a class parametrize made over one) stands for."""
    for klass in cls.__mro__:
        if klass in _ORIGINAL:
            return _ORIGINAL[klass]
    return None


def _reduce_derived(self, protocol):
    # Pickled by the user's class (importable by reference), not the derived one (made at
    # run time): unpickling calls _derived_instance(user_class), then __setstate__(state).
    return _derived_instance, (_original_class(type(self)),), self.__getstate__()


def _derived_instance(user_class: type) -> nn.Module:
    """An empty instance of ``user_class``'s derived class (unpickling; see ``convert``)."""
    for torch_class, ours, _ in _PAIRS:
        if isinstance(user_class, type) and issubclass(user_class, torch_class):
            derived = _derived_class(user_class, torch_class, ours)
            return derived.__new__(derived)
    raise TypeError(f"lstmgru: {user_class!r} is not a subclass of a torch.nn RNN class")


def _target_class(module: nn.Module, path: str, base: Type[nn.Module], target: Type[nn.Module],
                  caller: str) -> type:
    """The class the replacement of ``module`` gets (the plain ``target``, the user's class
    on lstmgru's machinery, or the user's class itself for ``to_torch``)."""
    cls = _unparametrized(module)
    if cls is base:
        return target
    parametrized = frozenset(module.parametrizations) if parametrize.is_parametrized(module) \
        else frozenset()
    if caller == "convert":
        lost = [name for name in _user_definitions(cls, base, parametrized)
                if name in _TORCH_FORWARD_ONLY]
        if lost:
            warnings.warn(f"{caller}: {_where(path)} is a {cls.__qualname__}, a subclass of "
                          f"{_public_name(base)}, which overrides {', '.join(lost)}: only "
                          f"torch's own kernel path calls these; lstmgru's implementations "
                          f"check the arguments themselves", stacklevel=5)
        return _derived_class(cls, base, target)
    original = _original_class(cls)
    if original is not None:
        return original
    defined = _user_definitions(cls, base, parametrized)
    if defined:
        warnings.warn(f"{caller}: {_where(path)} is a {cls.__qualname__}, a subclass of "
                      f"{_public_name(base)}; it becomes a plain {_public_name(target)}, so what "
                      f"the subclass defines ({', '.join(defined)}) is not carried over",
                      stacklevel=5)
    return target


def _rebuild(module: nn.Module, path: str, base: Type[nn.Module], target: Type[nn.Module],
             args: Tuple[str, ...], caller: str) -> nn.Module:
    """A ``target`` that takes over ``module``'s state (see the module docstring)."""
    new_class = _target_class(module, path, base, target, caller)
    with warnings.catch_warnings():  # e.g. dropout with one layer: warned when it was built
        warnings.simplefilter("ignore")
        try:
            new = target(**{name: getattr(module, name) for name in args}, device="meta")
        except (TypeError, ValueError) as error:
            raise type(error)(f"{caller}: cannot build a {target.__qualname__} for "
                              f"{_where(path)}: {error}") from error
    if new_class is not target:
        # The user's class: its __init__ is never called (it may take arguments of its own).
        # An empty instance takes the plain module's state; __class__ assignment would refuse
        # hierarchies whose layout differs (a base with __slots__, such as abc.ABC, first).
        plain, new = new, new_class.__new__(new_class)
        new.__dict__.update(plain.__dict__)
    state = new.__dict__
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    if parametrize.is_parametrized(module):
        # Make ``new`` parametrized on the same names (its class and properties), with
        # placeholder lists, then hand it the old module's ParametrizationLists.
        for name in module.parametrizations:
            new._buffers[name] = torch.empty(0, device="meta")
            parametrize.register_parametrization(new, name, nn.Identity(), unsafe=True)
    state["_modules"] = dict(module._modules)
    state["training"] = module.training
    for name in _HOOK_ATTRIBUTES:
        if name in module.__dict__:
            state[name] = module.__dict__[name]
    own = _own_attributes(base) | _NOT_CARRIED
    for name, value in module.__dict__.items():
        if name not in own and name not in state:
            state[name] = value
    if "_flat_weights_names" in state:
        # The same names in the same order (same constructor arguments): take the lists over.
        if "_flat_weight_refs" in module.__dict__:
            state["_flat_weights"] = list(module._flat_weights)
            state["_flat_weight_refs"] = list(module._flat_weight_refs)
        else:
            new._init_flat_weights()
    return new


def _swap(model: nn.Module, caller: str, pair_of, direction: int) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__qualname__}")
    # First build every replacement without touching the model, so that an error leaves the
    # model as it was; a module that appears twice is replaced once, by one module.
    replacements: Dict[int, nn.Module] = {}
    problems = []
    for path, module in model.named_modules():
        pair = pair_of(module)
        if pair is None:
            continue
        base, target = pair[direction], pair[1 - direction]
        if caller == "to_torch":
            problems += [f"{_where(path)} ({type(module).__qualname__}): {p}"
                         for p in _torch_cannot(module, base)]
        if problems:  # nothing more to build: the call raises
            continue
        replacements[id(module)] = _rebuild(module, path, base, target, pair[2], caller)
    if problems:
        raise ValueError(f"{caller}: torch.nn cannot represent " + "; ".join(problems))
    root = replacements.get(id(model), model)
    _install(root, replacements, set())
    return root


def _install(module: nn.Module, replacements: Dict[int, nn.Module], seen: set) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = replacements.get(id(child), child)
        if new is not child:
            module._modules[name] = new
        _install(new, replacements, seen)


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``GRU`` / ``LSTMCell`` / ``GRUCell`` in ``model`` with
    lstmgru's, in place; returns ``model``, or its replacement if ``model`` is one of them.

    The replacements take over the old modules' parameters (the same objects), buffers,
    parametrizations, hooks, ``training`` flag and instance attributes; outputs and gradients
    are unchanged. A subclass of yours keeps its class, methods and ``forward`` on lstmgru's
    machinery (``super().forward`` reaches lstmgru). The notes at the top of
    ``lstmgru/convert.py`` give the details.
    """
    return _swap(model, "convert", _pair_of_torch, 0)


def to_torch(model: nn.Module) -> nn.Module:
    """The reverse of :func:`convert`: every lstmgru module in ``model`` becomes torch.nn's
    (a subclass of yours that ``convert`` carried over becomes your class again).

    Raises ``ValueError``, naming each module's path and option, for what torch.nn cannot
    compute (``GRU(reset_after=False)``, ``GRUCell(reset_after=False)``, cell variants); the
    model is then left unchanged.
    """
    return _swap(model, "to_torch", _pair_of_lstmgru, 1)


# torch.load(weights_only=True) of a whole pickled model: lstmgru's classes and the function
# that unpickles a converted subclass are safe to rebuild. (A converted subclass of the user's
# own is loaded once the user allows that class: torch.serialization.add_safe_globals([MyLSTM]).)
torch.serialization.add_safe_globals([LSTM, GRU, LSTMCell, GRUCell, _derived_instance])

"""Pick the connector class for a platform kind.

Imports are lazy so that a worker at a site without, say, pyvmomi configured
still starts; asking for a kind that has no connector yet is a PermanentError
that says so.

Connectors that are not built in (a new platform under development, the
synthetic connector of the scale benchmark) are *plugins*: a module that calls
``register(kind, source_factory, target_factory)`` when imported. The worker
imports them at start (``worker.py --plugin MODULE``, repeatable, and the
comma-separated ``TRANSCEND_PLUGINS`` variable); any other process that looks a
connector up (the CLI's ``workloads``) imports the modules named in
``TRANSCEND_PLUGINS`` the first time it asks for a kind that is not known yet.
Built-in kinds cannot be replaced by a plugin.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

from pydantic import BaseModel, ValidationError

from connectors.base import PermanentError, Source, Target, capabilities_of
from transcend.models import Capabilities, PlatformInfo

SourceFactory = Callable[[PlatformInfo, dict[str, str]], Source]
TargetFactory = Callable[[PlatformInfo, dict[str, str]], Target]

#: Kinds implemented in this package, as (source class, target class) import paths:
#: imported on first use, so a site without pyvmomi still runs its KVM connector.
_BUILTIN: dict[str, tuple[str, str]] = {
    "kvm": ("connectors.kvm.source:KvmSource", "connectors.kvm.target:KvmTarget"),
    "vmware": ("connectors.vmware.source:VmwareSource", "connectors.vmware.target:VmwareTarget"),
    "aws": ("connectors.aws.source:AwsSource", "connectors.aws.target:AwsTarget"),
}
#: Kinds plugins may not register.
BUILTIN: frozenset[str] = frozenset(_BUILTIN)
PLUGINS_ENV = "TRANSCEND_PLUGINS"
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

_sources: dict[str, SourceFactory] = {}
_targets: dict[str, TargetFactory] = {}
_loaded: set[str] = set()
_lock = threading.Lock()
_env_loaded = False


def _kind(kind: str) -> str:
    k = str(kind)
    if not _KIND.match(k):
        raise ValueError(f"platform kind {k!r} must be lower-case letters, digits, '-' or '_' "
                         "(at most 32, starting with a letter)")
    return k


def register(kind: str, source_factory: SourceFactory | None = None,
             target_factory: TargetFactory | None = None) -> None:
    """Make ``kind`` available as a source and/or a target. A factory is called as
    ``factory(info, secret)`` for every activity that needs the platform (like the
    built-in classes). Registering the same factory again is a no-op; another one for a
    kind already registered, or any for a built-in kind, is a ValueError."""
    k = _kind(kind)
    if k in BUILTIN:
        raise ValueError(f"platform kind {k!r} is built in; a plugin cannot replace it")
    if source_factory is None and target_factory is None:
        raise ValueError("register() needs a source factory, a target factory or both")
    with _lock:
        for table, factory, role in ((_sources, source_factory, "source"),
                                     (_targets, target_factory, "target")):
            if factory is None:
                continue
            current = table.get(k)
            if current is not None and current is not factory:
                raise ValueError(f"a {role} connector for {k!r} is already registered "
                                 f"({getattr(current, '__qualname__', current)!r})")
        if source_factory is not None:
            _sources[k] = source_factory
        if target_factory is not None:
            _targets[k] = target_factory


def unregister(kind: str) -> None:
    """Forget a plugin kind (tests)."""
    k = _kind(kind)
    with _lock:
        _sources.pop(k, None)
        _targets.pop(k, None)


def plugin_modules_from_env(value: str | None = None) -> list[str]:
    """Module names in ``TRANSCEND_PLUGINS`` (comma- or space-separated)."""
    raw = os.environ.get(PLUGINS_ENV, "") if value is None else value
    return [m for m in raw.replace(",", " ").split() if m]


def load_plugins(modules: Iterable[str]) -> list[str]:
    """Import each plugin module once (it registers its kinds); returns the names
    imported now. An import error is raised as a RuntimeError naming the module."""
    done = []
    for name in modules:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:
            raise RuntimeError(f"connector plugin {name!r} could not be imported: {e}") from e
        _loaded.add(name)
        done.append(name)
    return done


def _ensure_env_plugins() -> None:
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        load_plugins(plugin_modules_from_env())


def known_kinds() -> dict[str, tuple[bool, bool]]:
    """Every kind this process can serve: kind -> (has a source, has a target)."""
    _ensure_env_plugins()
    kinds = {k: (True, True) for k in _BUILTIN}
    for k in set(_sources) | set(_targets):
        kinds[k] = (k in _sources, k in _targets)
    return dict(sorted(kinds.items()))


def _builtin_class(kind: str, role: int) -> Any:
    module, _, name = _BUILTIN[kind][role].partition(":")
    return getattr(importlib.import_module(module), name)


def _supported(role: int) -> str:
    return ", ".join(k for k, roles in known_kinds().items() if roles[role])


def source_for(info: PlatformInfo, secret: dict[str, str]) -> Source:
    kind = str(info.kind)
    if kind in _BUILTIN:
        return cast(Source, _builtin_class(kind, 0)(info, secret))
    if kind not in _sources:
        _ensure_env_plugins()
    factory = _sources.get(kind)
    if factory is not None:
        return factory(info, secret)
    raise PermanentError(
        f"platform {info.name!r} is of kind {kind!r}, which has no source "
        f"connector in this version (supported as source: {_supported(0)})"
    )


def target_for(info: PlatformInfo, secret: dict[str, str]) -> Target:
    kind = str(info.kind)
    if kind in _BUILTIN:
        return cast(Target, _builtin_class(kind, 1)(info, secret))
    if kind not in _targets:
        _ensure_env_plugins()
    factory = _targets.get(kind)
    if factory is not None:
        return factory(info, secret)
    raise PermanentError(
        f"platform {info.name!r} is of kind {kind!r}, which has no target "
        f"connector in this version (supported as target: {_supported(1)})"
    )


def _factories(kind: str) -> list[Any]:
    if kind in _BUILTIN:
        return [_builtin_class(kind, 0), _builtin_class(kind, 1)]
    _ensure_env_plugins()
    return [f for f in (_sources.get(kind), _targets.get(kind)) if f is not None]


def config_model(kind: str) -> type[BaseModel] | None:
    """The pydantic model of the platform config a kind accepts (a connector class's
    ``config_model``: one for the platform, used as source and as target), or None
    where the connector does not declare one (its config is then not checked here)."""
    for factory in _factories(str(kind)):
        model = getattr(factory, "config_model", None)
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model
    return None


def validate_config(kind: str, config: dict[str, Any]) -> None:
    """Refuse a platform config its connector would not understand: an unknown key
    (listing the known ones) or a value of the wrong form. ValueError with the text."""
    model = config_model(kind)
    if model is None:
        return
    known = sorted(model.model_fields)
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} for a {kind} platform; known: "
                         f"{', '.join(known)}")
    try:
        model.model_validate(config)
    except ValidationError as e:
        from transcend.validation import describe

        raise ValueError(f"config: {describe(e, model)}") from e


def declared_capabilities(kind: str, role: str) -> Capabilities:
    """What a kind's source or target connector class declares, without constructing
    one (no platform, no connection): for planning and tests. A plugin whose factory is
    not a class with ``capabilities`` declares nothing here."""
    index = {"source": 0, "target": 1}[role]
    k = str(kind)
    if k in _BUILTIN:
        factory: Any = _builtin_class(k, index)
    else:
        _ensure_env_plugins()
        factory = (_sources if index == 0 else _targets).get(k)
    return capabilities_of(factory)

"""The plugin manager: built-ins, entry points, and modules named in the config.

A manager is built per app (never a module global), the registry hooks are
called once, and the objects built from them are then called directly.
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec
import pluggy

from gateway import hookspecs
from gateway.config import Config, ConfigError, DestinationConfig, TransformConfig, node_of, to_struct
from gateway.http_client import HttpClient, HttpPool, Throttle
from gateway.plugin_classes import Destination, Transform

#: built-in plugins: ordinary plugin modules with exactly a third party's power
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.file",
    "plugins.webhook",
    "plugins.transforms",
    "plugins.customerio",
)
ENTRY_POINT_GROUP = "gateway"


def make_manager(extra: list[str] | tuple[str, ...] = ()) -> pluggy.PluginManager:
    """A fresh manager: built-ins, the ``gateway`` entry points, then ``extra``
    modules.  A hook implementation that matches no hook (a misspelling) or
    takes arguments its hook does not have is a ConfigError naming the plugin."""
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    try:
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name in extra:
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"plugins: cannot import {name!r}: {e}") from None
            if pm.is_registered(module):
                continue
            pm.register(module, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise ConfigError(f"plugins: {e}") from None
    return pm


class Registry(msgspec.Struct):
    """Types by their ``type`` string, and which plugin provided each."""

    destinations: dict[str, type[Destination]]
    transforms: dict[str, type[Transform]]
    provider: dict[str, str]  # "destination:file" -> plugin name

    def plugins(self, pm: pluggy.PluginManager) -> dict[str, list[str]]:
        """Plugin name -> what it provides, for ``gateway check``."""
        out: dict[str, list[str]] = {pm.get_name(p) or repr(p): [] for p in pm.get_plugins()}
        for key, plugin in sorted(self.provider.items()):
            out.setdefault(plugin, []).append(key)
        return out


def _check_type(cls: Any, base: type, plugin_name: str) -> None:
    """A registered type must be a subclass of its base with a ``type`` string
    and a Struct of ``Settings``: said at start, naming the plugin."""
    what = f"register_{base.__name__.lower()}s of plugin {plugin_name}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what} returned {cls!r}, which is not a subclass of gateway.api.{base.__name__}")
    if not isinstance(getattr(cls, "type", None), str) or not cls.type:
        raise ConfigError(f"{what}: {cls.__name__} has no type string")
    settings = getattr(cls, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, msgspec.Struct)):
        raise ConfigError(f"{what}: {cls.__name__}.Settings is not a msgspec.Struct")


def build_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry({}, {}, {})
    for kind, hook, table in (("destination", pm.hook.register_destinations, reg.destinations),
                              ("transform", pm.hook.register_transforms, reg.transforms)):
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name
            for cls in impl.function() or ():
                _check_type(cls, Destination if kind == "destination" else Transform, plugin_name)
                key = f"{kind}:{cls.type}"
                if key in reg.provider:
                    raise ConfigError(f"{kind} type {cls.type!r} is provided twice: by "
                                      f"{reg.provider[key]} and by {plugin_name}")
                table[cls.type] = cls
                reg.provider[key] = plugin_name
    return reg


def build_transform(reg: Registry, tc: TransformConfig, where: str, root: Any = None) -> Transform:
    cls = reg.transforms.get(tc.type)
    if cls is None:
        raise ConfigError(f"{where}.type: unknown transform type {tc.type!r} "
                          f"(known: {', '.join(sorted(reg.transforms))})")
    settings = to_struct(tc.settings, cls.Settings, root, f"{where}.settings: ", f"$.{where}.settings")
    return cls(settings)


class BuiltDestination(msgspec.Struct):
    """One configured destination, built: its object, its transforms and the
    rate limit its HTTP client waits on (the engine reads it too)."""

    config: DestinationConfig
    destination: Destination
    transforms: list[Transform]
    throttle: Throttle


def build_destination(reg: Registry, dc: DestinationConfig, where: str, pool: HttpPool,
                      root: Any = None) -> BuiltDestination:
    cls = reg.destinations.get(dc.type)
    if cls is None:
        raise ConfigError(f"{where}.type: unknown destination type {dc.type!r} "
                          f"(known: {', '.join(sorted(reg.destinations))})")
    settings = to_struct(dc.settings, cls.Settings, root, f"{where} ({dc.name}).settings: ", f"$.{where}.settings")
    rl, lim = dc.rate_limit, cls.limits
    throttle = Throttle(rl.requests, rl.per_seconds) if rl else Throttle(lim.rate_requests, lim.rate_period)
    dest = cls(dc.name, settings, HttpClient(pool, throttle))
    transforms = [build_transform(reg, t, f"{where}.transforms[{j}]", root) for j, t in enumerate(dc.transforms)]
    return BuiltDestination(dc, dest, transforms, throttle)


class Built(msgspec.Struct):
    """Everything the config asks plugins for, built and ready to call."""

    pm: Any
    registry: Registry
    source_transforms: list[Transform]
    destinations: list[BuiltDestination]
    #: the connection pool every destination's HTTP client uses (closed at shutdown)
    http: HttpPool


def build(cfg: Config) -> Built:
    """Build plugin objects for a config; raises ConfigError naming the key.
    Nothing connects anywhere until a destination sends."""
    pm = make_manager(cfg.plugins)
    reg = build_registry(pm)
    root = node_of(cfg)
    src = [build_transform(reg, t, f"transforms[{i}]", root) for i, t in enumerate(cfg.transforms)]
    pool = HttpPool()
    dests = [build_destination(reg, dc, f"destinations[{i}]", pool, root) for i, dc in enumerate(cfg.destinations)]
    return Built(pm, reg, src, dests, pool)

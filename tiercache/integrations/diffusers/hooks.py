"""Attaching diffusers ModelHooks so that taking them off leaves a module exactly as it was: no hook registry that
tiercache created and no instance `forward` left behind, whatever order several handles are removed in."""

from __future__ import annotations

from typing import Any

import torch

from ._import import HookRegistry, ModelHook

CREATED = "_tiercache_created"  # set on a HookRegistry that tiercache made: removed with tiercache's last hook


class Attached:
    """Hooks registered under one name on some modules; `detach()` removes them and what registering added."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._modules: list[torch.nn.Module] = []

    def attach(self, module: torch.nn.Module, hook: ModelHook) -> None:
        created = not hasattr(module, "_diffusers_hook")
        registry: Any = HookRegistry.check_if_exists_or_initialize(module)
        if created:
            setattr(registry, CREATED, True)
        registry.register_hook(hook, self.name)
        self._modules.append(module)

    def detach(self) -> None:
        for module in reversed(self._modules):
            registry: Any = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(self.name, recurse=False)
            if registry.hooks:
                continue
            # No hook left: the registry put the class's forward back as an instance attribute; drop it, and the
            # registry itself where tiercache made it (one diffusers made, e.g. by cache_context, stays).
            own = module.__dict__.get("forward")
            if getattr(own, "__func__", None) is type(module).forward and getattr(own, "__self__", None) is module:
                del module.__dict__["forward"]
            if getattr(registry, CREATED, False):
                del module._diffusers_hook
        self._modules.clear()

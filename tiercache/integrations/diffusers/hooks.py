"""Attaching diffusers ModelHooks so that taking them off leaves a module exactly as it was: no hook registry and no
instance `forward` left behind where there was none."""

from __future__ import annotations

from typing import Any

import torch

from ._import import HookRegistry, ModelHook


class Attached:
    """Hooks registered under one name on some modules; `detach()` removes them and what registering added."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._modules: list[tuple[torch.nn.Module, bool, bool]] = []  # module, had a registry, had its own forward

    def attach(self, module: torch.nn.Module, hook: ModelHook) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, self.name)
        self._modules.append((module, had_registry, had_forward))

    def detach(self) -> None:
        for module, had_registry, had_forward in reversed(self._modules):
            registry: Any = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(self.name, recurse=False)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
                if not had_forward:
                    module.__dict__.pop("forward", None)
        self._modules.clear()

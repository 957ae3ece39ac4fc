"""diffusers itself, or an ImportError that says how to install it."""

from __future__ import annotations

try:
    import diffusers
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
except ImportError as exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        "tiercache.integrations.diffusers needs diffusers 0.42: pip install 'tiercache-gpu[diffusers]'"
    ) from exc

__all__ = ["HookRegistry", "ModelHook", "WanAttnProcessor", "WanTransformer3DModel", "diffusers"]

"""Backends: where tokens come from. One protocol (`base.Backend`), one module per backend."""

from __future__ import annotations

from ..config import Settings
from .base import Backend, Token

__all__ = ["Backend", "Token", "build_backend"]


def build_backend(settings: Settings) -> Backend:
    """The backend the configuration asks for. Imports only what that backend needs."""
    if settings.backend == "local":
        from .local import LocalBackend

        return LocalBackend.from_settings(settings)
    if settings.backend == "tgi":
        from .tgi import TGIBackend

        return TGIBackend.from_settings(settings)
    if settings.backend == "openai":
        from .openai_compat import OpenAIBackend

        return OpenAIBackend.from_settings(settings)
    if settings.backend == "sagemaker":
        from .sagemaker import SageMakerBackend

        return SageMakerBackend.from_settings(settings)
    from ..errors import ConfigError

    raise ConfigError(f"backend {settings.backend!r} is not available in this version")

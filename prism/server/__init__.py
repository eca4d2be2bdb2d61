"""OpenAI-compatible HTTP API, admin API and metrics over a registry of served models."""

from prism.server.app import create_app
from prism.server.registry import ModelRegistry, ModelSpec, ModelState, ServedModel

__all__ = ["ModelRegistry", "ModelSpec", "ModelState", "ServedModel", "create_app"]

"""Container engines: ``base.Engine`` and one module per implementation."""

from .base import Channel, Engine, ResourceInfo, SandboxSpec, SandboxState

__all__ = ["Channel", "Engine", "ResourceInfo", "SandboxSpec", "SandboxState"]

"""`allocator.client`: the planning-service client (`allocator.service.client`), importable
without torch."""

from .service.client import Client, ServiceError

__all__ = ["Client", "ServiceError"]

"""The clients' namespaces (`c.adapters`, `c.saes`, `c.presets`, `c.vectors`): each call is an endpoint of
endpoints.py, run by the client that owns the namespace (blocking or async)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from . import endpoints as E
from . import protocol as P
from . import protocol_steer as PS

if TYPE_CHECKING:
    from .client import AsyncSaeloraClient, SaeloraClient


class _Adapters:
    def __init__(self, c: SaeloraClient) -> None:
        self.c = c

    def list(self) -> P.AdapterList:
        return self.c.run(E.list_adapters())

    def load(self, name: str, path: str) -> dict[str, Any]:
        return self.c.run(E.load_adapter(name, path))

    def unload(self, name: str) -> dict[str, Any]:
        return self.c.run(E.unload_adapter(name))


class _Presets:
    """Steering presets: `list`, `get`, `put` (admin key, when the server has one), `delete`."""

    def __init__(self, c: SaeloraClient) -> None:
        self.c = c

    def list(self) -> P.PresetList:
        return self.c.run(E.list_presets())

    def get(self, name: str) -> P.PresetInfo:
        return self.c.run(E.get_preset(name))

    def put(self, name: str, edits: Sequence[P.SAEEdit | P.SAEVectorEdit], mode: str = "error_term") -> P.PresetInfo:
        return self.c.run(E.put_preset(name, edits, mode))

    def delete(self, name: str) -> dict[str, Any]:
        return self.c.run(E.delete_preset(name))


class _Vectors:
    """Steering vectors: `list`, `get`, `put` (numbers, or DiffMean of two text sets; admin key), `delete`."""

    def __init__(self, c: SaeloraClient) -> None:
        self.c = c

    def list(self) -> PS.VectorList:
        return self.c.run(E.list_vectors())

    def get(self, name: str) -> PS.VectorInfo:
        return self.c.run(E.get_vector(name))

    def put(self, name: str, values: Sequence[float] | None = None, positive: Sequence[str] | None = None,
            negative: Sequence[str] | None = None, sae: str | None = None) -> PS.VectorInfo:
        return self.c.run(E.put_vector(name, values, positive, negative, sae))

    def delete(self, name: str) -> dict[str, Any]:
        return self.c.run(E.delete_vector(name))


class _SAEs:
    def __init__(self, c: SaeloraClient) -> None:
        self.c = c

    def list(self) -> P.SAEList:
        return self.c.run(E.list_saes())


class _AsyncPresets:
    def __init__(self, c: AsyncSaeloraClient) -> None:
        self.c = c

    async def list(self) -> P.PresetList:
        return await self.c.run(E.list_presets())

    async def get(self, name: str) -> P.PresetInfo:
        return await self.c.run(E.get_preset(name))

    async def put(self, name: str, edits: Sequence[P.SAEEdit | P.SAEVectorEdit],
                  mode: str = "error_term") -> P.PresetInfo:
        return await self.c.run(E.put_preset(name, edits, mode))

    async def delete(self, name: str) -> dict[str, Any]:
        return await self.c.run(E.delete_preset(name))


class _AsyncAdapters:
    def __init__(self, c: AsyncSaeloraClient) -> None:
        self.c = c

    async def list(self) -> P.AdapterList:
        return await self.c.run(E.list_adapters())

    async def load(self, name: str, path: str) -> dict[str, Any]:
        return await self.c.run(E.load_adapter(name, path))

    async def unload(self, name: str) -> dict[str, Any]:
        return await self.c.run(E.unload_adapter(name))


class _AsyncVectors:
    def __init__(self, c: AsyncSaeloraClient) -> None:
        self.c = c

    async def list(self) -> PS.VectorList:
        return await self.c.run(E.list_vectors())

    async def get(self, name: str) -> PS.VectorInfo:
        return await self.c.run(E.get_vector(name))

    async def put(self, name: str, values: Sequence[float] | None = None, positive: Sequence[str] | None = None,
                  negative: Sequence[str] | None = None, sae: str | None = None) -> PS.VectorInfo:
        return await self.c.run(E.put_vector(name, values, positive, negative, sae))

    async def delete(self, name: str) -> dict[str, Any]:
        return await self.c.run(E.delete_vector(name))


class _AsyncSAEs:
    def __init__(self, c: AsyncSaeloraClient) -> None:
        self.c = c

    async def list(self) -> P.SAEList:
        return await self.c.run(E.list_saes())

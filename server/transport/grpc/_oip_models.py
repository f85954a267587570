"""The Open Inference Protocol's server, model and model repository RPCs: what is served, in
which versions and states, and Triton's repository extension (index, load, unload)."""

from __future__ import annotations

from typing import Any

import grpc

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.server._settings import Settings
from rnnstream.server.core import Engine, InvalidArgument, ModelInfo, NotFound, quoted
from rnnstream.server.transport.grpc._oip_config import (
    model_config,
    model_metadata,
    model_statistics,
    parse_version,
)
from rnnstream.server.transport.grpc._status import unary

__all__ = ["EXTENSIONS", "MODEL_METHODS", "ModelRpcs"]

Context = grpc.aio.ServicerContext[Any, Any]
EXTENSIONS = ("model_configuration", "model_repository", "sequence", "statistics")
# (request, response) of each RPC here, for the servicer's method handlers.
MODEL_METHODS = {
    "ServerLive": (oip.ServerLiveRequest, oip.ServerLiveResponse),
    "ServerReady": (oip.ServerReadyRequest, oip.ServerReadyResponse),
    "ModelReady": (oip.ModelReadyRequest, oip.ModelReadyResponse),
    "ServerMetadata": (oip.ServerMetadataRequest, oip.ServerMetadataResponse),
    "ModelMetadata": (oip.ModelMetadataRequest, oip.ModelMetadataResponse),
    "ModelConfig": (oip.ModelConfigRequest, oip.ModelConfigResponse),
    "ModelStatistics": (oip.ModelStatisticsRequest, oip.ModelStatisticsResponse),
    "RepositoryIndex": (oip.RepositoryIndexRequest, oip.RepositoryIndexResponse),
    "RepositoryModelLoad": (oip.RepositoryModelLoadRequest, oip.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (
        oip.RepositoryModelUnloadRequest,
        oip.RepositoryModelUnloadResponse,
    ),
}


def _no_parameters(parameters: Any, allowed: tuple[str, ...] = ()) -> None:
    unknown = sorted(k for k in parameters if k not in allowed)
    if unknown:
        raise InvalidArgument(
            f"parameters {[quoted(k) for k in unknown]} are not taken here: rnnstream loads "
            "models from the repository's files only (no config or file overrides)"
        )


def _version_text(version: int) -> str:
    return str(version) if version else ""  # 0: the model folder itself, no version


class ModelRpcs:
    """Mixed into the OIP servicer, which sets these."""

    _engine: Engine
    _settings: Settings
    _version: str

    def _model(self, name: str, version: str) -> ModelInfo:
        """The model's newest ready version, or the version named."""
        return self._engine.model(name, parse_version(version))

    @unary
    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Context
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Context
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._engine.ready)

    @unary
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Context
    ) -> oip.ModelReadyResponse:
        wanted = parse_version(request.version)
        ready = self._engine.ready and any(
            s.state == "READY" and wanted in (None, s.version)
            for s in self._engine.repository_index(ready_only=True)
            if s.model == request.name
        )
        return oip.ModelReadyResponse(ready=ready)

    @unary
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="rnnstream", version=self._version, extensions=list(EXTENSIONS)
        )

    @unary
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        return model_metadata(self._model(request.name, request.version))

    @unary
    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: Context
    ) -> oip.ModelConfigResponse:
        model = self._model(request.name, request.version)
        return oip.ModelConfigResponse(config=model_config(model, self._settings))

    @unary
    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: Context
    ) -> oip.ModelStatisticsResponse:
        """Per ready version (of the model named, or of every model), since it was loaded."""
        engine = self._engine
        if request.name:
            if request.version:
                self._model(request.name, request.version)  # NotFound names what is served
                targets = [(request.name, int(request.version))]
            else:
                targets = [(request.name, v.version) for v in self._ready(request.name)]
        else:
            targets = [(s.model, s.version) for s in engine.repository_index(ready_only=True)]
        return oip.ModelStatisticsResponse(
            model_stats=[model_statistics(n, v, engine.model_stats(n, v)) for n, v in targets]
        )

    def _ready(self, name: str) -> list[Any]:
        ready = [s for s in self._engine.repository_index(ready_only=True) if s.model == name]
        if not ready:
            self._engine.model(name)  # raises, saying why (unknown, or no ready version)
        return ready

    # -- the model repository extension ----------------------------------------------------------
    @unary
    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: Context
    ) -> oip.RepositoryIndexResponse:
        """Every model version of the repository, loaded or not (rnnstream serves one
        repository: repository_name is not read)."""
        index = self._engine.repository_index(request.ready)
        entry = oip.RepositoryIndexResponse.ModelIndex
        models = [
            entry(
                name=s.model,
                version=str(s.version) if s.version else "",
                state=s.state,
                reason=s.reason,
            )
            for s in index
        ]
        return oip.RepositoryIndexResponse(models=models)

    @unary
    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: Context
    ) -> oip.RepositoryModelLoadResponse:
        """Load or reload (explicit control mode): live sessions stay on their versions."""
        _no_parameters(request.parameters)
        if not request.model_name:
            raise NotFound("model_name is empty: name the model to load")
        await self._engine.load_model(request.model_name)
        return oip.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: Context
    ) -> oip.RepositoryModelUnloadResponse:
        """Retire every version (explicit control mode): live sessions drain."""
        _no_parameters(request.parameters, ("unload_dependents",))  # no ensembles: nothing to do
        if not request.model_name:
            raise NotFound("model_name is empty: name the model to unload")
        await self._engine.unload_model(request.model_name)
        return oip.RepositoryModelUnloadResponse()

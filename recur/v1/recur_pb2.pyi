import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "cell", "head", "input_kind", "feature_dim", "vocabulary", "unk_id", "labels", "state", "layers", "hidden_size", "classes", "metrics", "live_sessions")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    UNK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    cell: str
    head: str
    input_kind: str
    feature_dim: int
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    unk_id: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    state: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    layers: int
    hidden_size: int
    classes: int
    metrics: _containers.ScalarMap[str, float]
    live_sessions: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., cell: _Optional[str] = ..., head: _Optional[str] = ..., input_kind: _Optional[str] = ..., feature_dim: _Optional[int] = ..., vocabulary: _Optional[_Iterable[str]] = ..., unk_id: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., state: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., classes: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., live_sessions: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "version", "session_id", "ttl_seconds", "initial_state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    session_id: str
    ttl_seconds: int
    initial_state: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., session_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., initial_state: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "model", "version", "offset", "created_at", "updated_at", "expires_at", "state", "tenant")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    offset: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    state: _containers.RepeatedCompositeFieldContainer[Tensor]
    tenant: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_state")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_state: bool
    def __init__(self, session_id: _Optional[str] = ..., include_state: _Optional[bool] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    ttl_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "text", "features", "expected_offset", "top_k", "return_logits", "final_only", "return_state", "request_id", "compact", "return_activations", "activation_layers", "activation_units", "activation_states")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    FINAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    RETURN_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_UNITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_STATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    features: bytes
    expected_offset: int
    top_k: int
    return_logits: bool
    final_only: bool
    return_state: bool
    request_id: str
    compact: bool
    return_activations: bool
    activation_layers: _containers.RepeatedScalarFieldContainer[int]
    activation_units: _containers.RepeatedScalarFieldContainer[int]
    activation_states: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., features: _Optional[bytes] = ..., expected_offset: _Optional[int] = ..., top_k: _Optional[int] = ..., return_logits: _Optional[bool] = ..., final_only: _Optional[bool] = ..., return_state: _Optional[bool] = ..., request_id: _Optional[str] = ..., compact: _Optional[bool] = ..., return_activations: _Optional[bool] = ..., activation_layers: _Optional[_Iterable[int]] = ..., activation_units: _Optional[_Iterable[int]] = ..., activation_states: _Optional[_Iterable[str]] = ...) -> None: ...

class StepOutput(_message.Message):
    __slots__ = ("argmax", "top_ids", "top_probs", "label", "text")
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_PROBS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    argmax: int
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_probs: _containers.RepeatedScalarFieldContainer[float]
    label: str
    text: str
    def __init__(self, argmax: _Optional[int] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_probs: _Optional[_Iterable[float]] = ..., label: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ChunkStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "offset", "replayed", "outputs", "text", "logits", "logits_shape", "state", "status", "request_id", "start_offset", "argmax", "activations")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    replayed: bool
    outputs: _containers.RepeatedCompositeFieldContainer[StepOutput]
    text: str
    logits: bytes
    logits_shape: _containers.RepeatedScalarFieldContainer[int]
    state: _containers.RepeatedCompositeFieldContainer[Tensor]
    status: ChunkStatus
    request_id: str
    start_offset: int
    argmax: _containers.RepeatedScalarFieldContainer[int]
    activations: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ..., replayed: _Optional[bool] = ..., outputs: _Optional[_Iterable[_Union[StepOutput, _Mapping]]] = ..., text: _Optional[str] = ..., logits: _Optional[bytes] = ..., logits_shape: _Optional[_Iterable[int]] = ..., state: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., status: _Optional[_Union[ChunkStatus, _Mapping]] = ..., request_id: _Optional[str] = ..., start_offset: _Optional[int] = ..., argmax: _Optional[_Iterable[int]] = ..., activations: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ...) -> None: ...

class StepBatchResponse(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepResponse]
    def __init__(self, steps: _Optional[_Iterable[_Union[StepResponse, _Mapping]]] = ...) -> None: ...

class PackedStepBatch(_message.Message):
    __slots__ = ("session_ids", "expected_offsets", "lengths", "tokens", "features", "return_logits", "final_only", "top_k", "request_id", "return_activations", "activation_layers", "activation_units", "activation_states")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    FINAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_UNITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_STATES_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    expected_offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    tokens: bytes
    features: bytes
    return_logits: bool
    final_only: bool
    top_k: int
    request_id: str
    return_activations: bool
    activation_layers: _containers.RepeatedScalarFieldContainer[int]
    activation_units: _containers.RepeatedScalarFieldContainer[int]
    activation_states: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., expected_offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., tokens: _Optional[bytes] = ..., features: _Optional[bytes] = ..., return_logits: _Optional[bool] = ..., final_only: _Optional[bool] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., return_activations: _Optional[bool] = ..., activation_layers: _Optional[_Iterable[int]] = ..., activation_units: _Optional[_Iterable[int]] = ..., activation_states: _Optional[_Iterable[str]] = ...) -> None: ...

class PackedStepBatchResponse(_message.Message):
    __slots__ = ("offsets", "start_offsets", "failed", "statuses", "replayed", "argmax", "logits", "logits_shape", "top_ids", "top_probs", "request_id", "activations")
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    START_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_PROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    start_offsets: _containers.RepeatedScalarFieldContainer[int]
    failed: _containers.RepeatedScalarFieldContainer[int]
    statuses: _containers.RepeatedCompositeFieldContainer[ChunkStatus]
    replayed: _containers.RepeatedScalarFieldContainer[int]
    argmax: bytes
    logits: bytes
    logits_shape: _containers.RepeatedScalarFieldContainer[int]
    top_ids: bytes
    top_probs: bytes
    request_id: str
    activations: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, offsets: _Optional[_Iterable[int]] = ..., start_offsets: _Optional[_Iterable[int]] = ..., failed: _Optional[_Iterable[int]] = ..., statuses: _Optional[_Iterable[_Union[ChunkStatus, _Mapping]]] = ..., replayed: _Optional[_Iterable[int]] = ..., argmax: _Optional[bytes] = ..., logits: _Optional[bytes] = ..., logits_shape: _Optional[_Iterable[int]] = ..., top_ids: _Optional[bytes] = ..., top_probs: _Optional[bytes] = ..., request_id: _Optional[str] = ..., activations: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "prompt_tokens", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "expected_offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    expected_offset: int
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., expected_offset: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "text", "offset", "done", "finish_reason")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    offset: int
    done: bool
    finish_reason: str
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ..., offset: _Optional[int] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionBlob(_message.Message):
    __slots__ = ("blob",)
    BLOB_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    def __init__(self, blob: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("blob", "session_id", "force")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    session_id: str
    force: bool
    def __init__(self, blob: _Optional[bytes] = ..., session_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class MigrateSessionRequest(_message.Message):
    __slots__ = ("session_id", "version", "expected_offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    expected_offset: int
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., expected_offset: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model", "changed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    changed: bool
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name", "version", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    force: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., force: _Optional[bool] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("sessions_stranded",)
    SESSIONS_STRANDED_FIELD_NUMBER: _ClassVar[int]
    sessions_stranded: int
    def __init__(self, sessions_stranded: _Optional[int] = ...) -> None: ...

class ReloadRepositoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefusedModel(_message.Message):
    __slots__ = ("path", "name", "version", "reason")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    version: int
    reason: str
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReloadRepositoryResponse(_message.Message):
    __slots__ = ("loaded", "refused")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedModel]
    def __init__(self, loaded: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[RefusedModel, _Mapping]]] = ...) -> None: ...

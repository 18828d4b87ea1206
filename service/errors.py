"""The one error hierarchy of the serving core. Each error names its gRPC code
(as a string, so the core stays transport-free); the servicer maps it in one place.
Messages are written for the client: they say what is wrong and what to do."""

from __future__ import annotations


class RecurError(Exception):
    code = "INTERNAL"


class InvalidInput(RecurError):
    code = "INVALID_ARGUMENT"


class NotFound(RecurError):
    code = "NOT_FOUND"


class SessionNotFound(NotFound):
    pass


class SessionExpired(NotFound):
    pass


class ModelNotFound(NotFound):
    pass


class AlreadyExists(RecurError):
    code = "ALREADY_EXISTS"


class OffsetMismatch(RecurError):
    """The chunk named an offset the session is not at."""

    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, actual: int) -> None:
        super().__init__(message)
        self.actual = actual


class NoOutputYet(RecurError):
    code = "FAILED_PRECONDITION"


class LimitExceeded(RecurError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(RecurError):
    code = "UNAVAILABLE"


class Unauthenticated(RecurError):
    """No API key, or one the server does not know (service/auth.py)."""

    code = "UNAUTHENTICATED"


class ModelInvalid(RecurError):
    """A model directory whose manifest and graph disagree (raised at load)."""

    code = "FAILED_PRECONDITION"


class StoreConflict(RecurError):
    """Compare-and-set lost: the stored offset is not the one this write started from."""

    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, actual: int | None) -> None:
        super().__init__(message)
        self.actual = actual


class DeadlineExceeded(RecurError):
    """The call's deadline passed before its chunk ran; the chunk was not applied."""

    code = "DEADLINE_EXCEEDED"


class ModelUnloaded(RecurError):
    """A session's model version was unloaded (forced while sessions used it)."""

    code = "FAILED_PRECONDITION"


class ModelMismatch(RecurError):
    """The importing server's model is not the exporting server's (their sha256 differ)."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(RecurError):
    """A known caller asking for what its key does not allow (the admin API without an admin key)."""

    code = "PERMISSION_DENIED"


class ActivationsUnavailable(RecurError):
    """Activations were asked of a model exported without them."""

    code = "FAILED_PRECONDITION"


class VersionMismatch(RecurError):
    """A session cannot move to a version whose state tensors differ from its own."""

    code = "FAILED_PRECONDITION"


class VersionInUse(RecurError):
    """A version cannot be unloaded while live sessions use it (unless forced)."""

    code = "FAILED_PRECONDITION"

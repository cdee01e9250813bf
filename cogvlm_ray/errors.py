"""Exceptions with a clear HTTP meaning.

Everything that rejects a request raises one of these; `serve/ingress.py` maps them to the
OpenAI error body (`{"error": {"message", "type", "param", "code"}}`) in one helper. Library
code below the API layer (preprocess, engine) raises them too, so an error keeps its status
across Ray hops (these classes pickle cleanly: all state lives in `args`/attributes set in
`__init__`).
"""

from __future__ import annotations


class CogVLMError(Exception):
    """Base class. `status_code` and `error_type` follow the OpenAI API conventions."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):  # keep keyword-only fields across pickling (Ray hops)
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(cls: type[CogVLMError], message: str, param: str | None, code: str | None) -> CogVLMError:
    return cls(message, param=param, code=code)


class InvalidRequestError(CogVLMError):
    """400: the request is well-formed JSON but asks for something we cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class ImageError(InvalidRequestError):
    """400: an image could not be fetched, decoded or accepted (the message names why)."""

    def __init__(self, message: str, *, param: str | None = "messages", code: str | None = "invalid_image"):
        super().__init__(message, param=param, code=code)


class GrammarError(InvalidRequestError):
    """400: a structured-output spec that cannot be compiled (bad or unsupported schema, regex,
    choice list, or one over the compile time / size bounds); the message names what is wrong."""

    def __init__(
        self, message: str, *, param: str | None = "response_format", code: str | None = "invalid_grammar"
    ):
        super().__init__(message, param=param, code=code)


class PromptTooLongError(InvalidRequestError):
    """400: prompt tokens + max_tokens exceed the context window."""

    def __init__(
        self, message: str, *, param: str | None = "messages", code: str | None = "context_length_exceeded"
    ):
        super().__init__(message, param=param, code=code)


class AuthenticationError(CogVLMError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFoundError(CogVLMError):
    status_code = 404
    error_type = "not_found_error"


class RequestTooLargeError(CogVLMError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(CogVLMError):
    """429: a queue is full. `retry_after_s` becomes the Retry-After header."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after_s: int = 1


class ServiceUnavailableError(CogVLMError):
    status_code = 503
    error_type = "service_unavailable"


class RequestTimeoutError(CogVLMError):
    status_code = 504
    error_type = "timeout_error"


class EngineDeadError(ServiceUnavailableError):
    """503: the engine loop stopped; the replica's health check fails and Serve replaces it."""

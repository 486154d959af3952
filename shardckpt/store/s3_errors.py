"""What an S3 failure means, and the error of ours a user sees for it (#17.12c/d, #18.5).

botocore raises many types for one cause (a connection dropped mid-body is an
``IncompleteReadError``, a ``ResponseStreamingError`` or a raw urllib3 ``ProtocolError``
depending on where the read was when it broke). They are classified here, once:

* transient, retried with backoff by ``s3.retrying``: HTTP 5xx and throttling, connections
  reset, closed or dropped mid-body, timeouts, and an endpoint that cannot be reached at
  all (``EndpointConnectionError``, ``ConnectTimeoutError``: a server restarting, a network
  blip), the last retried for at most ``UNREACHABLE_SECONDS`` outside a save's deadline;
* answers the store acts on (an object missing, a conditional write that lost): left as
  they are for the store's own code;
* anything else, and a transient failure whose retries are spent: ``CheckpointError``
  naming the bucket or the endpoint and what was asked (a missing bucket, bad
  credentials, access denied), never a raw botocore exception.
"""

from __future__ import annotations

import http.client

from shardckpt.errors import CheckpointError

TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                   "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "RequestLimitExceeded", "TooManyRequestsException", "BadDigest"}
MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}

#: Seconds an endpoint that refuses every connection is retried outside a save (a save retries
#: until its ``save_timeout`` deadline): long enough for a restarting server, short enough that
#: a mistyped endpoint is reported within a minute.
UNREACHABLE_SECONDS = 30.0


def code(e: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for anything else)."""
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _botocore():
    try:
        from botocore import exceptions
    except ImportError:  # pragma: no cover - boto3 is what raised it
        return None
    return exceptions


def _urllib3_errors() -> tuple:
    try:
        from urllib3.exceptions import ProtocolError, TimeoutError
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        return ()
    return (ProtocolError, TimeoutError)


def unreachable(e: BaseException) -> bool:
    """No connection could be made to the endpoint at all (refused, unresolvable, timed out)."""
    b = _botocore()
    return b is not None and isinstance(e, b.ConnectionError) and not isinstance(e, b.SSLError)


def transient(e: BaseException) -> bool:
    """Worth retrying (see module doc)."""
    b = _botocore()
    if b is None:
        return False
    if isinstance(e, (b.HTTPClientError, b.IncompleteReadError)) or unreachable(e):
        return True                      # connection reset, closed or dropped mid-body, timeouts
    if isinstance(e, b.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code(e) in TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(e, (ConnectionError, TimeoutError, http.client.IncompleteRead, *_urllib3_errors()))


def as_ours(e: BaseException, *, what: str, where: str, bucket: str, endpoint: str,
            waited: float) -> BaseException:
    """``e`` if it is ours already or an answer the store acts on (missing, conflict), else
    the CheckpointError a user sees: naming the bucket or endpoint at fault."""
    if isinstance(e, CheckpointError) or not isinstance(e, Exception):
        return e
    c = code(e)
    if c in MISSING_CODES or c in CONFLICT_CODES:
        return e
    if c == "NoSuchBucket":
        return CheckpointError(f"s3://{bucket}: no such bucket at {endpoint} (while reading or writing {where}); "
                               "create the bucket or correct the URI")
    if unreachable(e):
        return CheckpointError(f"the S3 endpoint {endpoint} cannot be reached (for {what} of {where}): "
                               f"{type(e).__name__}: {e}; retried for {waited:.0f} s. Check the endpoint "
                               "(?endpoint_url= or AWS_ENDPOINT_URL) and the network")
    if transient(e):
        return CheckpointError(f"{where}: {what} kept failing at {endpoint} ({type(e).__name__}: {e}); "
                               f"retried for {waited:.0f} s")
    if c in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return CheckpointError(f"{where}: {what} refused by {endpoint} ({c}): check the credentials and the "
                               f"permissions on bucket {bucket}")
    detail = f"{c}: {e}" if c else f"{type(e).__name__}: {e}"
    return CheckpointError(f"{where}: S3 {what} failed at {endpoint} ({detail})")

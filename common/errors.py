"""Stable error codes and reasons: the one place they are listed.

Every error reply carries ``code`` (what kind of failure), ``reason`` (which case of it) and a
human ``message``; scripts match on ``code``/``reason``, never on the message.
"""


class Code:
    """Error codes carried in ``code``."""

    BAD_FRAME = "BAD_FRAME"                # not msgpack, not a map, wrong frame count
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"    # body over the broker's max_frame_bytes
    BAD_VERSION = "BAD_VERSION"            # protocol major version differs
    UNKNOWN_VERB = "UNKNOWN_VERB"
    BAD_REQUEST = "BAD_REQUEST"            # missing/ill-typed field or value out of range
    VRAM_LEDGER_DENY = "VRAM_LEDGER_DENY"  # admission refused; carries the ledger numbers
    MODEL_ERROR = "MODEL_ERROR"            # unknown key, missing file, not a GGUF, load failure
    AGENT_EXISTS = "AGENT_EXISTS"
    UNKNOWN_AGENT = "UNKNOWN_AGENT"
    AGENT_LOST = "AGENT_LOST"              # registered once, but could not be restored
    STATE_LOST = "STATE_LOST"              # the agent's saved KV state could not be restored;
                                           # its conversation was reset (an expected restore
                                           # failure, not a bug)
    CONTEXT_FULL = "CONTEXT_FULL"          # prompt + n_predict would overflow the agent's n_ctx
    BUSY = "BUSY"                          # request queue full; carries queue_depth
    CANCELLED = "CANCELLED"                # a queued DECODE dropped by CANCEL
    DEADLINE = "DEADLINE"                  # a queued DECODE whose deadline passed first
    UNKNOWN_REQUEST = "UNKNOWN_REQUEST"    # CANCEL for a request not queued or running
    LIMIT = "LIMIT"                        # a configured limit (prompt tokens, agents per client)
    FORBIDDEN = "FORBIDDEN"                # a model path outside the model dirs; a wrong key
    QUOTA = "QUOTA"                        # a client's quota; carries quota, limit, use,
                                           # retry_after_s
    WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"
    WORKER_LOST = "WORKER_LOST"            # the worker died with this request in flight
    NO_CHAT_TEMPLATE = "NO_CHAT_TEMPLATE"  # CHAT on a model with no template and no override
    INTERNAL = "INTERNAL"                  # a bug: the handler raised; the broker keeps serving


class Reason:
    """Reasons carried in ``reason``, grouped by the code they refine."""

    CAP = "CAP"                            # VRAM_LEDGER_DENY: allocated + requested > cap
    NO_DEVICE_TOTAL = "NO_DEVICE_TOTAL"    # VRAM_LEDGER_DENY: the worker has not reported a size
    OTHER_PROCESSES = "OTHER_PROCESSES"    # VRAM_LEDGER_DENY: fits our cap, but other processes
                                           # on the device left too little free
    LIVE_LIMIT = "LIVE_LIMIT"              # per device in VRAM_LEDGER_DENY's devices: it fits,
                                           # but --max-live-contexts agents are live there
    NOT_READY = "NOT_READY"                # per device in VRAM_LEDGER_DENY's devices: its
                                           # worker is starting or lost
    UNKNOWN_KEY = "UNKNOWN_KEY"            # MODEL_ERROR
    NOT_FOUND = "NOT_FOUND"
    NOT_GGUF = "NOT_GGUF"
    CORRUPT = "CORRUPT"
    LOAD_FAILED = "LOAD_FAILED"
    CONTEXT_FAILED = "CONTEXT_FAILED"
    PROMPT_TOKENS = "PROMPT_TOKENS"        # LIMIT
    AGENTS_PER_CLIENT = "AGENTS_PER_CLIENT"
    PARK_BUDGET = "PARK_BUDGET"            # LIMIT: parked state past the host-memory budget
    OUTSIDE_MODEL_DIRS = "OUTSIDE_MODEL_DIRS"  # FORBIDDEN
    UNKNOWN_CLIENT_KEY = "UNKNOWN_CLIENT_KEY"  # FORBIDDEN: a key no client of --quotas has
    MAX_AGENTS = "MAX_AGENTS"              # QUOTA: the reason is the quota's name, upper case
    MAX_BOOKED_BYTES = "MAX_BOOKED_BYTES"
    MAX_N_CTX = "MAX_N_CTX"
    TOKENS_PER_MINUTE = "TOKENS_PER_MINUTE"
    MISSING_FIELD = "MISSING_FIELD"        # BAD_REQUEST
    BAD_TYPE = "BAD_TYPE"
    BAD_VALUE = "BAD_VALUE"


class LmxError(Exception):
    """An error that becomes (or came from) one error reply."""

    def __init__(self, code, message, reason="", **details):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def fields(self):
        """The reply fields for this error, without version and id."""
        return dict(self.details, status="error", code=self.code, reason=self.reason,
                    message=self.message)

    @classmethod
    def from_reply(cls, reply):
        """Rebuild the exception from an error reply dict."""
        skip = {"v", "id", "status", "code", "reason", "message"}
        details = {k: v for k, v in reply.items() if k not in skip}
        return cls(reply.get("code", Code.INTERNAL), reply.get("message", ""),
                   reply.get("reason", ""), **details)

    def __str__(self):
        tail = f"/{self.reason}" if self.reason else ""
        return f"{self.code}{tail}: {self.message}"

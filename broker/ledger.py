"""The VRAM ledger: a pure book of device bytes (no sockets, no clock, no threads).

cap = min(admission_percent x device total, total - bytes other processes hold - margin).
Every booking that grows goes through one check, allocated + requested <= cap, so the ledger
never goes over its cap by its own hand. Only the cap can move below what is allocated: when
other processes take device memory (admitted agents are never evicted for it).
"""
from dataclasses import dataclass

from lmx.common.errors import Code, LmxError, Reason


@dataclass(frozen=True)
class Denial:
    """Why a reservation was refused, with the numbers an operator needs."""

    reason: str
    ledger_max_bytes: int
    ledger_allocated_bytes: int
    requested_bytes: int

    def error(self, what):
        """The VRAM_LEDGER_DENY error for this denial."""
        free = self.ledger_max_bytes - self.ledger_allocated_bytes
        return LmxError(
            Code.VRAM_LEDGER_DENY,
            f"{what} needs {self.requested_bytes} bytes but only {max(free, 0)} of the "
            f"{self.ledger_max_bytes}-byte cap are free",
            self.reason, ledger_max_bytes=self.ledger_max_bytes,
            ledger_allocated_bytes=self.ledger_allocated_bytes,
            requested_bytes=self.requested_bytes)


class Ledger:
    """Bookings keyed by name (e.g. 'agent:smol'); allocated is always their sum."""

    def __init__(self, total_bytes=None, admission_percent=90):
        if not 0 < admission_percent <= 100:
            raise ValueError(f"admission percent must be in (0, 100], got {admission_percent}")
        self._bookings = {}
        self._allocated = 0
        self.admission_percent = admission_percent
        self.total_bytes = None
        self.external_bytes = None
        self.external_margin = 0
        if total_bytes is not None:
            self.set_total(total_bytes)

    @property
    def percent_cap(self):
        """Admission percent of the device total (0 while the total is unknown)."""
        if self.total_bytes is None:
            return 0
        return self.total_bytes * self.admission_percent // 100

    @property
    def max_bytes(self):
        """The cap: min(percent cap, total - bytes other processes hold - margin)."""
        cap = self.percent_cap
        if self.external_bytes is not None and self.total_bytes is not None:
            cap = min(cap, max(self.total_bytes - self.external_bytes - self.external_margin, 0))
        return cap

    def set_external(self, nbytes, margin=0):
        """Device bytes held outside this ledger (other processes), from a live reading."""
        self.external_bytes = None if nbytes is None else max(int(nbytes), 0)
        self.external_margin = margin

    @property
    def allocated_bytes(self):
        """Sum of all bookings."""
        return self._allocated

    def set_total(self, total_bytes):
        """Set the device total; existing bookings stay even if they now exceed the cap."""
        if total_bytes <= 0:
            raise ValueError(f"device total must be positive, got {total_bytes}")
        self.total_bytes = int(total_bytes)

    def try_reserve(self, key, nbytes):
        """Book nbytes under key if it fits; return None on success or a Denial."""
        return self.try_reserve_many({key: nbytes})

    def try_reserve_many(self, wanted):
        """Book every {key: bytes} or none of them; return None on success or a Denial."""
        if any(v < 0 for v in wanted.values()):
            raise ValueError(f"cannot book negative bytes ({wanted})")
        for key in wanted:
            if key in self._bookings:
                raise KeyError(f"ledger: {key!r} is already booked")
        denial = self._check(sum(wanted.values()))
        if denial is None:
            self._bookings.update(wanted)
            self._allocated += sum(wanted.values())
        return denial

    def try_resize(self, key, nbytes):
        """Change an existing booking to nbytes if the growth fits (shrinking always does);
        return None on success or a Denial."""
        if key not in self._bookings:
            raise KeyError(f"ledger: {key!r} is not booked")
        grow = nbytes - self._bookings[key]
        denial = self._check(grow) if grow > 0 else None
        if denial is None:
            self._allocated += grow
            self._bookings[key] = nbytes
        return denial

    def try_apply(self, changes):
        """Set every {key: bytes} (booking or resizing it) in one step if the net growth
        fits (a net shrink always does); return None on success or a Denial."""
        if any(v < 0 for v in changes.values()):
            raise ValueError(f"cannot book negative bytes ({changes})")
        grow = sum(v - self._bookings.get(k, 0) for k, v in changes.items())
        denial = self._check(grow) if grow > 0 else None
        if denial is None:
            self._bookings.update(changes)
            self._allocated += grow
        return denial

    def check(self, nbytes):
        """Whether nbytes more would fit now: None, or the Denial (nothing is booked)."""
        return self._check(nbytes) if nbytes > 0 else None

    def _check(self, nbytes):
        if self.total_bytes is None:
            return Denial(Reason.NO_DEVICE_TOTAL, 0, self._allocated, nbytes)
        if self._allocated + nbytes > self.max_bytes:
            # Say which limit refused it: our own cap, or memory other processes took.
            reason = Reason.CAP if self._allocated + nbytes > self.percent_cap \
                else Reason.OTHER_PROCESSES
            return Denial(reason, self.max_bytes, self._allocated, nbytes)
        return None

    def release(self, key):
        """Drop a booking and return its bytes (0 if there was none)."""
        nbytes = self._bookings.pop(key, 0)
        self._allocated -= nbytes
        return nbytes

    def booked(self, key):
        """Bytes booked under key, or None."""
        return self._bookings.get(key)

    def snapshot(self):
        """A copy of the numbers, for STATUS and tests."""
        return {"ledger_max_bytes": self.max_bytes,
                "ledger_allocated_bytes": self._allocated,
                "ledger_free_bytes": max(self.max_bytes - self._allocated, 0),
                "admission_percent": self.admission_percent,
                "ledger_percent_cap_bytes": self.percent_cap,
                "external_bytes": self.external_bytes,
                "device_total_bytes": self.total_bytes,
                "bookings": dict(self._bookings)}

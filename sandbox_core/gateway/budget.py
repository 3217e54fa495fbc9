"""Token budgets as reservations, so that concurrent calls cannot overshoot them.

Before a call is forwarded, :meth:`Ledger.reserve` books its worst case, the estimated input
tokens plus its ``max_tokens``, against the user's budget (``model.user_token_budget``) and
the run's (``model.request_token_budget``; the run is the ``agent.run`` or command the host
bound the call to). What is used plus what is booked never exceeds a budget: a call that
does not fit gets a smaller ``max_tokens`` (what is left after its input), and one for which
not even one output token is left is refused. When the call ends, :meth:`Ledger.settle`
replaces the booking with the usage the response reported.

The input estimate is the request body's size over :data:`BYTES_PER_TOKEN` (text runs at
about four bytes a token; images and documents in base64 are counted high). It is an
estimate: a reply that reports more input tokens than estimated is still settled at what it
reports, so the one call that does can exceed a budget by its estimate's error, never by
its output.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from sandbox_core.errors import GatewayError

BYTES_PER_TOKEN = 4
RUNS_KEPT = 4096
"""Runs whose usage is remembered (the oldest are forgotten first)."""


def estimate_input(body: bytes) -> int:
    """The input tokens a request body is booked for."""
    return (len(body) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


@dataclass
class Account:
    used: int = 0
    reserved: int = 0


@dataclass(frozen=True)
class Reservation:
    """What one call booked: on which accounts, how many tokens, and the ``max_tokens`` it got."""

    user: str
    run: tuple[str, str] | None
    tokens: int
    max_tokens: int


class Ledger:
    """Used and booked tokens per user and per run; every method is atomic (one lock)."""

    def __init__(self, user_budget: int, run_budget: int) -> None:
        self.user_budget = user_budget
        self.run_budget = run_budget
        self._lock = threading.Lock()
        self._users: dict[str, Account] = {}
        self._runs: OrderedDict[tuple[str, str], Account] = OrderedDict()

    def reserve(self, user: str, run: str | None, estimate: int, max_tokens: int) -> Reservation:
        """Book ``estimate`` + ``max_tokens`` (or less output, if that is all that is left), or refuse."""
        with self._lock:
            user_account = self._users.setdefault(user, Account())
            key = (user, run) if run is not None else None
            run_account = self._run(key) if key is not None else Account()
            granted = max_tokens
            for account, budget, setting, reason in (
                (user_account, self.user_budget, "model.user_token_budget", "user_budget"),
                (run_account, self.run_budget, "model.request_token_budget", "request_budget"),
            ):
                if not budget:
                    continue
                left = budget - account.used - account.reserved
                if left < estimate + (1 if max_tokens else 0) or left <= 0:
                    whose = f"user {user!r}" if reason == "user_budget" else "this run"
                    raise GatewayError(
                        f"refused: {whose} has used {account.used} of {budget} tokens and "
                        f"{account.reserved} are reserved by calls in flight; this call needs about "
                        f"{estimate + min(max_tokens, 1)} ({setting})",
                        data={"reason": reason, "used": account.used, "reserved": account.reserved},
                    )
                granted = min(granted, left - estimate)
            tokens = estimate + granted
            user_account.reserved += tokens
            if key is not None:
                run_account.reserved += tokens
            return Reservation(user, key, tokens, granted)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Replace a booking with the tokens the call really used."""
        with self._lock:
            accounts = [self._users.setdefault(reservation.user, Account())]
            if reservation.run is not None:
                accounts.append(self._run(reservation.run))
            for account in accounts:
                account.reserved = max(0, account.reserved - reservation.tokens)
                account.used += used

    def used(self, user: str, run: str | None = None) -> tuple[int, int]:
        """(used, reserved) of a user, or of one of their runs."""
        with self._lock:
            account = self._users.get(user) if run is None else self._runs.get((user, run))
            account = account or Account()
            return account.used, account.reserved

    def _run(self, key: tuple[str, str]) -> Account:
        account = self._runs.get(key)
        if account is None:
            account = self._runs[key] = Account()
            while len(self._runs) > RUNS_KEPT:
                oldest, old = next(iter(self._runs.items()))
                if old.reserved:  # never forget a run with calls in flight
                    break
                del self._runs[oldest]
        self._runs.move_to_end(key)
        return account

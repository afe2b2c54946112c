"""Who may act: one shared token, given once and then kept as a signed, expiring cookie.

Actions (rollout, rollback, re-provision) always need the token. Pages need it too unless the
dashboard listens on the loopback interface only, where the machine's own users can read it.
The cookie holds an expiry and an HMAC of it keyed by the token, so it proves the token was
given without holding it; restarting with another token voids every cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time

from provision.errors import BadInput

COOKIE = "claw_dashboard"


class AuthError(Exception):
    """401 (no or expired credentials) or 403 (wrong ones), with what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str:
    """The token to use: the given one, or a fresh one when listening on loopback only."""
    if token is not None and len(token) < 8:
        raise BadInput(f"--token: {len(token)} characters is too short (expected 8 or more)")
    if token:
        return token
    if not is_loopback(host):
        raise BadInput(f"--host {host}: listening beyond this machine needs --token (or "
                       "--host 127.0.0.1)")
    return secrets.token_urlsafe(18)


class Auth:
    def __init__(self, token: str, session_s: float, pages_open: bool) -> None:
        self.token, self.session_s, self.pages_open = token, session_s, pages_open

    def _sign(self, expiry: int) -> str:
        return hmac.new(self.token.encode(), str(expiry).encode(), hashlib.sha256).hexdigest()

    def cookie(self) -> str:
        expiry = int(time.time() + self.session_s)
        return f"{expiry}.{self._sign(expiry)}"

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def check(self, given: str | None, cookie: str | None) -> None:
        """Raise AuthError unless `given` is the token or `cookie` a live session."""
        if given:
            if not self.token_ok(given):
                raise AuthError(403, "wrong token")
            return
        if not cookie:
            raise AuthError(401, "a token is needed: open the link `claw fleet dashboard` "
                            "printed, or enter the token")
        expiry, _, mac = cookie.partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(mac, self._sign(int(expiry))):
            raise AuthError(403, "the session is not valid for this dashboard (restarted with "
                            "another token?): enter the token again")
        if int(expiry) < time.time():
            raise AuthError(401, "the session expired: enter the token again")

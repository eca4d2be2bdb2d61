"""`AdminClient`: the admin API from Python (what `prism ctl` uses), over stdlib urllib."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(RuntimeError):
    """The server refused (its error message, with the status) or could not be reached."""


class AdminClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s  # a wake maps and copies a model's weights: allow for it

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/admin/models")["models"])

    def wake(self, name: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/admin/models/{_quote(name)}/wake"))

    def sleep(self, name: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/admin/models/{_quote(name)}/sleep"))

    def limit(self, name: str, kv_bytes: int) -> dict[str, Any]:
        body = {"kv_bytes": kv_bytes}
        return dict(self._request("POST", f"/admin/models/{_quote(name)}/limit", body))

    def memory(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/admin/memory")["devices"])

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise AdminError(f"{e.code}: {_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise AdminError(f"cannot reach {self.url}: {reason}") from None


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _message(error: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-shaped error body, else the body or the reason."""
    text = error.read().decode(errors="replace")
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip() or str(error.reason)

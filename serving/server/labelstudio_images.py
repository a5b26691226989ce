"""Where the Label Studio ML backend gets a task's image from, and what it refuses.

A task's image reference (:func:`serving.formats.labelstudio.image_ref`) is read as:

- a data URI (``data:image/png;base64,...``): decoded;
- a Label Studio storage path (``/data/upload/...``, ``/data/local-files/?d=...``) or a URL on
  the configured Label Studio (``--label-studio-url``): fetched from it with its API token;
  a legacy token is sent as ``Authorization: Token <key>``, a personal access token (a JWT)
  is first exchanged for an access token at ``/api/token/refresh``;
- a local path: read only below ``--label-studio-root``.

Any other host is refused (the backend never fetches arbitrary URLs), and so is anything
larger than the server's body limit. Every refusal is an :class:`serving.errors.InputError`
with a one-line message; the backend turns it into that task's error result.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from ..errors import InputError


@dataclass(frozen=True)
class LabelStudioSettings:
    """How the backend reaches Label Studio (the ``--label-studio-*`` flags of ``sim serve``).

    Attributes:
        url: Label Studio's base URL (``http://127.0.0.1:8080``); images are fetched from it
            only. ``None``: only data URIs and local files.
        token: its API token (legacy key or personal access token); ``None`` falls back to the
            token Label Studio sends to ``/setup``.
        local_root: the folder local image paths must lie in; ``None``: no local paths.
        timeout_s: per image download.
    """

    url: str | None = None
    token: str | None = None
    local_root: Path | None = None
    timeout_s: float = 20.0


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


class ImageSource:
    """Reads task images under the rules of the module docstring, at most ``max_bytes``."""

    def __init__(self, settings: LabelStudioSettings, max_bytes: int) -> None:
        self.settings, self.max_bytes = settings, max_bytes
        self.setup_token: str | None = None  # the token /setup sent, if none is configured
        self._access: tuple[str, float] | None = None  # JWT access token and its expiry

    def read(self, ref: str) -> bytes:
        """The encoded image ``ref`` points to; :class:`InputError` (one line) if refused."""
        if ref.startswith("data:"):
            return self._data_uri(ref)
        parts = urlsplit(ref)
        if parts.scheme in ("http", "https") or ref.startswith("/data/"):
            return self._download(ref)
        if parts.scheme:
            raise InputError(f"image {ref[:80]}: {parts.scheme}:// is not read by this backend; "
                             "serve the image through Label Studio or give a data URI")
        return self._local(ref)

    def _data_uri(self, ref: str) -> bytes:
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise InputError("image data URI: not base64; send data:image/...;base64,<data>")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise InputError(f"image data URI: over the limit of {self.max_bytes} bytes; "
                             "downscale it")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image data URI: not valid base64") from None

    def _local(self, ref: str) -> bytes:
        root = self.settings.local_root
        if root is None:
            raise InputError(f"image {ref[:80]}: a local path, and the backend reads none; "
                             "start it with --label-studio-root FOLDER")
        path = (root / ref).resolve()
        if not path.is_relative_to(root.resolve()):
            raise InputError(f"image {ref[:80]}: outside --label-studio-root {root}; refused")
        if not path.is_file():
            raise InputError(f"image {ref[:80]}: no such file under {root}")
        if path.stat().st_size > self.max_bytes:
            raise InputError(f"image {ref[:80]}: over the limit of {self.max_bytes} bytes")
        return path.read_bytes()

    def _download(self, ref: str) -> bytes:
        base = self.settings.url
        if base is None:
            raise InputError(f"image {ref[:80]}: on Label Studio, and the backend has no "
                             "--label-studio-url to fetch it from; start it with one")
        url = urljoin(base.rstrip("/") + "/", ref.lstrip("/")) if ref.startswith("/") else ref
        if not same_origin(url, base):
            raise InputError(f"image {ref[:80]}: not on the configured Label Studio {base}; "
                             "this backend fetches images from there only")
        request = urllib.request.Request(url, headers=self._auth())
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as resp:
                data = resp.read(self.max_bytes + 1)
        except urllib.error.HTTPError as exc:
            raise InputError(f"image {ref[:80]}: Label Studio answered {exc.code}; check the "
                             "backend's --label-studio-token") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"image {ref[:80]}: cannot be fetched ({reason})") from None
        if len(data) > self.max_bytes:
            raise InputError(f"image {ref[:80]}: over the limit of {self.max_bytes} bytes")
        return data

    def _auth(self) -> dict[str, str]:
        token = self.settings.token or self.setup_token
        if not token:
            return {}
        if token.count(".") != 2:  # a legacy key
            return {"Authorization": f"Token {token}"}
        return {"Authorization": f"Bearer {self._access_token(token)}"}

    def _access_token(self, refresh: str) -> str:
        """A short-lived access token for a personal access token (cached until it expires)."""
        if self._access is not None and self._access[1] > time.monotonic():
            return self._access[0]
        assert self.settings.url is not None
        request = urllib.request.Request(
            self.settings.url.rstrip("/") + "/api/token/refresh",
            data=json.dumps({"refresh": refresh}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as resp:
                access = json.loads(resp.read(1 << 16))["access"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            raise InputError(f"Label Studio token: refused at /api/token/refresh ({exc}); "
                             "check --label-studio-token") from None
        self._access = (str(access), time.monotonic() + 240.0)
        return str(access)

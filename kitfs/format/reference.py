"""Parse and format OCI references: ``registry/repo:tag``, ``registry/repo@sha256:…``, both.

kitfs always names the registry explicitly (there is no implicit ``docker.io``): the first path
component is the registry host[:port]. Repository names follow the distribution spec grammar.
Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kitfs.errors import FormatError, InvalidReferenceError
from kitfs.format.digest import Digest

# distribution/reference grammar (path components and tags), lower-case repos only.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``tag`` and ``digest`` may both be set; at least one is."""

    registry: str
    repository: str
    tag: str | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``registry/repo[:tag][@algo:hex]``; a bare ``registry/repo`` means ``:latest``.

        Raises:
            InvalidReferenceError: with the reason, when ``text`` is not a reference.
        """
        if not text or any(c.isspace() for c in text):
            raise InvalidReferenceError(f"invalid reference {text!r}: empty or contains spaces")
        rest, at, digest_text = text.partition("@")
        digest = None
        if at:
            try:
                digest = Digest.parse(digest_text)
            except FormatError as exc:
                raise InvalidReferenceError(f"invalid reference {text!r}: {exc}") from None
        if "/" not in rest:
            raise InvalidReferenceError(
                f"invalid reference {text!r}: expected registry/repository[:tag][@digest]"
            )
        registry, _, path = rest.partition("/")
        if not _HOST_RE.match(registry):
            raise InvalidReferenceError(f"invalid reference {text!r}: bad registry {registry!r}")
        repository, tag = path, None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            repository, _, tag = path.rpartition(":")
            if not _TAG_RE.match(tag):
                raise InvalidReferenceError(f"invalid reference {text!r}: bad tag {tag!r}")
        if not _REPO_RE.match(repository):
            raise InvalidReferenceError(
                f"invalid reference {text!r}: bad repository {repository!r} "
                "(lower-case letters, digits and . _ - / separators)"
            )
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def is_loopback(self) -> bool:
        """True for localhost / 127.0.0.0/8 / [::1]: plain HTTP is the default there."""
        host = self.registry.lower()
        if host.startswith("["):
            return host.startswith("[::1]")
        name = host.rsplit(":", 1)[0]
        return name == "localhost" or (name.startswith("127.") and name.replace(".", "").isdigit())

    def pinned(self, digest: Digest) -> Reference:
        """The same reference with its digest set (the tag kept for display)."""
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

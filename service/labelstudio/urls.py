"""Which image URLs from task data may be fetched, and which address to connect to for them.

Anyone who can import tasks writes task data, so an image URL is hostile input: it could point
the service at cloud metadata (169.254.169.254), at its own ``/metrics``, at an admin port on
the loopback, or, with the token, at any Label Studio API path. The rules:

- On Label Studio's own origin (a root-relative path, or its scheme, host and port) only the
  paths that serve files: ``/data/upload/``, ``/data/local-files/`` and the storage resolve
  endpoints (``/tasks/N/resolve/``, ``/projects/N/resolve/`` and their ``presign`` aliases),
  after every level of percent-decoding and with no ``.``/``..``/empty segments or backslashes.
  No setting widens this: the token must not reach any other path.
- Other hosts only when every address they resolve to is public, or the host (by name) or
  the address (by network) is listed in ``label_studio.allowed_image_hosts``. The name is
  resolved once and the connection goes to the address that was checked, so a second DNS
  answer cannot swap in an internal one (DNS rebinding).

Each redirect hop is checked the same way (``transport.Sender.fetch``). A refusal raises
``RefusedURL``: the job fails at once, with a reason that names what would allow it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

import httpx

from service.errors import LabelStudioUnavailable, RefusedURL

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: the system's DNS in production, a table in tests."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_SETTING = "label_studio.allowed_image_hosts"

# Relative to Label Studio's base path. ``data/upload/<path>`` and ``data/local-files/`` (its
# ``?d=`` names the file) serve files; the resolve endpoints proxy or presign cloud URIs.
_FILE_PATHS = re.compile(
    r"/data/upload/[^/].*|/data/local-files/.*|/(?:tasks|projects)/\d+/(?:resolve|presign)/?"
)
_ALLOWED_PATHS_TEXT = (
    "/data/upload/, /data/local-files/ and the storage resolve endpoints (/tasks/N/resolve/)"
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # DNS64 writes every IPv4 host this way
_MAX_DECODINGS = 4  # a path encoded more often than this is refused, not decoded further


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system's resolver gives for ``host``, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address ("loopback", "private", ...), or None if it is.

    An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, NAT64) is judged by that."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_kind(embedded)
    for kind, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-public", not ip.is_global),
    ):
        if flag:
            return kind
    return None


def _plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (what the socket reaches)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class ImageHosts:
    """The hosts other than Label Studio that images may come from, and how to reach them.

    ``entries`` are ``label_studio.allowed_image_hosts``: host names (exact, any case) or
    addresses and networks (``10.0.0.0/8``, ``fd00::/8``, ``192.168.1.20``)."""

    entries: Iterable[str] = ()
    resolve: Resolver = system_resolver
    names: frozenset[str] = field(init=False)
    networks: tuple[Network, ...] = field(init=False)

    def __post_init__(self) -> None:
        names, networks = set(), []
        for entry in self.entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
            except ValueError:
                names.add(_normal_host(entry))
        object.__setattr__(self, "names", frozenset(names))
        object.__setattr__(self, "networks", tuple(networks))

    def _listed(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.networks)

    async def address(self, url: httpx.URL, shown: str) -> str | None:
        """The checked address to connect to for ``url``, or None for a host listed by name
        (connected to by name). Raises RefusedURL naming the address and its kind, or
        LabelStudioUnavailable (retryable) when the name does not resolve."""
        host = _normal_host(url.raw_host.decode("ascii"))
        if host in self.names:
            return None
        literal = _literal(host)
        if literal is not None:
            found = [literal]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                found = [ipaddress.ip_address(a) for a in await self.resolve(host, port)]
            except (OSError, ValueError) as exc:
                raise LabelStudioUnavailable(f"GET {shown}: cannot resolve {host} ({exc})") from exc
            if not found:
                raise LabelStudioUnavailable(f"GET {shown}: {host} resolves to no address")
        addresses = [_plain(ip) for ip in found]
        for ip in addresses:
            kind = None if self._listed(ip) else address_kind(ip)
            if kind is not None:
                named = "" if literal is not None else f"{host} resolves to "
                raise RefusedURL(
                    f"GET {shown}: refused: {named}{ip}, a {kind} address; only public "
                    f"addresses are fetched unless {ALLOW_SETTING} lists the host or its network"
                )
        return str(addresses[0])


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").lower().rstrip(".")


def label_studio_path_problem(url: httpx.URL, base_path: str) -> str | None:
    """Why ``url`` (on Label Studio's origin) must not be fetched with the token, or None.

    ``base_path`` is the path Label Studio is served under ("" or "/label-studio")."""
    raw = url.raw_path.split(b"?", 1)[0].decode("ascii")
    levels = [raw]
    while "%" in levels[-1] and len(levels) <= _MAX_DECODINGS:
        levels.append(unquote(levels[-1]))
    if "%" in levels[-1] and unquote(levels[-1]) != levels[-1]:
        return f"its path is percent-encoded more than {_MAX_DECODINGS} times"
    prefix = base_path.rstrip("/")
    for path in levels:
        if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
            return "backslashes and control characters are not allowed in its path"
        segments = path.split("/")[1:]
        if any(segment in (".", "..") for segment in segments):
            return "'.' and '..' are not allowed in its path"
        if "" in segments[:-1]:
            return "empty path segments ('//') are not allowed"
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return f"it is outside {prefix}/, where Label Studio is served"
        if not _FILE_PATHS.fullmatch(path[len(prefix) :]):
            return (
                f"Label Studio is asked only for files: {_ALLOWED_PATHS_TEXT}, not "
                f"{path[len(prefix) :] or '/'} (no setting allows other Label Studio paths)"
            )
    return None


def shown_url(url: str) -> str:
    """A URL fit for messages, logs and job reasons: no query string or fragment (they may
    carry signatures), no ``user:password@``."""
    shown = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = shown.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        shown = f"{scheme}://{authority.rsplit('@', 1)[1]}{slash}{path}"
    return shown

"""Which image URLs task data can make the service fetch (service/labelstudio/urls.py).

Anyone who can import tasks writes their image URLs. Hosts are resolved through a table
(never the network, but for ``localhost``); Label Studio and every image host are one
``httpx.MockTransport`` that records what actually went out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.config import load_config
from service.errors import ConfigError, LabelStudioError, LabelStudioUnavailable, RefusedURL
from service.labelstudio.client import LabelStudioClient
from service.labelstudio.urls import ImageHosts, address_kind, system_resolver

LS = "http://ls.test"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
PUBLIC = "93.184.216.34"
SETTING = "label_studio.allowed_image_hosts"


@dataclass
class Resolver:
    """A DNS table; a name maps to the answers of its successive look-ups (the last repeats)."""

    table: dict[str, list[list[str]]]
    asked: list[str] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answers = self.table[host]
        return answers[min(self.asked.count(host), len(answers)) - 1]


@dataclass
class Sent:
    """What reached the network: the URL connected to, the Host header, the TLS name."""

    url: str
    host: str
    sni: str | None
    auth: str | None


@dataclass
class Net:
    """Label Studio at ls.test and image hosts; answers by the Host header."""

    redirects: dict[str, str] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    answer: Callable[[httpx.Request], httpx.Response] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.headers["host"]
        self.sent.append(
            Sent(
                str(request.url),
                host,
                request.extensions.get("sni_hostname"),
                request.headers.get("authorization"),
            )
        )
        path = request.url.path
        if f"{host}{path}" in self.redirects:
            return httpx.Response(302, headers={"location": self.redirects[f"{host}{path}"]})
        if self.answer is not None:
            return self.answer(request)
        return httpx.Response(200, content=f"{host}{path}".encode())


def download(
    url: str,
    net: Net | None = None,
    dns: Resolver | None = None,
    allowed: tuple[str, ...] = (),
    base_url: str = LS,
    **kwargs: object,
) -> bytes:
    async def run() -> bytes:
        kwargs.setdefault("retries", 0)
        async with LabelStudioClient(
            base_url,
            TOKEN,
            transport=httpx.MockTransport(net or Net()),
            resolver=dns or Resolver({}),
            allowed_image_hosts=allowed,
            **kwargs,  # type: ignore[arg-type]
        ) as ls:
            return await ls.files.download(1, url)

    return asyncio.run(run())


# -- addresses that are not public ------------------------------------------------------------

NOT_PUBLIC = {
    "127.0.0.1": "loopback",
    "10.1.2.3": "private",
    "192.168.0.7": "private",
    "172.16.5.5": "private",
    "169.254.169.254": "link-local",
    "224.0.0.251": "multicast",
    "240.0.0.1": "reserved",
    "0.0.0.0": "unspecified",
    "100.64.0.1": "non-public",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fd00::5": "private",
    "ff02::1": "multicast",
    "::ffff:127.0.0.1": "loopback",
    "::ffff:169.254.169.254": "link-local",
    "2002:a01:203::1": "private",  # 6to4 of 10.1.2.3
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
}


@pytest.mark.parametrize(("address", "kind"), NOT_PUBLIC.items())
def test_a_name_that_resolves_to_an_internal_address_is_refused(address: str, kind: str) -> None:
    net, dns = Net(), Resolver({"images.example": [[address]]})
    with pytest.raises(RefusedURL) as info:
        download("http://images.example/cat.png", net, dns)
    message = str(info.value)
    assert f"images.example resolves to {address.removeprefix('::ffff:')}" in message
    assert f"a {kind} address" in message and SETTING in message
    assert net.sent == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9090/metrics",
        "http://[::1]:9090/metrics",
        "http://[::ffff:7f00:1]/",
        "https://10.0.0.1/admin",
    ],
)
def test_an_address_literal_that_is_not_public_is_refused_without_a_lookup(url: str) -> None:
    net, dns = Net(), Resolver({})
    with pytest.raises(RefusedURL, match=SETTING):
        download(url, net, dns)
    assert net.sent == [] and dns.asked == []


def test_every_address_of_a_name_must_be_public() -> None:
    net, dns = Net(), Resolver({"mixed.example": [[PUBLIC, "10.9.9.9"]]})
    with pytest.raises(RefusedURL, match=r"resolves to 10\.9\.9\.9, a private address"):
        download("http://mixed.example/a.png", net, dns)
    assert net.sent == []


def test_address_kinds() -> None:
    import ipaddress

    assert address_kind(ipaddress.ip_address(PUBLIC)) is None
    assert address_kind(ipaddress.ip_address("2606:4700:4700::1111")) is None
    assert address_kind(ipaddress.ip_address("64:ff9b::808:808")) is None  # NAT64 of 8.8.8.8
    assert address_kind(ipaddress.ip_address("2002:808:808::1")) is None  # 6to4 of 8.8.8.8


def test_localhost_is_refused_through_the_system_resolver() -> None:
    async def run() -> str | None:
        return await ImageHosts().address(httpx.URL("http://localhost:9090/metrics"), "x")

    assert system_resolver is ImageHosts().resolve
    with pytest.raises(RefusedURL, match=r"localhost resolves to .*a loopback address"):
        asyncio.run(run())


# -- what is fetched, and where it connects ---------------------------------------------------


def test_a_public_host_is_fetched_from_the_address_that_was_checked() -> None:
    # The second look-up would answer the loopback (DNS rebinding): it must never be made.
    net = Net()
    dns = Resolver({"cdn.example": [[PUBLIC], ["127.0.0.1"]]})
    assert download("https://cdn.example:8443/a.png?sig=1", net, dns) == b"cdn.example:8443/a.png"
    (sent,) = net.sent
    assert sent.url == f"https://{PUBLIC}:8443/a.png?sig=1"
    assert (sent.host, sent.sni, sent.auth) == ("cdn.example:8443", "cdn.example", None)
    assert dns.asked == ["cdn.example"]


def test_an_allowed_network_is_fetched() -> None:
    net, dns = Net(), Resolver({"minio.lan": [["10.1.2.3"]], "other.lan": [["10.1.2.3"]]})
    assert download("http://minio.lan:9000/b/a.png", net, dns, allowed=("10.0.0.0/8",))
    assert net.sent[0].url == "http://10.1.2.3:9000/b/a.png"
    with pytest.raises(RefusedURL):  # the same address is refused without the setting
        download("http://other.lan/a.png", net, dns)
    assert download("http://[fd00::7]/a.png", net, dns, allowed=("fd00::/8",))


def test_an_allowed_name_is_fetched_by_name() -> None:
    net, dns = Net(), Resolver({})
    assert download("http://Images.Internal/a.png", net, dns, allowed=("images.internal",))
    (sent,) = net.sent
    assert sent.url == "http://images.internal/a.png" and dns.asked == []


def test_a_redirect_from_a_public_host_to_the_loopback_is_refused() -> None:
    net = Net(redirects={"cdn.example/a.png": "http://127.0.0.1:9090/metrics"})
    dns = Resolver({"cdn.example": [[PUBLIC]]})
    with pytest.raises(RefusedURL) as info:
        download("http://cdn.example/a.png", net, dns)
    assert "redirected to http://127.0.0.1:9090/metrics" in str(info.value)
    assert "a loopback address" in str(info.value) and SETTING in str(info.value)
    assert [s.url for s in net.sent] == [f"http://{PUBLIC}/a.png"]


def test_each_redirect_hop_is_resolved_and_checked() -> None:
    net = Net(
        redirects={
            "cdn.example/a.png": "http://edge.example/a.png",
            "edge.example/a.png": "http://meta.example/latest",
        }
    )
    dns = Resolver(
        {
            "cdn.example": [[PUBLIC]],
            "edge.example": [["8.8.4.4"]],
            "meta.example": [["169.254.169.254"]],
        }
    )
    with pytest.raises(RefusedURL, match=r"meta\.example resolves to 169\.254\.169\.254"):
        download("http://cdn.example/a.png", net, dns)
    assert [s.url for s in net.sent] == [f"http://{PUBLIC}/a.png", "http://8.8.4.4/a.png"]


def test_a_redirect_to_another_scheme_is_refused() -> None:
    net = Net(redirects={"cdn.example/a.png": "file:///etc/passwd"})
    with pytest.raises(RefusedURL, match="only http and https"):
        download("http://cdn.example/a.png", net, Resolver({"cdn.example": [[PUBLIC]]}))


# -- Label Studio's own paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/api/projects/",
        "/api/current-user/whoami",
        "/data/upload/../../api/projects/",
        "/data/upload/1/../../../api/projects/",
        "/data/upload/..%2f..%2fapi/projects/",
        "/data/upload/%252e%252e/%252e%252e/api/projects/",
        "/data/upload/1\\..\\..\\api",
        "/data/upload//etc/passwd",
        "/data/uploadx/1/a.png",
        "/tasks/5/resolve/../../api/projects/",
        "/tasks/abc/resolve/",
        f"{LS}/api/projects/",
        f"{LS}/data/upload/../../api/projects/",
    ],
)
def test_label_studio_is_asked_only_for_files(url: str) -> None:
    net = Net()
    with pytest.raises(RefusedURL, match="refused") as info:
        download(url, net)
    assert net.sent == [], str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "/data/upload/1/e48e4582-img_0.jpg",
        "/data/upload/1/a%20b.png",
        "/data/local-files/?d=images/a.png",
        "/tasks/5/resolve/?fileuri=czM6Ly9iL2EucG5n",
        "/tasks/5/presign/?fileuri=czM6Ly9iL2EucG5n",
        "/projects/2/resolve/?fileuri=czM6Ly9iL2EucG5n",
        f"{LS}/data/upload/1/a.png",
    ],
)
def test_label_studio_file_paths_are_fetched_with_the_token(url: str) -> None:
    net = Net()
    assert download(url, net)
    (sent,) = net.sent
    assert sent.url.startswith(f"{LS}/") and sent.auth == f"Token {TOKEN}"


def test_under_a_path_prefix_only_its_file_paths_are_fetched() -> None:
    net = Net()
    base = f"{LS}/label-studio"
    assert download("/label-studio/data/upload/1/a.png", net, base_url=base)
    for url in ("/label-studio/api/projects/", "/label-studio/data/upload/../../api/x"):
        with pytest.raises(RefusedURL):
            download(url, net, base_url=base)
    assert len(net.sent) == 1


def test_a_redirect_to_a_label_studio_api_path_is_refused() -> None:
    net = Net(redirects={"ls.test/data/upload/1/a.png": "/api/projects/"})
    with pytest.raises(RefusedURL, match=r"redirected to http://ls.test/api/projects/"):
        download("/data/upload/1/a.png", net)
    assert len(net.sent) == 1


# -- credentials in image URLs ----------------------------------------------------------------


async def no_sleep(delay: float) -> None:
    pass


def test_credentials_in_an_image_url_are_used_but_never_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = Resolver({"cdn.example": [[PUBLIC]]})
    net = Net(answer=lambda request: httpx.Response(503 if "busy" in request.url.path else 404))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LabelStudioError) as missing:
        download("http://alice:s3cretpw@cdn.example/missing.png", net, dns)
    assert net.sent[0].auth is not None and net.sent[0].auth.startswith("Basic ")
    with pytest.raises(LabelStudioUnavailable) as busy:  # the log has each retry
        download("http://alice:s3cretpw@cdn.example/busy.png", net, dns, retries=1, sleep=no_sleep)
    with pytest.raises(RefusedURL) as refused:
        download("http://alice:s3cretpw@127.0.0.1:9090/metrics", net, dns)
    with pytest.raises(LabelStudioError) as unknown:
        download("ftp://alice:s3cretpw@cdn.example/a.png", net, dns)
    reasons = [str(e.value) for e in (missing, busy, refused, unknown)]
    assert "http://cdn.example/missing.png" in reasons[0]
    assert "http://127.0.0.1:9090/metrics" in reasons[2]
    assert "retry 1/1" in caplog.text and "cdn.example/busy.png" in caplog.text
    for text in (*reasons, caplog.text):
        assert "s3cretpw" not in text and "alice" not in text


# -- the setting ------------------------------------------------------------------------------


def write(tmp_path: Path, hosts: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "model: {path: m.pt, labels: [a]}\n"
        f"label_studio: {{url: 'http://ls.test', allowed_image_hosts: {hosts}}}\n",
        encoding="utf-8",
    )
    return path


def test_allowed_image_hosts_takes_names_addresses_and_networks(tmp_path: Path) -> None:
    hosts = "[images.internal, 10.0.0.0/8, 192.168.1.20, 'fd00::/8', minio]"
    loaded = load_config(write(tmp_path, hosts), environ={}).label_studio
    assert loaded.allowed_image_hosts == (
        "images.internal",
        "10.0.0.0/8",
        "192.168.1.20",
        "fd00::/8",
        "minio",
    )
    assert load_config(write(tmp_path, "[]"), environ={}).label_studio.allowed_image_hosts == ()


@pytest.mark.parametrize("hosts", ["['http://x/']", "['10.0.0.0/33']", "['a b']", "[3]", "x"])
def test_allowed_image_hosts_refuses_what_is_not_a_host(tmp_path: Path, hosts: str) -> None:
    with pytest.raises(ConfigError, match=r"label_studio\.allowed_image_hosts"):
        load_config(write(tmp_path, hosts), environ={})

"""``ls-autoseg quickstart``: from nothing to masks in Label Studio, on this machine.

Installs Label Studio into its cached side environment (as the tests do), starts it on
localhost with a demo user and the settings the service needs, creates a project whose
labels are the model's, starts the service, registers the webhook, imports the bundled sample
images and waits until each has a prediction. With ``--label-studio-url`` and ``--token`` it
uses an existing Label Studio instead. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO
from xml.sax.saxutils import quoteattr

from service.config import (
    Config,
    LabelStudioConfig,
    MissingEnv,
    ProjectConfig,
    ServerConfig,
    load_config,
    write_config,
)
from service.constants import SECRET_ENV, TOKEN_ENV, WEBHOOK_PATH
from service.errors import AutosegError
from service.labelstudio.client import LabelStudioClient
from service.labelstudio.types import Webhook
from service.labelstudio.webhooks import ensure_webhook
from service.local import lsserver
from service.model.images import list_images
from service.server import Service, make_server

log = logging.getLogger(__name__)

PROJECT_TITLE = "ls-autoseg quickstart"
PALETTE = ("#ff00ff", "#00dcdc", "#ff0000", "#5050ff", "#ffc800", "#00c800")


@dataclass(frozen=True)
class QuickstartOptions:
    base_config: Config
    images_dir: Path
    data_dir: Path
    label_studio_url: str | None = None
    token: str | None = None
    exit_when_done: bool = False
    timeout_s: float = 600.0


def label_config(labels: tuple[str, ...]) -> str:
    rows = "\n".join(
        f"    <Label value={quoteattr(label)} background={quoteattr(PALETTE[i % len(PALETTE)])}/>"
        for i, label in enumerate(labels)
    )
    return (
        '<View>\n  <Image name="image" value="$image" zoom="true" zoomControl="true"/>\n'
        f'  <BrushLabels name="tag" toName="image">\n{rows}\n  </BrushLabels>\n</View>'
    )


def _credentials(data_dir: Path) -> dict[str, str]:
    """The demo user, made once and kept (Label Studio creates the user on its first start)."""
    path = data_dir / "credentials.json"
    if path.exists():
        saved: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        return saved
    data_dir.mkdir(parents=True, exist_ok=True)
    credentials = {
        "username": "demo@example.com",
        "password": secrets.token_urlsafe(12),
        "token": secrets.token_hex(20),
    }
    path.write_text(json.dumps(credentials), encoding="utf-8")
    path.chmod(0o600)
    return credentials


async def quickstart(options: QuickstartOptions, out: TextIO) -> int:
    started: lsserver.LocalLabelStudio | None = None
    if options.label_studio_url:
        if not options.token:
            raise AutosegError("--label-studio-url needs --token (or $LABEL_STUDIO_TOKEN)")
        url, token = options.label_studio_url.rstrip("/"), options.token
        login = "your own account"
    else:
        credentials = _credentials(options.data_dir)
        print("starting Label Studio (the first run installs it: a minute or two) ...", file=out)
        port = lsserver.free_port() if not _port_free(8080) else 8080
        started = await asyncio.to_thread(
            lsserver.start,
            options.data_dir / "label-studio",
            port=port,
            username=credentials["username"],
            password=credentials["password"],
            legacy_token=credentials["token"],
        )
        url, token = started.url, credentials["token"]
        login = f"{credentials['username']} / {credentials['password']}"
    try:
        # Our own Label Studio's files are on this disk: read, not downloaded.
        files = started.data_dir if started is not None else None
        return await _run(options, url, token, login, out, files)
    finally:
        if started is not None:
            await asyncio.to_thread(started.stop)


async def _run(
    options: QuickstartOptions,
    url: str,
    token: str,
    login: str,
    out: TextIO,
    ls_data: Path | None = None,
) -> int:
    base = options.base_config
    images = list_images(options.images_dir)
    if not images:
        raise AutosegError(f"no images in {options.images_dir}")
    async with LabelStudioClient(url, token) as client:
        await client.verify()
        project = await _project(client, base.model.output_labels)
        wanted = ServerConfig().port
        port = wanted if _port_free(wanted) else lsserver.free_port()
        secret = secrets.token_hex(16)
        config_path = _write_config(options, url, project, port, ls_data)
        config = load_config(
            config_path,
            environ={TOKEN_ENV: token, SECRET_ENV: secret},
        )
        service = await Service.build(config)
        server = make_server(service)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving
                return 1
            await asyncio.sleep(0.05)
        hook_url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        try:
            await ensure_webhook(client, project, hook_url, secret, stale=_earlier_quickstart)
            existing = [t async for t in client.iter_tasks(project)]
            if not existing:
                files = [(p.name, p.read_bytes()) for p in images]
                await client.upload_files(project, files)
                print(f"imported {len(files)} sample image(s) into project {project}", file=out)
            done = await _wait(client, project, options.timeout_s)
        except BaseException:
            server.should_exit = True
            await serving
            raise
        print(
            f"\nLabel Studio: {url}/projects/{project}/data\nlogin: {login}\n"
            f"predictions: {done[0]} of {done[1]} task(s)\nservice: http://127.0.0.1:{port} "
            f"(config: {config_path})\n",
            file=out,
        )
        if options.exit_when_done:
            server.should_exit = True
        else:
            print("import more images in Label Studio; Ctrl-C stops both", file=out)
        out.flush()
        await serving
        return 0 if done[0] == done[1] else 1


async def _project(client: LabelStudioClient, labels: tuple[str, ...]) -> int:
    """The quickstart project of an earlier run, or a new one with the model's labels."""
    for project in await client.list_projects():
        if project.title == PROJECT_TITLE:
            return project.id
    return (await client.create_project(PROJECT_TITLE, label_config(labels))).id


def _earlier_quickstart(hook: Webhook) -> bool:
    """A webhook an earlier quickstart registered, on another port."""
    return hook.url.startswith("http://127.0.0.1:") and hook.url.endswith(WEBHOOK_PATH)


async def _wait(client: LabelStudioClient, project: int, timeout_s: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = [t async for t in client.iter_tasks(project)]
        done = sum(1 for t in tasks if t.total_predictions or t.total_annotations)
        if done == len(tasks) or time.monotonic() > deadline:
            return done, len(tasks)
        await asyncio.sleep(1.0)


def _write_config(
    options: QuickstartOptions, url: str, project: int, port: int, ls_data: Path | None
) -> Path:
    """The service's config: the base config with this run's Label Studio, project, port and
    state folder; the token and the secret stay in the environment (``${NAME}``), out of the
    file. ``ls_data``: the data folder of the Label Studio started here, whose uploads and
    local files the service then reads from disk (``lsserver``: its base data dir and its
    local-files document root)."""
    base = options.base_config
    return write_config(
        options.data_dir / "config.yaml",
        base.model,
        prediction=base.prediction,
        # The token is detected: it is the local Label Studio's, not the base config's.
        label_studio=replace(
            base.label_studio,
            url=url,
            token=MissingEnv(TOKEN_ENV),
            token_type=LabelStudioConfig.token_type,
            media_root=ls_data / "media" if ls_data else base.label_studio.media_root,
            local_files_root=ls_data if ls_data else base.label_studio.local_files_root,
        ),
        projects=[ProjectConfig(id=project)],
        server=replace(
            base.server,
            host="127.0.0.1",  # the webhook quickstart registers points here
            port=port,
            webhook_secret=MissingEnv(SECRET_ENV),
        ),
        state_dir=options.data_dir / "state",
        reconcile=base.reconcile,
        worker=base.worker,
    )


def _port_free(port: int) -> bool:
    import socket

    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

"""Our webhook in a project: created, or updated in place, idempotently (``hook``, quickstart)."""

from __future__ import annotations

from collections.abc import Callable

from service.constants import SECRET_HEADER, TASKS_CREATED
from service.errors import LabelStudioError
from service.labelstudio.client import LabelStudioClient
from service.labelstudio.types import Webhook

SSRF_HELP = (
    "Label Studio refused the webhook URL with 403: since 1.23.1 its SSRF protection blocks "
    "webhooks to loopback and private addresses (localhost, 127.x, 10.x, 172.16-31.x, "
    "192.168.x, docker service names). Start Label Studio with SSRF_PROTECTION_ENABLED=false "
    "(or USE_DEFAULT_BANNED_SUBNETS=false), or give a URL Label Studio may call."
)


async def ensure_webhook(
    client: LabelStudioClient,
    project: int,
    url: str,
    secret: str,
    *,
    stale: Callable[[Webhook], bool] = lambda hook: False,
) -> tuple[Webhook, bool]:
    """A ``TASKS_CREATED`` webhook to ``url`` with the secret header in ``project``: the one
    already there updated, else a new one; webhooks ``stale`` picks (other than ``url``) are
    deleted first. Returns the webhook and whether it was created.

    A 403 (Label Studio's SSRF protection) raises LabelStudioError with :data:`SSRF_HELP`.
    """
    headers = {SECRET_HEADER: secret}
    actions = [TASKS_CREATED]
    try:
        hooks = await client.list_webhooks(project)
        for hook in hooks:
            if hook.url != url and stale(hook):
                await client.delete_webhook(hook.id)
        same = [hook for hook in hooks if hook.url == url]
        if same:
            updated = await client.update_webhook(
                same[0].id, url=url, headers=headers, actions=actions
            )
            return updated, False
        return await client.create_webhook(project, url, headers, actions), True
    except LabelStudioError as exc:
        if exc.status_code == 403:
            raise LabelStudioError(SSRF_HELP, 403) from exc
        raise

"""Label Studio's answers -> the typed values of ``service.labelstudio.types``, checked once.

A shape Label Studio should never answer with raises LabelStudioError ("unexpected answer from
Label Studio (...)"); optional fields it leaves out or fills oddly become None or empty. The
answer helpers at the end read a response's JSON and the short ``detail`` of an error answer;
they only read what the transport already received, so httpx is imported for its types only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from service.errors import LabelStudioError
from service.labelstudio.types import (
    Annotation,
    Control,
    ControlInput,
    Prediction,
    Project,
    Task,
    Webhook,
)

if TYPE_CHECKING:
    import httpx

_DETAIL_MAX_CHARS = 300


# ---------------------------------------------------------------------------------------------
# JSON values


def _bad(what: str, why: str) -> LabelStudioError:
    return LabelStudioError(f"unexpected answer from Label Studio ({what}): {why}")


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(what, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(what, f"expected a list, got {type(value).__name__}")
    return value


def _req_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"expected an integer, got {type(value).__name__}")
    return value


def _opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if isinstance(value, dict):  # e.g. completed_by expanded into a user object
        value = value.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _opt_float(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _opt_datetime(obj: Mapping[str, Any], key: str) -> datetime | None:
    value = obj.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _int_list(value: Any, what: str) -> list[int]:
    items = _list(value, what)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise _bad(what, "expected a list of integers")
    return list(items)


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # "v2,v1" in task listings
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(str(v) for v in value if v is not None and str(v))
    return ()


def _results(value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        return ()
    return tuple(MappingProxyType(r) for r in value if isinstance(r, dict))


def _parse_control(name: str, raw: Any) -> Control:
    obj = _object(raw, f"parsed_label_config.{name}")
    inputs = tuple(
        ControlInput(type=str(i.get("type") or ""), value=str(i.get("value") or ""))
        for i in obj.get("inputs") or []
        if isinstance(i, dict)
    )
    return Control(
        name=name,
        type=str(obj.get("type") or ""),
        to_name=_str_tuple(obj.get("to_name") or []),
        inputs=inputs,
        labels=_str_tuple(obj.get("labels") or []),
    )


def _parse_project(raw: Any) -> Project:
    obj = _object(raw, "project")
    parsed = obj.get("parsed_label_config")
    controls = (
        tuple(_parse_control(str(name), value) for name, value in parsed.items())
        if isinstance(parsed, dict)
        else ()
    )
    return Project(
        id=_req_int(obj, "id"),
        title=_opt_str(obj, "title") or "",
        label_config=_opt_str(obj, "label_config") or "",
        controls=controls,
        model_version=_opt_str(obj, "model_version") or None,
    )


def _parse_annotation(raw: Any) -> Annotation:
    obj = _object(raw, "annotation")
    return Annotation(
        id=_req_int(obj, "id"),
        task=_opt_int(obj, "task"),
        was_cancelled=bool(obj.get("was_cancelled")),
        ground_truth=bool(obj.get("ground_truth")),
        completed_by=_opt_int(obj, "completed_by"),
        result=_results(obj.get("result")),
        created_at=_opt_datetime(obj, "created_at"),
        updated_at=_opt_datetime(obj, "updated_at"),
        updated_by=_opt_int(obj, "updated_by"),
        parent_prediction=_opt_int(obj, "parent_prediction"),
        parent_annotation=_opt_int(obj, "parent_annotation"),
        lead_time=_opt_float(obj, "lead_time"),
        draft_created_at=_opt_datetime(obj, "draft_created_at"),
        import_id=_opt_int(obj, "import_id"),
    )


def _parse_prediction(raw: Any) -> Prediction:
    obj = _object(raw, "prediction")
    return Prediction(
        id=_req_int(obj, "id"),
        task=_opt_int(obj, "task"),
        model_version=_opt_str(obj, "model_version") or "",
        score=_opt_float(obj, "score"),
        result=_results(obj.get("result")),
    )


def _parse_task(raw: Any) -> Task:
    obj = _object(raw, "task")
    data = obj.get("data")
    annotations = obj.get("annotations")
    predictions = obj.get("predictions")
    parsed_predictions = (
        tuple(_parse_prediction(p) for p in predictions) if isinstance(predictions, list) else None
    )
    versions = _str_tuple(obj.get("predictions_model_versions"))
    if not versions and parsed_predictions:
        versions = tuple(dict.fromkeys(p.model_version for p in parsed_predictions))
    return Task(
        id=_req_int(obj, "id"),
        project=_opt_int(obj, "project"),
        data=MappingProxyType(dict(data) if isinstance(data, dict) else {}),
        annotations=(
            tuple(_parse_annotation(a) for a in annotations)
            if isinstance(annotations, list)
            else None
        ),
        predictions=parsed_predictions,
        total_annotations=_opt_int(obj, "total_annotations") or 0,
        cancelled_annotations=_opt_int(obj, "cancelled_annotations") or 0,
        total_predictions=_opt_int(obj, "total_predictions") or 0,
        predictions_model_versions=versions,
        updated_at=_opt_datetime(obj, "updated_at"),
    )


def _parse_webhook(raw: Any) -> Webhook:
    obj = _object(raw, "webhook")
    headers = obj.get("headers")
    return Webhook(
        id=_req_int(obj, "id"),
        project=_opt_int(obj, "project"),
        url=_opt_str(obj, "url") or "",
        headers=MappingProxyType(
            {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}
        ),
        actions=_str_tuple(obj.get("actions") or []),
        send_payload=bool(obj.get("send_payload")),
        send_for_all_actions=bool(obj.get("send_for_all_actions")),
        is_active=bool(obj.get("is_active")),
    )


# ---------------------------------------------------------------------------------------------
# Answers


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        path = response.request.url.path
        raise LabelStudioError(
            f"{response.request.method} {path}: Label Studio answered {response.status_code} "
            f"{_content_kind(response)} that is not JSON",
            response.status_code,
        ) from exc


def _is_json(response: httpx.Response) -> bool:
    return "json" in response.headers.get("content-type", "").lower()


def _content_kind(response: httpx.Response) -> str:
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    return f"({kind})" if kind else "(no content type)"


def _error_detail(response: httpx.Response) -> str:
    """Label Studio's ``detail`` (+ ``validation_errors``), short; never ``exc_info``."""
    if not _is_json(response):
        return ""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return _short(json.dumps(body, ensure_ascii=False))
    detail = body.get("detail")
    text = detail if isinstance(detail, str) else ("" if detail is None else json.dumps(detail))
    errors = body.get("validation_errors")
    if errors:
        text = f"{text}: {json.dumps(errors, ensure_ascii=False)}" if text else json.dumps(errors)
    if not text and "detail" not in body and "exc_info" not in body:
        text = json.dumps(body, ensure_ascii=False)  # a bare DRF error dict
    return _short(text)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX_CHARS else text[: _DETAIL_MAX_CHARS - 3] + "..."

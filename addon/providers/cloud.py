"""What Claude on Bedrock and Vertex takes of a request Claude Code meant for Anthropic's API.

Claude Code believes it talks to api.anthropic.com, so it sends what only that API
accepts: betas such as `oauth-2025-04-20` or `prompt-caching-scope-…`, and fields such as
`context_management` (with an edit the platforms refuse) or `service_tier`. The clouds
answer those with a 400, which would end the very request that was failing over to them.
So their requests keep the betas the platforms document and lose the first-party fields,
as Claude Code itself shapes its requests when it runs on a platform. A beta named in an
endpoint's own `headers` always goes.

Model ids differ too. Without a `models` entry, each platform's rule applies:
- Bedrock: the region's geography (`us`, `eu`, `apac`, `jp`, `au`, `us-gov`, else
  `global`) + `anthropic.` + the id; a dated id (`…-20250929`) ends in `-v1:0`, a dateless
  one (`claude-sonnet-4-6`) stays as it is, `claude-opus-4-6` ends in `-v1`;
- Vertex: a trailing `-YYYYMMDD` becomes `@YYYYMMDD`;
- Bedrock Mantle: `anthropic.` + the id without its date.
An id already in the platform's form passes unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..config import Endpoint
from . import json_object
from .anthropic import UNSIGNED, beta_values, signed_only

if TYPE_CHECKING:
    from ..request import ClientRequest

# Betas Bedrock and Vertex document for Claude; any other is refused with a 400.
PLATFORM_BETAS = frozenset(
    {
        "claude-code-20250219",
        "interleaved-thinking-2025-05-14",
        "context-1m-2025-08-07",
        "computer-use-2024-10-22",
        "computer-use-2025-01-24",
        "token-efficient-tools-2025-02-19",
        "output-128k-2025-02-19",
        "dev-full-thinking-2025-05-14",
        "effort-2025-11-24",
        "tool-search-tool-2025-10-19",
        "tool-examples-2025-10-29",
    }
)
# Top-level fields of Anthropic's own API that the platforms refuse.
FIRST_PARTY_FIELDS = (
    "service_tier",
    "container",
    "inference_geo",
    "mcp_servers",
    "speed",
    "context_management",
)

DATED = re.compile(r"-(\d{8})$")
VERSION = re.compile(r"claude-(?:(?:opus|sonnet|haiku)-(\d+)(?:-(\d))?|(\d+)-(\d)-[a-z]+)(?:-\d{8})?$")


def betas(request_headers: tuple[tuple[str, str], ...], endpoint: Endpoint) -> list[str]:
    """The client's betas that the platforms take, then the endpoint's own, once each."""
    kept = [b for b in beta_values(request_headers) if b in PLATFORM_BETAS]
    return list(dict.fromkeys([*kept, *beta_values(endpoint.headers)]))


def extra_headers(endpoint: Endpoint) -> list[tuple[str, str]]:
    """The endpoint's own headers but its betas, which `betas` has merged."""
    return [(n, v) for n, v in endpoint.headers if n.lower() != "anthropic-beta"]


def shaped(request: ClientRequest) -> dict[str, Any]:
    """The request's body as the platforms take it; refused when it is not a JSON object."""
    return payload(json_object(request), request.body)


def payload(document: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """A copy of the request body without what only Anthropic's own API takes."""
    shaped = {k: v for k, v in document.items() if k not in FIRST_PARTY_FIELDS}
    if b'"scope"' in raw:  # cache_control's `scope` goes with a first-party beta
        for key in ("system", "messages", "tools"):
            if isinstance(shaped.get(key), list):
                shaped[key] = [_unscoped(item) for item in shaped[key]]
    if isinstance(shaped.get("messages"), list):
        if b'"system"' in raw:
            shaped["messages"] = without_system_turns(shaped["messages"])
        if UNSIGNED in raw:
            shaped["messages"] = [signed_only(m) for m in shaped["messages"]]
    return shaped


def without_system_turns(messages: list[Any]) -> list[Any]:
    """Messages of role `system` (a first-party beta) as reminders in the user's turns.

    Claude Code sends instructions mid-conversation as `system` messages; the platforms
    take only `user` and `assistant`. Each becomes a `<system-reminder>` text block, as
    Claude Code writes its other reminders, in the user turn before it, else the one
    after it, else a user turn of its own, so that the roles still alternate.
    """
    if not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return messages
    turns: list[Any] = []
    pending: list[dict[str, Any]] = []  # reminders waiting for the next user turn
    for message in messages:
        if not isinstance(message, dict):
            turns.append(message)
        elif message.get("role") == "system":
            reminder = {
                "type": "text",
                "text": f"<system-reminder>\n{_text(message.get('content'))}\n</system-reminder>",
            }
            if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "user":
                turns[-1] = {**turns[-1], "content": [*_blocks(turns[-1].get("content")), reminder]}
            else:
                pending.append(reminder)
        elif message.get("role") == "user" and pending:
            turns.append({**message, "content": [*pending, *_blocks(message.get("content"))]})
            pending = []
        else:
            if pending:
                turns.append({"role": "user", "content": pending})
                pending = []
            turns.append(message)
    if pending:
        turns.append({"role": "user", "content": pending})
    return turns


def _blocks(content: Any) -> list[Any]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n\n".join(
        b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"
    )


def _unscoped(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    item = dict(item)
    control = item.get("cache_control")
    if isinstance(control, dict) and "scope" in control:
        item["cache_control"] = {k: v for k, v in control.items() if k != "scope"}
    if isinstance(item.get("content"), list):
        item["content"] = [_unscoped(block) for block in item["content"]]
    return item


def bedrock_model(model: str, region: str) -> str:
    if "anthropic." in model or model.startswith("arn:"):
        return model
    if DATED.search(model):
        model_id = f"anthropic.{model}-v1:0"
    elif model == "claude-opus-4-6":
        model_id = "anthropic.claude-opus-4-6-v1"
    else:
        model_id = f"anthropic.{model}"
    return f"{geography(region, model)}.{model_id}"


def geography(region: str, model: str) -> str:
    """The cross-region inference profile of a region, as Bedrock names them."""
    if region.startswith("us-gov-"):
        return "us-gov"
    if region.startswith(("us-", "eu-")):
        return region[:2]
    if region.startswith("ap-"):
        newer = version(model) >= (4, 5)  # Japan and Australia have their own profiles since 4.5
        if newer and region in ("ap-northeast-1", "ap-northeast-3"):
            return "jp"
        if newer and region in ("ap-southeast-2", "ap-southeast-4"):
            return "au"
        return "apac"
    return "global"


def version(model: str) -> tuple[int, int]:
    """A Claude model's version: (4, 5) for `claude-sonnet-4-5-20250929`, (3, 7) for
    `claude-3-7-sonnet-20250219`; (0, 0) when the name says none."""
    match = VERSION.fullmatch(model)
    if match is None:
        return (0, 0)
    major, minor = (match[1], match[2]) if match[1] else (match[3], match[4])
    return int(major), int(minor or 0)


def vertex_model(model: str) -> str:
    return model if "@" in model else DATED.sub(r"@\1", model)


def mantle_model(model: str) -> str:
    return model if model.startswith("anthropic.") else "anthropic." + DATED.sub("", model)

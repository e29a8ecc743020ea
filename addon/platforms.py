"""What the configuration knows of each platform: its name, the keys it takes, its defaults.

The anthropic SDK keeps each platform's defaults in that platform's client (the region of
`AnthropicBedrock`, the project and region of `AnthropicVertex`); here each platform is one
`Platform` in `PLATFORMS`, and config.py validates an endpoint and fills in its defaults
from that entry alone. This module imports nothing of the proxy: config.py reads it while
it is being loaded, and the platforms' modules, which import config.py, are loaded only
when an endpoint names them (`for_endpoint`). A new platform is one entry here and one
module beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://api.anthropic.com"
OAUTH_KEY_PREFIX = "sk-ant-oat"  # OAuth tokens of Claude subscriptions, e.g. from `claude setup-token`
OAUTH_BETA = "oauth-2025-04-20"  # the API takes such a token only with this beta


def _anywhere(base_url: str) -> bool:
    return True


@dataclass(frozen=True)
class Platform:
    """One platform, as the configuration sees it: the keys it takes and needs, and where
    their defaults come from when the file gives none."""

    name: str  # an endpoint's `provider`
    title: str  # what it is, in the configuration reference's words
    module: str  # its module in this package, imported when an endpoint names it
    # The endpoint keys it takes beyond those that every platform takes; any other is a mistake.
    takes: tuple[str, ...] = ()
    # The keys it cannot do without, each with the end of the sentence that asks for it.
    required: Mapping[str, str] = field(default_factory=dict)
    # The environment variables that fill a key the file leaves out: the first one set wins.
    variables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Its base URL, from the region where it has one, when neither the file nor a variable gives one.
    url: Callable[[str | None], str] | None = None
    # The pip extra that installs its libraries, and a module of theirs that shows it is installed.
    extra: tuple[str, str] | None = None
    # The base URLs that its key variable may be sent to.
    key_goes_to: Callable[[str], bool] = _anywhere
    # The reference's words for a key on this platform: what it adds to the key's meaning,
    # and the key's default.
    notes: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, str] = field(default_factory=dict)

    @property
    def install(self) -> str:
        """The command that installs its extra."""
        return f"pip install 'claude-code-fallback[{self.extra[0]}]'" if self.extra else ""


def is_anthropic_host(url: str) -> bool:
    """Whether `url`'s host is anthropic.com or one of its subdomains."""
    host = urlsplit(url).hostname or ""
    return host == "anthropic.com" or host.endswith(".anthropic.com")


# anthropic.py: Anthropic's API, or any API that speaks it. `ANTHROPIC_API_KEY` goes to
# Anthropic's own hosts only: elsewhere the client's own credentials pass through.
ANTHROPIC = Platform(
    "anthropic",
    "Anthropic's API (or any that speaks it)",
    module="anthropic",
    takes=("apiKey", "authHeader"),
    variables={"apiKey": ("ANTHROPIC_API_KEY",)},
    url=lambda region: DEFAULT_BASE_URL,
    key_goes_to=is_anthropic_host,
    defaults={"baseUrl": f"`{DEFAULT_BASE_URL}`", "apiKey": "`ANTHROPIC_API_KEY` on anthropic.com hosts"},
)

# bedrock.py: Bedrock's runtime and Bedrock Mantle, signed with AWS's credential chain
# or sent a Bedrock API key, as `AnthropicBedrock` and `AnthropicBedrockMantle` read them.
BEDROCK = Platform(
    "bedrock",
    "AWS Bedrock's runtime",
    module="bedrock",
    takes=("apiKey", "region", "awsProfile"),
    required={"region": ""},
    variables={
        "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
        "baseUrl": ("ANTHROPIC_BEDROCK_BASE_URL",),
        "apiKey": ("AWS_BEARER_TOKEN_BEDROCK",),
    },
    url=lambda region: f"https://bedrock-runtime.{region}.amazonaws.com",
    extra=("bedrock", "botocore"),
    defaults={
        "baseUrl": "on a cloud, the platform's URL for `region`",
        "apiKey": "a Bedrock API key variable on Bedrock",
    },
)
BEDROCK_MANTLE = replace(
    BEDROCK,
    name="bedrock-mantle",
    title="Anthropic's API on AWS",
    variables={
        **BEDROCK.variables,
        "baseUrl": ("ANTHROPIC_BEDROCK_MANTLE_BASE_URL",),
        "apiKey": ("AWS_BEARER_TOKEN_BEDROCK", "ANTHROPIC_AWS_API_KEY"),
    },
    url=lambda region: f"https://bedrock-mantle.{region}.api.aws/anthropic",
)


def vertex_url(region: str | None) -> str:
    """Where Vertex AI serves `region`, as the anthropic SDK picks it."""
    if region == "global":
        return "https://aiplatform.googleapis.com/v1"
    if region in ("us", "eu"):
        return f"https://aiplatform.{region}.rep.googleapis.com/v1"
    return f"https://{region}-aiplatform.googleapis.com/v1"


# vertex.py: Google's Application Default Credentials, as `AnthropicVertex` reads them.
# --8<-- [start:vertex] (docs/providers.md shows this entry)
VERTEX = Platform(
    "vertex",
    "Google Vertex AI",
    module="vertex",
    takes=("region", "project"),
    required={"region": ""},
    variables={
        "region": ("CLOUD_ML_REGION",),
        "baseUrl": ("ANTHROPIC_VERTEX_BASE_URL",),
        "project": ("ANTHROPIC_VERTEX_PROJECT_ID",),
    },
    url=vertex_url,
    extra=("vertex", "google.auth"),
    notes={
        "region": "Vertex AI also takes `global`, `us`, `eu`",
        "project": "a Google Cloud project on Vertex AI",
    },
    defaults={"baseUrl": "on a cloud, the platform's URL for `region`"},
)
# --8<-- [end:vertex]

# openai.py: any OpenAI-format Chat Completions API; nothing to assume about where it is
# or which models it has.
OPENAI = Platform(
    "openai",
    "an OpenAI-format Chat Completions API",
    module="openai",
    takes=("apiKey", "maxTokensField"),
    required={
        "baseUrl": ", like http://127.0.0.1:11434/v1",
        "models": ': which model serves each client model ("*": all)',
    },
)

PLATFORMS = {platform.name: platform for platform in (ANTHROPIC, BEDROCK, BEDROCK_MANTLE, VERTEX, OPENAI)}
DEFAULT_PROVIDER = ANTHROPIC.name  # an endpoint's platform when it names none

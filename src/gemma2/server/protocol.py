"""The OpenAI API's request bodies as pydantic models: types and ranges checked before any model work.

Unknown fields are accepted and ignored (clients send fields of newer API versions, and other
servers' extras), as vLLM does; fields whose meaning we cannot honour (a JSON response format,
tools, suffix, best_of) are refused by `unsupported()` so a client never silently gets something
else than it asked for. Responses are in `gemma2.server.responses`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

# OpenAI caps top_logprobs (and completions' logprobs) at 20; so do vLLM and llama.cpp.
MAX_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined (other parts are refused earlier)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class SamplingFields(_Body):
    """The fields chat and completions share."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(default=0, ge=0)
    user: StrictStr | None = None
    response_format: dict[str, Any] | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a field set to something this server cannot do, else None."""
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format", f"response_format type {self.response_format.get('type')!r} is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported"
        for name in ("tools", "functions"):
            if getattr(self, name, None):
                return name, f"{name} (function calling) is not supported"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name, None) not in (None, "none"):
                return name, f"{name} is not supported"
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self


TokenIds = list[StrictInt]


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: StrictStr | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (fill in the middle) is not supported"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


Kind = Literal["chat", "completion"]

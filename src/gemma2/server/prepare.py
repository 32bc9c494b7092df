"""From a validated request body to engine work: prompt ids, one SamplingParams per choice, stop strings.

Every refusal happens here, before anything is queued, with the status and field OpenAI clients
expect: an unknown model is a 404, a prompt that cannot fit the context a 400 with code
`context_length_exceeded` (never queued, never a 500), a system message under `--system-prompt
reject` or roles that do not alternate a 400 naming the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma2.errors import ChatFormatError
from gemma2.sampling import SamplingParams
from gemma2.server.errors import APIError, bad_request
from gemma2.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gemma2.tokenizer import Gemma2Tokenizer


@dataclass
class ServerSettings:
    """What `gemma2 serve` was started with, as the request layer needs it."""

    model_name: str
    max_model_len: int
    max_batch: int
    vocab_size: int
    system_prompt: str = "merge"  # or "reject"
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` shows: the prompt as sent, or its ids decoded


@dataclass
class Prepared:
    kind: str  # "chat" or "completion"
    prompts: list[Prompt]
    params: list[list[SamplingParams]]  # per prompt, one per choice
    stops: list[str]
    logprobs: int | None  # None: none asked; else how many top alternatives
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    choice_count: int = 1
    unused: list[str] = field(default_factory=list)


def check_model(settings: ServerSettings, name: str | None) -> None:
    if name is not None and name != settings.model_name:
        raise APIError(
            404,
            f"The model {name!r} does not exist; this server serves {settings.model_name!r}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def prepare_chat(body: ChatCompletionRequest, tokenizer: Gemma2Tokenizer, settings: ServerSettings) -> Prepared:
    _common_checks(body, settings)
    messages = []
    for index, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if part.type != "text":
                    raise bad_request(
                        f"messages[{index}] has a content part of type {part.type!r}; only text parts are supported",
                        param="messages",
                    )
        if message.role == "system" and settings.system_prompt == "reject":
            raise bad_request(
                f"messages[{index}] is a system message: Gemma 2 has no system role "
                "(this server runs with --system-prompt reject)",
                param="messages",
            )
        if message.role == "developer":  # OpenAI's newer name for the system role
            message = message.model_copy(update={"role": "system"})
        messages.append({"role": message.role, "content": message.text()})
    ids = chat_ids(tokenizer, messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    return _prepared("chat", body, [Prompt(ids, "")], requested, top, tokenizer, settings)


def chat_ids(
    tokenizer: Gemma2Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """The conversation in the chat format; the library's refusals (roles, system turns) as 400s."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ChatFormatError as error:
        raise bad_request(str(error), param="messages") from None


def prepare_completion(body: CompletionRequest, tokenizer: Gemma2Tokenizer, settings: ServerSettings) -> Prepared:
    _common_checks(body, settings)
    prompts = []
    for index, prompt in enumerate(body.prompts()):
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=True)
            while len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_token_id:
                ids.pop(0)  # the prompt's own "<bos>" and the tokenizer's: keep exactly one
            prompts.append(Prompt(ids, prompt))
        else:
            where = "prompt" if len(body.prompts()) == 1 else f"prompt[{index}]"
            if not prompt:
                raise bad_request(f"{where} is an empty list of token ids", param="prompt")
            bad = [i for i in prompt if not 0 <= i < settings.vocab_size]
            if bad:
                raise bad_request(
                    f"{where} holds token id {bad[0]}, outside the vocabulary [0, {settings.vocab_size})",
                    param="prompt",
                )
            prompts.append(Prompt(list(prompt), tokenizer.decode(prompt)))
    if not prompts:
        raise bad_request("prompt is an empty list", param="prompt")
    if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise bad_request("max_tokens 0 is only useful with echo and logprobs (scoring the prompt)", "max_tokens")
    requested = 16 if body.max_tokens is None else body.max_tokens
    prepared = _prepared("completion", body, prompts, requested, body.logprobs, tokenizer, settings)
    prepared.echo = body.echo
    if body.echo and body.logprobs is not None:
        for per_prompt in prepared.params:
            for params in per_prompt:
                params.prompt_logprobs = body.logprobs
    return prepared


def _common_checks(body: SamplingFields, settings: ServerSettings) -> None:
    check_model(settings, body.model)
    unsupported = body.unsupported()
    if unsupported is not None:
        raise bad_request(unsupported[1], param=unsupported[0], code="unsupported")
    if body.n > settings.max_batch:
        raise bad_request(f"n is {body.n}; this server runs at most {settings.max_batch} choices at once", "n")
    if body.max_tokens is not None and body.max_tokens == 0 and isinstance(body, ChatCompletionRequest):
        raise bad_request("max_tokens must be at least 1", param="max_tokens")


def _prepared(
    kind: str,
    body: SamplingFields,
    prompts: list[Prompt],
    requested: int | None,
    logprobs: int | None,
    tokenizer: Gemma2Tokenizer,
    settings: ServerSettings,
) -> Prepared:
    limit = settings.max_model_len
    longest = max(len(p.ids) for p in prompts)
    if requested is None:  # chat without max_tokens: whatever the context leaves
        max_tokens, asked = limit - longest, longest + 1
    else:
        max_tokens, asked = requested, longest + requested
    if asked > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens "
            f"({longest} in the {'messages' if kind == 'chat' else 'prompt'}, {asked - longest} in the "
            "completion). Please reduce the length of the prompt or of the completion.",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    stop_ids = list(body.stop_token_ids or [])
    bad = [i for i in stop_ids if not 0 <= i < settings.vocab_size]
    if bad:
        raise bad_request(f"stop_token_ids holds {bad[0]}, outside the vocabulary", param="stop_token_ids")
    if not body.ignore_eos:
        stop_ids += [i for i in (tokenizer.eos_token_id, tokenizer.end_of_turn_id) if i is not None]
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})", "min_tokens")
    bias = _logit_bias(body.logit_bias, settings.vocab_size)
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    temperature = 1.0 if body.temperature is None else body.temperature
    params = [
        [
            SamplingParams(
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=body.top_p,
                min_p=body.min_p or None,
                repetition_penalty=body.repetition_penalty,
                seed=None if body.seed is None else (body.seed + j) % 2**63,
                stop_token_ids=sorted(set(stop_ids)),
                ignore_eos=True,  # exactly stop_ids: the checkpoint's own list is replaced by the server's
                logprobs=0 if logprobs is None else max(logprobs, 1),
                min_tokens=body.min_tokens,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=bias,
            )
            for j in range(body.n)
        ]
        for _ in prompts
    ]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Prepared(
        kind,
        prompts,
        params,
        body.stops(),
        logprobs,
        False,
        body.stream,
        include_usage,
        body.n,
        sorted(body.model_extra or {}),
    )


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab:
            raise bad_request(f"logit_bias names token id {token}, outside the vocabulary [0, {vocab})", "logit_bias")
        out[token] = float(value)  # in [-100, 100]: the schema's check
    return out

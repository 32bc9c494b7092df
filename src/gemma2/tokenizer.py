"""The Gemma tokenizer and the Gemma chat format (importable without torch).

Encoding and decoding run in the `tokenizers` library, from tokenizer.json when the checkpoint has
one, else from tokenizer.model: that SentencePiece model is read with sentencepiece's schema and
converted once to the same BPE tokenizer (see sentencepiece_bpe.py; cached by its sha256), so both
files give the reference's ids, as transformers' GemmaTokenizerFast does.

Gemma's SentencePiece model has 249 "added" pieces (control, unknown and user-defined: `<bos>`,
`<start_of_turn>`, newline runs, `<unused0>`...) matched in raw text first, so `<start_of_turn>`
written in a string is the special token 106, as in the reference.

BOS: `encode(..., add_special_tokens=True)` gives exactly one `<bos>` at the start (never two, even
when the text itself starts with `<bos>`); a missing BOS wrecks Gemma's quality.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gemma2.errors import ChatFormatError, Gemma2Error, TokenizerError  # noqa: F401 (raised here, importable from here too)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# The official Gemma chat template (the one Google ships in tokenizer_config.json): `assistant`
# is written `model`, content is trimmed, roles alternate starting with user, one <bos>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


# ------------------------------------------------------------------------------------------------
# The backend: plain text <-> ids through the `tokenizers` library, without BOS handling


class _Backend:
    def __init__(self, path: Path, sentencepiece_model: Path | None = None) -> None:
        """Read tokenizer.json at `path` (converted from `sentencepiece_model` when given)."""
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise TokenizerError(f"{path}: not a tokenizer.json file ({error})") from None
        self.path = sentencepiece_model or path
        self.sentencepiece_model = sentencepiece_model
        decoder = self.tokenizer.get_added_tokens_decoder()
        self.added = {i: token.content for i, token in decoder.items()}
        self.special = {i for i, token in decoder.items() if token.special}

    @classmethod
    def from_sentencepiece(cls, path: Path) -> _Backend:
        from gemma2.paths import cache_dir
        from gemma2.sentencepiece_bpe import SentencePieceError, converted_tokenizer_file

        try:
            converted = converted_tokenizer_file(path, cache_dir() / "tokenizers")
        except SentencePieceError as error:
            raise TokenizerError(str(error)) from None
        except OSError as error:
            raise TokenizerError(f"{path}: cannot read ({error})") from None
        return cls(converted, sentencepiece_model=path)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, i: int) -> str:
        token = self.tokenizer.id_to_token(i)
        if token is None:
            raise IndexError(i)
        return str(token)

    def token_to_id(self, token: str) -> int | None:
        i = self.tokenizer.token_to_id(token)
        return None if i is None else int(i)

    def save(self, path: Path, add_bos: bool) -> None:
        """Write tokenizer.json; its post-processor adds <bos> when `add_bos`, because transformers
        takes BOS from there (not from tokenizer_config.json) when it loads the file."""
        from tokenizers.processors import TemplateProcessing

        document = json.loads(self.tokenizer.to_str())
        bos = self.token_to_id("<bos>")
        if add_bos and bos is not None:
            processor = TemplateProcessing(
                single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", bos)]
            )
            document["post_processor"] = json.loads(processor.__getstate__())
        elif not add_bos:
            document["post_processor"] = None
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
        partial.replace(path)


# ------------------------------------------------------------------------------------------------


class BatchEncoding(dict):
    """input_ids and attention_mask, as a dict and as attributes (like transformers)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Gemma2Tokenizer:
    """Gemma's tokenizer: encode / decode, batching with padding, and the chat template."""

    def __init__(
        self,
        backend: _Backend,
        chat_template: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        padding_side: str = "left",
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template or GEMMA_CHAT_TEMPLATE
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.name_or_path = name_or_path
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = "<bos>", "<eos>", "<pad>", "<unk>"
        self.bos_token_id = self._required_id(self.bos_token)
        self.eos_token_id = self._required_id(self.eos_token)
        self.pad_token_id = self._required_id(self.pad_token)
        self.unk_token_id = self.backend.token_to_id(self.unk_token)
        self.start_of_turn_id = self.backend.token_to_id("<start_of_turn>")
        self.end_of_turn_id = self.backend.token_to_id("<end_of_turn>")

    def _required_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.backend.path}: has no {token} token; it is not a Gemma tokenizer")
        return i

    # -- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Gemma2Tokenizer:
        """Load from a directory (or hub id) holding tokenizer.json and/or tokenizer.model."""
        local = Path(path)
        if local.is_file():
            directory, files = local.parent, [local.name]
        else:
            from gemma2.io.checkpoint import CheckpointError, resolve_checkpoint_dir

            try:
                directory = resolve_checkpoint_dir(path)
            except CheckpointError as error:
                raise TokenizerError(str(error)) from None
            files = [TOKENIZER_JSON, TOKENIZER_MODEL]
        if TOKENIZER_JSON in files and (directory / TOKENIZER_JSON).exists():
            backend = _Backend(directory / TOKENIZER_JSON)
        elif TOKENIZER_MODEL in files and (directory / TOKENIZER_MODEL).exists():
            backend = _Backend.from_sentencepiece(directory / TOKENIZER_MODEL)
        elif local.is_file() and local.suffix == ".json":
            backend = _Backend(local)
        elif local.is_file():
            backend = _Backend.from_sentencepiece(local)
        else:
            raise TokenizerError(f"{directory}: no tokenizer files (expected {TOKENIZER_JSON} or {TOKENIZER_MODEL})")
        settings: dict[str, Any] = {}
        config_path = directory / TOKENIZER_CONFIG
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise TokenizerError(f"{config_path}: not valid JSON ({error})") from None
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            settings = {
                "chat_template": template,
                "add_bos_token": config.get("add_bos_token", True),
                "add_eos_token": config.get("add_eos_token", False),
                "padding_side": config.get("padding_side", "left"),
            }
        settings.update(overrides)
        return cls(backend, name_or_path=str(path), **settings)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json (and tokenizer.model when known), tokenizer_config.json and
        special_tokens_map.json: the files transformers and this package both read."""
        import shutil

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.backend.sentencepiece_model
        if source is not None and source.resolve() != (directory / TOKENIZER_MODEL).resolve():
            shutil.copyfile(source, directory / TOKENIZER_MODEL)
        self.backend.save(directory / TOKENIZER_JSON, add_bos=self.add_bos_token)
        config = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "padding_side": self.padding_side,
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "GemmaTokenizer",
            "chat_template": self.chat_template,
        }
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        }
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (directory / SPECIAL_TOKENS_MAP).write_text(json.dumps(special, indent=2) + "\n")

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def __len__(self) -> int:
        return self.backend.vocab_size

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int | None] | None:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.backend.special)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}")
        ids = self.backend.encode(text)
        if add_special_tokens:
            if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token:
                ids.append(self.eos_token_id)
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        """Encode one text or a batch; `padding=True` pads to the longest (left by default)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]  # type: ignore[arg-type]
        if truncation:
            if max_length is None:
                raise TokenizerError("truncation=True needs max_length")
            rows = [row[:max_length] for row in rows]
        side = padding_side or self.padding_side
        if padding in (True, "longest", "max_length"):
            width = max((len(r) for r in rows), default=0)
            if padding == "max_length":
                if max_length is None:
                    raise TokenizerError("padding='max_length' needs max_length")
                width = max(width, max_length)
            padded, masks = [], []
            for row in rows:
                fill = width - len(row)
                if side == "left":
                    padded.append([self.pad_token_id] * fill + row)
                    masks.append([0] * fill + [1] * len(row))
                else:
                    padded.append(row + [self.pad_token_id] * fill)
                    masks.append([1] * len(row) + [0] * fill)
            rows = padded
        elif padding not in (False, None, "do_not_pad"):
            raise TokenizerError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise TokenizerError("texts of different lengths need padding=True to become one tensor")
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long), attention_mask=torch.tensor(masks))
        if return_tensors is not None:
            raise TokenizerError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens)

    def batch_decode(self, rows: Iterable[Any], skip_special_tokens: bool = False) -> list[str]:
        if hasattr(rows, "tolist"):
            rows = rows.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    # -- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        chat_template: str | None = None,
    ) -> Any:
        """Render a conversation in the chat format; token ids (one <bos>) or the text.

        System messages: Gemma 2 has no system role. A leading system message is prepended to the
        first user turn, separated by a blank line (alone, it becomes the user turn); a system
        message anywhere else is an error.
        """
        text = render_chat(
            messages,
            chat_template or self.chat_template,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        while len(ids) > 1 and ids[0] == ids[1] == self.bos_token_id:
            ids.pop(0)  # a template that writes <bos> and a caller that adds one: keep exactly one
        if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        if return_tensors == "pt":
            import torch

            return torch.tensor([ids], dtype=torch.long)
        return ids


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check roles and content; fold a leading system message into the first user turn.

    Errors name the offending message by its index in the caller's list.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
    if not messages:
        raise ChatFormatError("messages is empty: a conversation needs at least one user message")
    turns: list[tuple[int, dict[str, Any]]] = []  # (index in the caller's list, message)
    system: str | None = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatFormatError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message.get("content")
        if isinstance(content, list):  # OpenAI-style parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{index}] ({role!r}) has no text content: {message!r}")
        if role == "system":
            if index != 0:
                raise ChatFormatError(f"messages[{index}] is a system message; only the first message may be one")
            system = content.strip()
            continue
        turns.append((index, {**message, "role": "assistant" if role == "model" else role, "content": content}))
    if system is not None:
        if turns and turns[0][1]["role"] == "user":
            index, first = turns[0]
            turns[0] = (index, {**first, "content": f"{system}\n\n{first['content'].strip()}"})
        else:
            turns.insert(0, (0, {"role": "user", "content": system}))
    expected = "user"
    for index, message in turns:
        role = message["role"]
        if role not in ("user", "assistant"):
            continue  # another role (a tool, say): left to the template
        if role != expected:
            wanted = "a user" if expected == "user" else "a model (assistant)"
            raise ChatFormatError(
                f"messages[{index}] has role {messages[index]['role']!r} where {wanted} turn was expected: "
                f"roles must alternate user / model, starting with user"
            )
        expected = "assistant" if role == "user" else "user"
    return [message for _, message in turns]


def render_chat(
    messages: Sequence[dict[str, Any]],
    template: str,
    bos_token: str = "<bos>",
    eos_token: str = "<eos>",
    add_generation_prompt: bool = False,
) -> str:
    """Render messages with a jinja2 chat template (sandboxed, as transformers renders them)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatFormatError(f"chat template: {message}")

    normalized = normalize_messages(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=normalized, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:
        raise ChatFormatError(f"chat template failed to render: {error}") from None

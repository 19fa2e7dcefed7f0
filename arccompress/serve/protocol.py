"""The service's wire format: OpenAI's requests and responses, plus document parts.

A document part names a document, never a tensor: `{"type": "document", "text": ..., "chunk_size"?}` is compressed on
the server, `{"type": "document", "id": ...}` is read from the server's store. A prompt is the Python API's prompt
language in JSON: an ordered list of strings, text parts and document parts. OpenAI's own fields keep their
meaning, so the official clients work unchanged (documents ride in content parts, or in `extra_body`).
Unknown fields are refused by name: a misspelt option is an error, not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

INT64 = 1 << 63  # seeds are 64-bit integers, as every engine reads them
QUOTE_CHARS = 64  # of a client's text quoted back in an error


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class DocumentPart(Strict):
    """A document: its text (compressed on the server) or the id of a context in the server's store."""

    # the rule of `_text_or_id` in the JSON schema, for clients and fuzzers that generate requests from it
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["text"], "properties": {"text": {"type": "string", "pattern": "\\S"}, "id": {"type": "null"}}},
        {"required": ["id"], "properties": {"id": {"type": "string"}, "text": {"type": "null"},
                                            "chunk_size": {"type": "null"}}},
    ]})

    type: Literal["document"]
    text: str | None = None
    id: str | None = None
    chunk_size: StrictInt | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _text_or_id(self) -> DocumentPart:
        if (self.text is None) == (self.id is None):
            raise ValueError("a document part has either 'text' or 'id'")
        if self.text is not None and not self.text.strip():
            raise ValueError("a document's text is empty")
        if self.id is not None and self.chunk_size is not None:
            raise ValueError("'chunk_size' applies to a document given as text; a stored one is already compressed")
        return self


Part = Annotated[Union[TextPart, DocumentPart], Field(discriminator="type")]
PromptParts = list[Union[str, Part]]


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingFields(Strict):
    """OpenAI's generation fields that every backend honours."""

    # counts and switches are JSON's own types: "5" or true is not a number of tokens, 1 is not a switch
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-INT64, lt=INT64)
    n: StrictInt = Field(default=1, ge=1)
    # OpenAI's penalties: 0 (what some SDKs always send) changes nothing; other values where the backend has them
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as an identifier for the caller's own logs
    return_token_ids: StrictBool = False  # each choice also carries its generated token ids (as vLLM's server offers)

    @model_validator(mode="after")
    def _one_length(self) -> SamplingFields:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def penalties(self) -> dict[str, float]:
        """The penalties asked for (those not 0)."""
        return {k: v for k, v in (("presence_penalty", self.presence_penalty),
                                  ("frequency_penalty", self.frequency_penalty)) if v}

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    """`prompt`: a string, a list of strings (one prompt each, as OpenAI), a list of parts (one prompt), or a list
    of part lists (one prompt each)."""

    model: str
    prompt: str | list[Union[str, Part, list[Union[str, Part]]]]

    def prompts(self) -> list[PromptParts]:
        """The request's prompts, each a list of parts."""
        if isinstance(self.prompt, str):
            return [[self.prompt]]
        if not self.prompt:
            return []
        if all(isinstance(p, str) for p in self.prompt):
            return [[p] for p in self.prompt]  # type: ignore[list-item]
        if all(isinstance(p, list) for p in self.prompt):
            if not all(self.prompt):
                raise ValueError("prompt: a prompt of the list is empty")
            return [list(p) for p in self.prompt]  # type: ignore[arg-type]
        if any(isinstance(p, list) for p in self.prompt):
            raise ValueError("prompt: a list holds either parts (one prompt) or lists of parts (one prompt each), "
                             "not both")
        return [list(self.prompt)]  # type: ignore[arg-type]


class Example(Strict):
    documents: list[Union[str, DocumentPart]] = Field(min_length=1)
    question: str
    answer: str


class AnswerRequest(SamplingFields):
    """The paper's few-shot QA format: the JSON twin of `Generator.answer`. Greedy unless told otherwise."""

    model: str | None = None
    question: str = Field(min_length=1)
    documents: list[Union[str, DocumentPart]] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    """OpenAI's usage, counted in decoder positions, plus what the documents saved."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    documents: int = 0
    prompt_positions_saved: int | None = None  # positions the documents' full text would have taken, minus theirs


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """OpenAI's error schema: every refusal and failure of the service."""

    error: ErrorDetail


class Choice(BaseModel):
    index: int
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | None = None  # with return_token_ids


class CompletionChoice(Choice):
    text: str


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(Choice):
    message: ChatMessageOut


class Answered(BaseModel):
    """What every generating endpoint answers with (without `stream`)."""

    id: str
    created: int
    model: str
    usage: Usage


class CompletionResponse(Answered):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ChatCompletionResponse(Answered):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class AnswerResponse(Answered):
    object: Literal["answer"]
    answer: str
    text: str
    finish_reason: str | None


class Chunk(BaseModel):
    """One event of a stream (`stream: true`); the last, with `stream_options.include_usage`, has the usage alone."""

    id: str
    created: int
    model: str
    usage: Usage | None = None


class CompletionChunk(Chunk):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class AnswerChunk(Chunk):
    object: Literal["answer"]
    choices: list[CompletionChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Choice):
    delta: ChatDelta


class ChatCompletionChunk(Chunk):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    arccompress: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    backend: str


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error schema."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def quote(text: str) -> str:
    """A client's text as an error quotes it: whole if short, else its start and its length."""
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}... ({len(text):,} characters)"

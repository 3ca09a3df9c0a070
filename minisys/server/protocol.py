"""Request and response models of the OpenAI API, as vLLM serves it.

Requests are validated by pydantic (wrong types -> 400); the sampling fields
are then turned into a `SamplingParams`, whose own checks (n >= 1,
temperature >= 0 and not NaN, top_p in (0, 1], max_tokens >= 1) give the
400 messages.

Strict by default: a field minisys does not implement is a 400 naming it,
never silently ignored (vLLM ignores unknown fields; a client that sends
``tools`` would get an answer that quietly does not do what it asked).
Structured outputs (``response_format``, ``structured_outputs``, ``guided_*``)
map to one `minisys.structured.StructuredOutputsParams`; ``tools`` /
``tool_choice`` are checked here (`ChatCompletionRequest.tool_mode`); how
calls are forced and read is `tools`. Known fields minisys cannot honour
(``suffix``, ``best_of`` != n, ...) are refused the same way. The only fields accepted and
ignored are `IGNORED_FIELDS`: ones real clients send that do not change
the tokens generated.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr

from ..engine.sampling_params import RequestOutputKind, SamplingParams
from ..scheduling.qoe import QoESpec
from ..structured.params import StructuredOutputsParams
from .tools import ToolMode

MAX_N = 128     # the default of --max-n (`limits.ServerLimits`); the server checks n, prompts and prompts x n


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# Accepted and ignored: what OpenAI clients (the `openai` package, LangChain) may send that does not change
# the tokens generated. Everything else minisys does not implement is refused (``extra="forbid"``).
MAX_TOOLS = 128               # functions per request
MAX_TOOLS_BYTES = 64 << 10    # their JSON, all together: real tool schemas are a few KB; each is checked per request
MAX_LOGPROBS = 20         # the most alternatives per token a request may ask for (OpenAI's limit and vLLM's default)

IGNORED_FIELDS = {
    "metadata": "OpenAI's key-value tags for stored completions (minisys stores nothing)",
    "store": "OpenAI's flag to store the completion for distillation/evals (minisys stores nothing)",
    "service_tier": "OpenAI's processing tier (minisys has one)",
}


class KVTransferParams(BaseModel):
    """vLLM's ``kv_transfer_params`` (disaggregated prefill, lesson 14; `minisys.server.kv_routes`).

    To a prefill replica: ``{"do_remote_decode": true}``: prefill, sample the first token, hold the
    KV; the response's ``kv_transfer_params`` says where it is. To a decode replica: that
    response's ``kv_transfer_params`` (``do_remote_prefill``, ``remote_rank``,
    ``remote_request_id``): pull the KV and the first token from there, then decode."""

    model_config = ConfigDict(extra="forbid")

    do_remote_decode: StrictBool = False
    do_remote_prefill: StrictBool = False
    remote_rank: Optional[StrictInt] = None
    remote_request_id: Optional[StrictStr] = None
    num_tokens: Optional[StrictInt] = None            # informational (what the prefill computed)
    num_computed_tokens: Optional[StrictInt] = None

    def check(self, world_size: int) -> None:
        """ValueError naming the field when the parameters do not say one thing to do."""
        if self.do_remote_decode == self.do_remote_prefill:
            raise ValueError("kv_transfer_params: give exactly one of do_remote_decode and do_remote_prefill")
        if self.do_remote_prefill:
            if self.remote_rank is None or self.remote_request_id is None:
                raise ValueError("kv_transfer_params.remote_rank and kv_transfer_params.remote_request_id are "
                                 "required with do_remote_prefill")
            if not 0 <= self.remote_rank < world_size:
                raise ValueError(f"kv_transfer_params.remote_rank {self.remote_rank} is not a rank of this KV "
                                 f"group (world size {world_size})")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``. ``schema`` is enforced (``strict`` or not: the output always
    validates); ``name`` and ``description`` are labels OpenAI shows its model, not the prompt: minisys (like
    vLLM) does not put them in the prompt."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr
    description: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (a JSON value valid against ``json_schema.schema``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's ``structured_outputs`` object: exactly one of json (a schema), regex, choice, grammar
    (Lark or GBNF), json_object. vLLM's other options (``disable_any_whitespace``, ``structural_tag``, ...)
    are refused as unknown fields."""

    model_config = ConfigDict(extra="forbid")

    json_: Optional[Union[dict[str, Any], StrictStr]] = Field(None, alias="json")
    regex: Optional[StrictStr] = None
    choice: Optional[list[StrictStr]] = None
    grammar: Optional[StrictStr] = None
    json_object: Optional[StrictBool] = None


class _SamplingRequest(BaseModel):
    """Fields common to completions and chat (OpenAI's, then vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    n: StrictInt = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None    # OpenAI's: {"token id": bias in [-100, 100]}
    user: Optional[StrictStr] = None           # the client: per-user limits, VTC's fair share (lesson 08)
    # vLLM's extensions
    priority: StrictInt = 0                    # lower runs first under --scheduling-policy priority
    # minisys's (lesson 08, Andes): the reader's expected time to first token (s) and pace (tokens/s)
    expected_ttft: Optional[float] = None
    expected_tds: Optional[float] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[float] = None
    kv_transfer_params: Optional[KVTransferParams] = None   # disaggregated prefill (lesson 14)
    prompt_logprobs: Optional[StrictInt] = None         # per prompt token: it + this many alternatives
    truncate_prompt_tokens: Optional[StrictInt] = None  # keep the prompt's last k tokens (-1: as many as fit)
    repetition_penalty: Optional[float] = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: Optional[list[StrictInt]] = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    # structured outputs (`minisys.structured`): OpenAI's response_format, vLLM's structured_outputs and
    # vLLM's older guided_* fields all become one `StructuredOutputsParams`; at most one of them may be given
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Optional[Union[dict[str, Any], StrictStr]] = None
    guided_regex: Optional[StrictStr] = None
    guided_choice: Optional[list[StrictStr]] = None
    guided_grammar: Optional[StrictStr] = None
    # IGNORED_FIELDS: accepted (type-checked) and ignored
    metadata: Optional[dict[str, StrictStr]] = Field(None, description=IGNORED_FIELDS["metadata"])
    store: Optional[StrictBool] = Field(None, description=IGNORED_FIELDS["store"])
    service_tier: Optional[StrictStr] = Field(None, description=IGNORED_FIELDS["service_tier"])

    def _max_tokens(self) -> Optional[int]:
        raise NotImplementedError

    def check_supported(self) -> None:
        """ValueError for what minisys does not implement (instead of silently ignoring it)."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None:
            if self.stream:          # vLLM's rule: the streamed chunks have no place for them
                raise ValueError("prompt_logprobs are not available when stream is true")
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:     # vLLM's -1 (whole vocabulary) is over it too
                raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                 f"got {self.prompt_logprobs!r}")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens == -1
                                                            or self.truncate_prompt_tokens >= 1):
            raise ValueError("truncate_prompt_tokens must be -1 (keep as many as fit) or an integer >= 1, "
                             f"got {self.truncate_prompt_tokens!r}")

    def truncate(self, ids: list[int], max_model_len: int) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the last k tokens of the prompt (its left side is cut).

        None: the prompt as is; -1: k = ``max_model_len - max_tokens`` (all that fit beside the
        output; vLLM's ``max_input_tokens``); a k larger than that is a ValueError naming the field."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        room = max_model_len - (self._max_tokens() or 1)
        if room < 1:
            raise ValueError(f"max_tokens ({self._max_tokens()}) leaves no room for a prompt in the model's "
                             f"context of {max_model_len} tokens")
        if k == -1:
            k = room
        if not 1 <= k <= room:
            raise ValueError(f"truncate_prompt_tokens ({self.truncate_prompt_tokens}) must keep between 1 and "
                             f"max_model_len - max_tokens = {room} tokens")
        return ids[-k:] if k < len(ids) else ids

    def request_meta(self) -> dict:
        """Who asks and how they want to be served, for the scheduling policy (``client``,
        ``priority``, ``qoe``); ValueError naming the field for a bad expectation."""
        given = {k: v for k, v in (("ttft", self.expected_ttft), ("tds", self.expected_tds)) if v is not None}
        qoe = QoESpec(**given) if given else None          # QoESpec checks them, naming the field
        return {"client": self.user, "priority": self.priority, "qoe": qoe}

    def _structured(self) -> Optional[StructuredOutputsParams]:
        """The one structured-output constraint asked for, or None; ValueError naming the field when it is
        malformed or when two fields ask for one."""
        specs: list[StructuredOutputsParams] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            specs.append(StructuredOutputsParams(json_object=True, origin="response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format.json_schema.schema is required when response_format.type is "
                                 "json_schema")
            specs.append(StructuredOutputsParams(json=rf.json_schema.schema_,
                                                 origin="response_format.json_schema.schema"))
        elif rf is not None and rf.json_schema is not None:
            raise ValueError(f"response_format.json_schema is only allowed with type json_schema, not {rf.type}")
        so = self.structured_outputs
        if so is not None:
            specs.append(StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice,
                                                 grammar=so.grammar, json_object=so.json_object))
        for name in ("json", "regex", "choice", "grammar"):
            v = getattr(self, f"guided_{name}")
            if v is not None:
                specs.append(StructuredOutputsParams(**{name: v}, origin=f"guided_{name}"))
        if len(specs) > 1:
            raise ValueError(f"{specs[0].field_name.split('.')[0]}: give one structured-output constraint, got "
                             f"{len(specs)} ({', '.join(s.field_name for s in specs)})")
        return specs[0] if specs else None

    def _logit_bias(self) -> Optional[dict[int, float]]:
        """OpenAI's string keys -> token ids; ValueError naming logit_bias for a key that is not one."""
        if not self.logit_bias:
            return None
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids (integers as strings), got "
                             f"{list(self.logit_bias)[:5]!r}") from None

    def to_sampling_params(self) -> SamplingParams:
        """The engine's parameters; ValueError (-> 400) when a value is out of range."""
        self.check_supported()
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            max_tokens=self._max_tokens(), stop=self.stop, stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(), min_tokens=self.min_tokens,
            structured_outputs=self._structured(),
            output_kind=RequestOutputKind.DELTA)        # the server streams what is new, once


PromptInput = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. ``prompt``: text, token ids, or a list of either (one choice set each)."""

    prompt: PromptInput
    max_tokens: Optional[StrictInt] = 16
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    suffix: Optional[str] = None
    best_of: Optional[StrictInt] = None

    def _max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.suffix:
            raise ValueError("suffix is not supported by minisys")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by minisys (leave it unset or equal to n)")

    def to_sampling_params(self) -> SamplingParams:
        """``logprobs``: the sampled token + that many alternatives per token; with ``echo`` the prompt's
        too (the engine computes the larger of ``logprobs`` and ``prompt_logprobs``; the response cuts
        each list to its own count)."""
        sp = super().to_sampling_params()
        sp.logprobs = self.logprobs
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        sp.prompt_logprobs = max(wanted) if wanted else None
        return sp

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as a list: each a string or a list of token ids. ValueError if there are none."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("the prompt is empty: give a string, a list of token ids, or a list of them")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class FunctionCallParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    arguments: StrictStr          # JSON text of an object, as OpenAI returns it


class ToolCallParam(BaseModel):
    """A call an assistant made, sent back in the history (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")     # name, audio, ...: refused, not ignored

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCallParam]] = None     # an assistant's calls
    tool_call_id: Optional[StrictStr] = None             # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def check(self, i: int) -> None:
        """ValueError naming ``messages.i...`` for a field on the wrong role or arguments that are not JSON."""
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"messages.{i}.tool_calls: only an assistant message has tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"messages.{i}.tool_call_id: only a tool message has a tool_call_id")
        for j, call in enumerate(self.tool_calls or []):
            try:
                json.loads(call.function.arguments)
            except (ValueError, RecursionError):
                raise ValueError(f"messages.{i}.tool_calls.{j}.function.arguments is not JSON: "
                                 f"{call.function.arguments[:60]!r}") from None

    def as_dict(self) -> dict[str, Any]:
        """The message for a chat template: role, content (text), and its tool_calls (arguments parsed
        from JSON, as Hugging Face templates expect) or tool_call_id."""
        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                               for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")    # OpenAI's rule for a function's name


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None      # a JSON schema of an object; left out: no parameters
    strict: Optional[StrictBool] = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": F}}``: call F (forced)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


def _check_tool(i: int, tool: ChatTool) -> None:
    """ValueError naming ``tools[i]...`` for a bad name or a parameters schema that is not one."""
    f = tool.function
    if not _FUNCTION_NAME.fullmatch(f.name):
        raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {f.name[:80]!r}")
    if f.parameters is None:
        return
    import jsonschema
    try:
        jsonschema.Draft202012Validator.check_schema(f.parameters)
    except jsonschema.SchemaError as e:
        raise ValueError(f"tools[{i}].function.parameters is not a valid JSON schema: {e.message[:200]}") from None
    except RecursionError:
        raise ValueError(f"tools[{i}].function.parameters is nested too deeply") from None
    if f.parameters.get("type", "object") != "object":
        raise ValueError(f"tools[{i}].function.parameters must describe an object (\"type\": \"object\"), "
                         f"got type {f.parameters.get('type')!r}")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. ``max_completion_tokens`` wins over the deprecated ``max_tokens``."""

    messages: list[ChatMessage]
    _tool_mode: Optional[tuple] = PrivateAttr(default=None)      # (the checked ToolMode or None,) once checked
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = None
    add_generation_prompt: StrictBool = True
    tools: Optional[list[ChatTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None     # false: at most one call

    def _max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if not self.messages:
            raise ValueError("messages is empty: give at least one message")
        for i, m in enumerate(self.messages):
            m.check(i)

    def tool_mode(self) -> Optional[ToolMode]:
        """What ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` ask for (None: no tools, no calls read);
        ValueError naming the field when they do not fit together. ``tool_choice`` defaults to "auto" when
        there are tools (OpenAI's default); whether "auto" is served is the server's call (`app`).
        Checked once per request (the schemas' check is the costly part), then remembered."""
        if self._tool_mode is None:
            self._tool_mode = (self._check_tools(),)
        return self._tool_mode[0]

    def _check_tools(self) -> Optional[ToolMode]:
        choice = self.tool_choice
        if not self.tools:
            if self.tools is not None:
                raise ValueError("tools is empty: give at least one tool, or leave tools out")
            if choice not in (None, "none"):
                raise ValueError("tool_choice needs tools: give the functions the model may call")
            if self.parallel_tool_calls is not None:
                raise ValueError("parallel_tool_calls needs tools")
            return None
        if len(self.tools) > MAX_TOOLS:
            raise ValueError(f"tools: {len(self.tools)} functions is more than minisys takes ({MAX_TOOLS})")
        size = len(json.dumps([t.model_dump(exclude_none=True) for t in self.tools]))
        if size > MAX_TOOLS_BYTES:
            raise ValueError(f"tools: {size} bytes of function definitions is more than minisys takes "
                             f"({MAX_TOOLS_BYTES}): each schema is checked and compiled per request")
        for i, tool in enumerate(self.tools):
            _check_tool(i, tool)
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: two functions have the same name ({sorted(n for n in set(names) if names.count(n) > 1)})")
        kind = "auto" if choice is None else choice if isinstance(choice, str) else "named"
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if name is not None and name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools ({names})")
        strict = [i for i, t in enumerate(self.tools) if t.function.strict]
        if strict and kind in ("auto", "none"):
            raise ValueError(f"tools[{strict[0]}].function.strict: true is honoured only when the call is forced "
                             f"(tool_choice \"required\" or a named function), not with tool_choice {kind!r}")
        return ToolMode(kind, {t.function.name: t.function.parameters for t in self.tools}, name,
                        parallel=self.parallel_tool_calls is not False)

    def to_sampling_params(self) -> SamplingParams:
        """``logprobs: true``: the sampled token's logprob + ``top_logprobs`` alternatives per token;
        tool_choice "required" or a named function: structured outputs force the call's JSON."""
        sp = super().to_sampling_params()
        sp.logprobs = (self.top_logprobs or 0) if self.logprobs else None
        sp.prompt_logprobs = self.prompt_logprobs
        mode = self.tool_mode()
        forced = mode.forced_schema() if mode is not None else None
        if forced is not None:
            where = f"tools[{list(mode.tools).index(mode.name)}]" if mode.kind == "named" else "tools[*]"
            sp.structured_outputs = _structured_json(forced, getattr(sp, "structured_outputs", None),
                                                     origin=f"{where}.function.parameters")
        return sp

    def tools_for_template(self) -> Optional[list[dict[str, Any]]]:
        """``tools`` as the chat template receives them (OpenAI's dicts), None when there are none."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


def _structured_json(schema: dict[str, Any], already: Any, origin: str) -> StructuredOutputsParams:
    """The structured-outputs parameters that force ``schema``; ``origin``: the request field a schema
    error names (the tool's parameters). ValueError naming tool_choice when the request already
    constrains its output another way."""
    if already is not None:
        raise ValueError("tool_choice \"required\" or a named function forces the output's JSON, so it cannot "
                         "be combined with another output constraint (response_format, structured_outputs)")
    return StructuredOutputsParams(json=schema, origin=origin)


# ------------------------------------------------------------------ responses
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Logprob(BaseModel):
    """vLLM's `Logprob` as its ``prompt_logprobs`` field serializes it."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# vLLM's prompt_logprobs field: per prompt token, None (the first) or {token id: Logprob} of the token
# and its top alternatives (JSON object keys are the ids as strings)
PromptLogprobs = list[Optional[dict[int, Logprob]]]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: per token its text, logprob (None: the first prompt token),
    {text: logprob} of it and its alternatives, and where it starts in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    prompt_logprobs: Optional[PromptLogprobs] = None      # vLLM's: its prompt's (``prompt_logprobs``)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    kv_transfer_params: Optional[dict] = None             # vLLM's: where a prefill's KV waits (lesson 14)


class FunctionCall(BaseModel):
    name: str
    arguments: str                 # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]         # null when the reply is only tool calls
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[PromptLogprobs] = None      # vLLM's: the templated prompt's
    kv_transfer_params: Optional[dict] = None             # vLLM's: where a prefill's KV waits (lesson 14)


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    """A piece of call ``index``: the first carries its id, type and name; the pieces' arguments add up."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minisys"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a ``prompt`` as /v1/completions tokenizes it, or ``messages`` through the
    chat template as /v1/chat/completions does. minisys adds no special tokens to a prompt, so
    ``add_special_tokens`` may only be false."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt or messages: give exactly one of them")
        if self.add_special_tokens:
            raise ValueError("add_special_tokens must be false: minisys adds no special tokens to a prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty: give at least one message")
        for i, m in enumerate(self.messages or []):
            m.check(i)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's): token ids -> the text (special tokens kept)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

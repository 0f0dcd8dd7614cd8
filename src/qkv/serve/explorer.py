"""The attention explorer's questions and answers, without HTTP: ``Explorer`` holds one model and tokenizer and
answers what the page of ``qkv serve`` asks (``qkv.serve`` puts it on the web, behind its token):

- ``info()``                                     the loaded model, its limits, and checkpoints to pick from;
- ``load(checkpoint)``                           load a qkv checkpoint or a pretrained (Hugging Face) directory;
- ``attention({text, target?})``                 every attention map of the text, with token labels;
- ``explain({text, layer, head, token, kind?, target?})``  one head's anatomy (``qkv.explain``);
- ``check_generation({text, max_new_tokens?, temperature?})`` then ``generate(request)``: a continuation,
  piece by piece as each token is chosen.

Each request takes the loaded model once (``current()``, a ``Served``: model, tokenizer and the name it was loaded
from) and is answered by that model alone, its reply naming it (``source``), even when a ``load`` swaps the model
while the request runs. Every request is checked (the type of each field, text length, token counts,
layer/head/token ranges, max new tokens); a bad one raises ``RequestError`` with the HTTP status to answer and a
message, never a stack trace. The static page files (``qkv/serve/static``: plain HTML, CSS, JavaScript and SVG
written for qkv; nothing is fetched from elsewhere) are listed in ``STATIC_FILES``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..explain import explain_head
from ..models import model_type_of, unwrap
from ..tokenizers import Tokenizer
from ..viz.maps import attention_kinds, attention_maps, encode_input

if TYPE_CHECKING:
    from ..generation import GenerationConfig

__all__ = ["Explorer", "Served", "GenerationRequest", "RequestError", "find_checkpoints", "STATIC_FILES"]

# file under qkv/serve/static → its media type; token.html is the page that asks for the token
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
                "token.html": "text/html"}


class RequestError(ValueError):
    """A request the client can fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


def find_checkpoints(root: Path, *, max_depth: int = 4, limit: int = 50) -> list[str]:
    """Directories under ``root`` that ``qkv.load`` recognises (qkv checkpoints and runs, pretrained directories),
    skipping hidden folders such as .venv and .git."""
    from ..loading import LOADERS

    root = Path(root)
    found: list[str] = []
    if not root.is_dir():
        return found
    base_depth = len(root.resolve().parts)
    for here, folders, _ in os.walk(root):
        folders[:] = sorted(f for f in folders if not f.startswith((".", "__")) and f != "node_modules")
        path = Path(here)
        if len(path.resolve().parts) - base_depth >= max_depth:
            folders[:] = []
        if any(recognises(path) for _, recognises, _ in LOADERS):
            found.append(str(path))
            folders[:] = []  # a run directory's step-* checkpoints are reached through it
        if len(found) >= limit:
            break
    return found


@dataclass(frozen=True)
class Served:
    """The model that answers a request, with its tokenizer and the name replies give it (``source``)."""

    model: nn.Module
    tokenizer: Tokenizer
    source: str
    decoder: nn.Module | None = None  # the model /v1 decodes with: a compiled wrapper of ``model`` (--compile)

    @property
    def decoding(self) -> nn.Module:
        """What generation runs: the compiled step when the server compiles, else the model itself."""
        return self.decoder if self.decoder is not None else self.model


@dataclass(frozen=True)
class GenerationRequest:
    """A checked generation request, bound to the model that was checked against it."""

    text: str
    config: GenerationConfig
    served: Served


class Explorer:
    """What the page asks about: one loaded model and tokenizer, and the checks on every request."""

    def __init__(self, model: nn.Module | None = None, tokenizer: Tokenizer | None = None, *,
                 checkpoint: str | Path | None = None, search_root: str | Path | None = None,
                 max_text_chars: int = 2000, max_new_tokens: int = 200, max_drawn_tokens: int = 128,
                 quantize: str | None = None, compile: str | None = None):
        self.lock = threading.Lock()  # one model computation at a time
        self.quantize = quantize  # every checkpoint loaded is quantized so ("int8" | "int4", qkv.load's quantize=)
        self.compile = compile  # a torch.compile backend ("inductor": --compile): /v1 decodes with a compiled step
        self.served: Served | None = None if model is None or tokenizer is None else \
            self._serving(model, tokenizer, "in-process model")
        self.search_root = Path(search_root) if search_root is not None else None
        self.max_text_chars, self.max_new_tokens = max_text_chars, max_new_tokens
        self.max_drawn_tokens = max_drawn_tokens  # a cap on the tokens whose maps go to the page, not on generation
        if checkpoint is not None:
            self.load(str(checkpoint))

    # -- model ------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        return self.served.model if self.served is not None else None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.served.tokenizer if self.served is not None else None

    @property
    def source(self) -> str | None:
        return self.served.source if self.served is not None else None

    def current(self) -> Served:
        """The loaded model, taken once by each request (one attribute read: never one run's model with another's
        tokenizer); 409 when none is loaded."""
        served = self.served
        if served is None:
            raise RequestError("no model is loaded; pick a checkpoint first", HTTPStatus.CONFLICT)
        return served

    def load(self, checkpoint: str) -> dict:
        """Load a checkpoint or pretrained directory with ``qkv.load`` and make it the current model. The message
        for a path that is no checkpoint names no file in it: the page must not become a directory lister."""
        from ..loading import LOADERS, load

        if checkpoint is not None and not isinstance(checkpoint, str):
            raise RequestError(f"checkpoint must be a string (a path in quotes), got {_json_kind(checkpoint)}")
        if not checkpoint or not checkpoint.strip():
            raise RequestError("no checkpoint given; type the path of a checkpoint or pretrained directory")
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise RequestError(f"checkpoint {checkpoint} does not exist; pick a directory written by `qkv train` "
                               "or a pretrained directory", HTTPStatus.NOT_FOUND)
        if not any(recognises(path) for _, recognises, _ in LOADERS):
            known = ", ".join(name for name, _, _ in LOADERS)
            raise RequestError(f"{checkpoint} is not a checkpoint qkv can load (supported: {known}); pick a "
                               "directory written by `qkv train` or a pretrained directory")
        model, tokenizer = load(path, quantize=self.quantize)
        if tokenizer is None:
            raise RequestError(f"{path} has no tokenizer; add its tokenizer.json (or vocab files) to the directory")
        served = self._serving(model.eval(), tokenizer, str(path))
        with self.lock:  # after the computation under way, if any
            self.served = served
        return self.info(served)  # this load's model, whatever another load did since

    def _serving(self, model: nn.Module, tokenizer: Tokenizer, source: str) -> Served:
        """``Served``, with the decode step compiled now (not at the first request) when the server compiles."""
        if self.compile is None or model_type_of(model) != "decoder":
            return Served(model, tokenizer, source)
        from ..generation.compiled import compile_decoder, warm_up

        decoder = compile_decoder(model, backend=self.compile)
        warm_up(decoder)
        return Served(model, tokenizer, source, decoder)

    def info(self, served: Served | None = None) -> dict:
        """The model ``served`` (default: the loaded one), its limits, and checkpoints to pick from."""
        served = served if served is not None else self.served
        candidates = find_checkpoints(self.search_root) if self.search_root else []
        if served is None:
            return {"loaded": False, "checkpoints": candidates, "max_text_chars": self.max_text_chars,
                    "max_new_tokens": self.max_new_tokens, "max_drawn_tokens": self.max_drawn_tokens}
        model, c = served.model, unwrap(served.model).config  # the qkv model inside a wrapper (peft, compile)
        return {
            "loaded": True, "source": served.source, "model_type": model_type_of(model),
            "kinds": attention_kinds(model), "d_model": c.d_model, "n_heads": c.n_heads,
            "d_k": c.d_k, "max_seq_len": c.max_seq_len, "positional": c.positional,
            "n_layers": {kind: c.n_encoder_layers if kind == "encoder" else c.n_decoder_layers
                         for kind in attention_kinds(model)},  # only the kinds this model has
            "can_generate": model_type_of(model) == "decoder", "tokenizer": served.tokenizer.kind,
            "checkpoints": candidates, "max_text_chars": self.max_text_chars,
            "max_new_tokens": self.max_new_tokens, "max_drawn_tokens": self.max_drawn_tokens,
        }

    # -- request checks ---------------------------------------------------------------------------------------
    def _text(self, payload: dict, key: str = "text", *, required: bool = True) -> str | None:
        text = payload.get(key)
        if text is None and not required:
            return None
        if text is not None and not isinstance(text, str):
            raise RequestError(f"the {key} must be a string (text in quotes), got {_json_kind(text)}")
        if not text or not text.strip():
            raise RequestError(f"the {key} is empty; type a sentence")
        if len(text) > self.max_text_chars:
            raise RequestError(f"the {key} has {len(text)} characters; the explorer takes at most "
                               f"{self.max_text_chars}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return text

    @staticmethod
    def _int(payload: dict, key: str, default: int | None = None) -> int:
        value = payload.get(key, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"{key} must be an integer, got {_json_kind(value)}")
        return value

    @staticmethod
    def _kind(payload: dict, model: nn.Module) -> str | None:
        kind = payload.get("kind")
        if kind is None or kind == "":  # the model's first kind
            return None
        if not isinstance(kind, str):  # a name the model lacks is refused by qkv.explain, naming its kinds
            raise RequestError(f"kind must be a string naming an attention of this {model_type_of(model)} model "
                               f"({', '.join(attention_kinds(model))}), got {_json_kind(kind)}")
        return kind

    # -- answers ----------------------------------------------------------------------------------------------
    def attention(self, payload: dict) -> dict:
        served = self.current()
        model, tokenizer = served.model, served.tokenizer
        text, target = self._text(payload), self._text(payload, "target", required=False)
        with self.lock:
            inputs = encode_input(model, tokenizer, text, target)
            n_tokens = max(len(inputs.labels), len(inputs.target_labels))
            if n_tokens > self.max_drawn_tokens:
                raise RequestError(f"the text has {n_tokens} tokens; the explorer draws at most "
                                   f"{self.max_drawn_tokens} "
                                   "(every head's map goes to the page): shorten it",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            maps = attention_maps(model, tokenizer, text, target, inputs=inputs)
        return {**maps.to_dict(), "source": served.source}

    def explain(self, payload: dict) -> dict:
        served = self.current()
        model, tokenizer = served.model, served.tokenizer
        text, target = self._text(payload), self._text(payload, "target", required=False)
        kind = self._kind(payload, model)
        layer, head, token = (self._int(payload, key) for key in ("layer", "head", "token"))
        with self.lock:
            found = explain_head(model, tokenizer, text, layer=layer, head=head, token=token, kind=kind,
                                 target=target)
        return {**found.to_dict(), "source": served.source}

    def check_generation(self, payload: dict) -> GenerationRequest:
        """Validate a generation request before the stream starts (prompt checked too), against the model that
        will answer it."""
        from ..generation import GenerationConfig

        served = self.current()
        model, tokenizer = served.model, served.tokenizer
        if model_type_of(model) != "decoder":
            raise RequestError(f"a {model_type_of(model)} model does not continue text; load a decoder "
                               "(language model) checkpoint to generate", HTTPStatus.CONFLICT)
        text = self._text(payload)
        n_new = self._int(payload, "max_new_tokens", 20)
        if not 1 <= n_new <= self.max_new_tokens:
            raise RequestError(f"max_new_tokens={n_new} is out of range; ask for 1 to {self.max_new_tokens}")
        try:
            temperature = float(payload.get("temperature", 0.0))
        except (TypeError, ValueError):
            raise RequestError(f"temperature must be a number, got {payload.get('temperature')!r}") from None
        if not 0.0 <= temperature <= 10.0:
            raise RequestError(f"temperature={temperature} is out of range; use 0 (greedy) to 10")
        try:  # the model's own check; past the context the text helpers slide a window, as qkv generate does
            unwrap(model).check_fits(len(tokenizer.encode(text)), n_new, sliding_window=True, what="prompt")
        except ValueError as err:
            raise RequestError(str(err)) from None
        return GenerationRequest(text, GenerationConfig(max_new_tokens=n_new, temperature=temperature), served)

    def generate(self, request: GenerationRequest) -> Iterator[dict]:
        """Yield the continuation piece by piece (``qkv.generation.stream_text``), as each token is chosen, from
        the model the request was checked against."""
        from ..generation import stream_text

        served = request.served
        pieces = stream_text(served.decoding, served.tokenizer, request.text, config=request.config)
        while True:
            with self.lock:  # one model step at a time, shared with the other requests
                piece = next(pieces, None)
            if piece is None:
                return
            yield {"text": piece}


def _json_kind(value: object) -> str:
    """A JSON value as an error names it, in JSON's spelling: ``5 (a number)``, ``true (a boolean)``."""
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return f"{shown if len(shown) <= 40 else shown[:37] + '...'} ({kind})"

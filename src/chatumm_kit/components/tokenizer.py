"""The chat tokenizer: a byte-level BPE with the stream's special tokens bound to roles (SPEC §2).

:class:`ChatTokenizer` wraps a ``tokenizers.Tokenizer`` (no weights, a plain class). It knows which token plays
which role in the serialized stream (``im_start`` opens a text segment, ``vision_end`` closes an image view, …,
see :class:`SpecialTokens`) and encodes *text only*: special-token strings typed inside a text are encoded as
ordinary bytes, so a user cannot inject a marker. Markers are placed by the packer, never by ``encode``.

Three ways to get one:

* :meth:`ChatTokenizer.train` — train a byte-level BPE on an iterable of strings (the ShapesChat world);
* :meth:`ChatTokenizer.from_file` — load what :meth:`ChatTokenizer.save` wrote;
* :meth:`ChatTokenizer.from_pretrained_dir` — load a Qwen2.5-style folder (BAGEL's tokenizer, SPEC §5).

An optional role prefix ("User: " / "Assistant: ") is a template choice (SPEC §2); it is prepended to the first
text segment of each turn by :meth:`ChatTokenizer.encode_segment`, which both the packer and inference use.

Example:
    >>> tok = ChatTokenizer.train(["draw a red circle", "a blue square"] * 10, vocab_size=300)
    >>> tok.im_start_id, tok.pad_id
    (0, 5)
    >>> tok.decode(tok.encode("draw a <|im_end|>")) == "draw a <|im_end|>"
    True
    >>> tok.im_end_id in tok.encode("draw a <|im_end|>")
    False
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SpecialTokens", "ChatTokenizer", "TokenizerError", "TOKENIZER_FILE", "SIDECAR_FILE"]

TOKENIZER_FILE = "tokenizer.json"
SIDECAR_FILE = "chatumm_tokenizer.json"  # role → token-name map and template, so roles survive save/load
_SIDECAR_FORMAT = "chatumm_tokenizer/v1"
_ROLES = ("user", "assistant", "system")


class TokenizerError(ValueError):
    """A tokenizer file or folder that cannot serve the stream; the message names the file and the token."""


@dataclass(frozen=True)
class SpecialTokens:
    """Names of the stream's special tokens (SPEC §2). Defaults are the Qwen2.5/BAGEL names plus ``end``/``pad``.

    Attributes:
        im_start: opens a text segment.
        im_end: closes a text segment.
        vision_start: opens an image view (ViT or VAE).
        vision_end: closes an image view.
        end: closes an assistant turn; only ever a CE *label*, never placed in the stream.
        pad: fills image-token slots of ``input_ids`` and padding splits; never a label.

    Example:
        >>> SpecialTokens(pad="<|endoftext|>").pad
        '<|endoftext|>'
    """

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    end: str = "<|end|>"
    pad: str = "<|pad|>"

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, str) or not v:
                raise TokenizerError(f"SpecialTokens.{f.name} must be a non-empty string, got {v!r}")
        names = self.as_dict()
        seen: dict[str, str] = {}
        for role, name in names.items():
            if name in seen:
                raise TokenizerError(f"SpecialTokens.{role} and SpecialTokens.{seen[name]} are both {name!r}")
            seen[name] = role

    @classmethod
    def coerce(cls, value: SpecialTokens | Mapping[str, str] | None) -> SpecialTokens:
        """Accept a :class:`SpecialTokens`, a role → name mapping (from YAML), or ``None`` (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise TokenizerError(f"SpecialTokens: unknown roles {sorted(unknown)}")
            return cls(**dict(value))
        raise TypeError(f"expected SpecialTokens or a mapping of role names, got {type(value).__name__}")

    def as_dict(self) -> dict[str, str]:
        """Role → token string, in field order."""
        return asdict(self)

    @property
    def names(self) -> list[str]:
        """The six token strings, in field order (the order :meth:`ChatTokenizer.train` gives them ids 0..5)."""
        return list(self.as_dict().values())


class ChatTokenizer:
    """Text ↔ ids for the serialized stream, with the special-token roles bound to ids.

    The wrapped tokenizer is taken over (not copied): role tokens are registered as special added tokens and
    special-token matching inside text is switched off, so ``encode`` never yields a special id.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary holds every token named in ``special``.
        special: the role → token-string map.
        user_prefix: template text prepended to the first text segment of each user turn (default none).
        assistant_prefix: the same for assistant turns; it is then part of the supervised text.

    Raises:
        TokenizerError: a role token is missing from the vocabulary (the message lists which).

    Example:
        >>> tok = ChatTokenizer.train(["hello world"] * 5, vocab_size=280, user_prefix="User: ")
        >>> tok.decode(tok.encode_segment("hi", role="user", first_in_turn=True))
        'User: hi'
    """

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        special: SpecialTokens | Mapping[str, str] = SpecialTokens(),
        user_prefix: str = "",
        assistant_prefix: str = "",
        source: str = "<in memory>",
    ) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"ChatTokenizer(tokenizer=...) expects a tokenizers.Tokenizer, got {type(tokenizer)}")
        special = SpecialTokens.coerce(special)
        missing = [
            f"{role}={name!r}" for role, name in special.as_dict().items() if tokenizer.token_to_id(name) is None
        ]
        if missing:
            raise TokenizerError(
                f"tokenizer {source}: special tokens missing from the vocabulary: {', '.join(missing)}; "
                "use ChatTokenizer.from_pretrained_dir to add them, or pass SpecialTokens naming tokens it has"
            )
        # Register every role token as a *special* added token (keeps its id): decode can then skip it, and with
        # encode_special_tokens=True the same string typed in user text is encoded as plain bytes.
        registered = tokenizer.get_added_tokens_decoder()
        to_mark = [
            AddedToken(name, special=True, normalized=False)
            for name in special.names
            if not (
                (tid := tokenizer.token_to_id(name)) in registered
                and registered[tid].special
                and registered[tid].content == name
            )
        ]
        if to_mark:
            tokenizer.add_special_tokens(to_mark)
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self._special = special
        self._source = source
        self._ids = {role: int(tokenizer.token_to_id(name)) for role, name in special.as_dict().items()}
        self._prefix = {"user": str(user_prefix), "assistant": str(assistant_prefix)}
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.added_tokens: tuple[str, ...] = ()  # set by from_pretrained_dir: roles the folder lacked

    # ------------------------------------------------------------------ ids and sizes
    @property
    def special(self) -> SpecialTokens:
        return self._special

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (for batch encoding and inspection)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Smallest embedding table that holds every id (``max id + 1``, added tokens included)."""
        return self._vocab_size

    @property
    def im_start_id(self) -> int:
        return self._ids["im_start"]

    @property
    def im_end_id(self) -> int:
        return self._ids["im_end"]

    @property
    def vision_start_id(self) -> int:
        return self._ids["vision_start"]

    @property
    def vision_end_id(self) -> int:
        return self._ids["vision_end"]

    @property
    def end_id(self) -> int:
        return self._ids["end"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def special_ids(self) -> dict[str, int]:
        """Role → id for all six roles."""
        return dict(self._ids)

    @property
    def user_prefix(self) -> str:
        return self._prefix["user"]

    @property
    def assistant_prefix(self) -> str:
        return self._prefix["assistant"]

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; adds no special tokens and never produces one (typed marker strings become bytes)."""
        if not isinstance(text, str):
            raise TypeError(f"ChatTokenizer.encode expects str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` the role tokens (and other special tokens) are left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def role_prefix(self, role: str) -> str:
        """The template prefix of ``role`` (``"user"``, ``"assistant"`` or ``"system"``; a ``Role`` enum works too).
        A system turn has none: BAGEL enters its system prompt as plain text (SPEC §4.1)."""
        key = getattr(role, "value", role)
        if key == "system":
            return ""
        if key not in self._prefix:
            raise ValueError(f"unknown role {role!r}; expected one of {_ROLES}")
        return self._prefix[key]

    def encode_segment(self, text: str, *, role: str, first_in_turn: bool) -> list[int]:
        """Content ids of one text segment (markers excluded), with the role prefix on a turn's first text segment.

        The prefix and the text are encoded together, exactly as a template would render them.
        """
        prefix = self.role_prefix(role) if first_in_turn else ""
        return self.encode(prefix + text)

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 1024,
        special: SpecialTokens | Mapping[str, str] = SpecialTokens(),
        min_frequency: int = 2,
        user_prefix: str = "",
        assistant_prefix: str = "",
    ) -> ChatTokenizer:
        """Train a byte-level BPE on ``texts``.

        The six special tokens get ids ``0..5`` in :class:`SpecialTokens` field order, then the 256 byte symbols,
        then merges, up to ``vocab_size`` (fewer if the corpus has no more pairs with ``min_frequency``).

        Example:
            >>> tok = ChatTokenizer.train(["a cat", "a dog"] * 4, vocab_size=270)
            >>> tok.vision_end_id, tok.vocab_size <= 270
            (3, True)
        """
        special = SpecialTokens.coerce(special)
        n_min = len(special.names) + 256
        if vocab_size < n_min:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: 6 special tokens + 256 bytes need {n_min}")
        tok = Tokenizer(models.BPE())
        # No prefix space: the packer encodes each segment on its own, and "draw" should stay "draw".
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(n, special=True, normalized=False) for n in special.names],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(
            tokenizer=tok,
            special=special,
            user_prefix=user_prefix,
            assistant_prefix=assistant_prefix,
            source="<trained>",
        )

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``chatumm_tokenizer.json`` (roles + template) into folder ``path``.

        Returns the folder. :meth:`from_file` on it restores an equal tokenizer.
        """
        folder = Path(path)
        if folder.suffix == ".json":
            raise TokenizerError(f"ChatTokenizer.save expects a folder, got the file name {str(folder)!r}")
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        sidecar = {
            "format": _SIDECAR_FORMAT,
            "special": self._special.as_dict(),
            "user_prefix": self.user_prefix,
            "assistant_prefix": self.assistant_prefix,
        }
        (folder / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_file(cls, path: str | Path, *, special: SpecialTokens | Mapping[str, str] | None = None) -> ChatTokenizer:
        """Load a tokenizer written by :meth:`save`: a folder, or its ``tokenizer.json``.

        Roles and prefixes come from ``chatumm_tokenizer.json`` beside it; ``special`` overrides the roles (and is
        the fallback, default names, when there is no sidecar). Every role token must already be in the file.
        """
        file = _tokenizer_file(Path(path))
        sidecar = _read_sidecar(file.parent / SIDECAR_FILE)
        roles = SpecialTokens.coerce(special or sidecar.get("special"))
        return cls(
            tokenizer=_load_backend(file),
            special=roles,
            user_prefix=sidecar.get("user_prefix", ""),
            assistant_prefix=sidecar.get("assistant_prefix", ""),
            source=str(file),
        )

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | Path,
        *,
        special: SpecialTokens | Mapping[str, str] = SpecialTokens(),
        user_prefix: str = "",
        assistant_prefix: str = "",
    ) -> ChatTokenizer:
        """Load a Qwen2.5-style folder (``tokenizer.json`` holding the im/vision markers as added tokens).

        ``im_start``, ``im_end``, ``vision_start`` and ``vision_end`` must be in the folder (a Qwen2.5 tokenizer has
        them; inventing them would leave the core markers untrained). Roles the folder lacks — by default
        ``<|end|>`` and ``<|pad|>`` — are **added as new special tokens** after the last id; they are listed in
        :attr:`added_tokens`, and the model's embedding and lm_head must then cover :attr:`vocab_size` (grow them
        if the checkpoint's table is smaller; Qwen2.5 tables have spare rows). To reuse an existing token instead,
        name it, e.g. ``SpecialTokens(pad="<|endoftext|>")``.
        """
        special = SpecialTokens.coerce(special)
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"from_pretrained_dir: {str(folder)!r} is not a folder")
        file = _tokenizer_file(folder)
        tok = _load_backend(file)
        required = ("im_start", "im_end", "vision_start", "vision_end")
        names = special.as_dict()
        missing = [f"{r}={names[r]!r}" for r in required if tok.token_to_id(names[r]) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer {file}: required marker tokens missing: {', '.join(missing)} "
                "(a Qwen2.5 tokenizer.json holds them as added tokens)"
            )
        added = tuple(n for n in special.names if tok.token_to_id(n) is None)
        if added:
            tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in added])
        out = cls(
            tokenizer=tok,
            special=special,
            user_prefix=user_prefix,
            assistant_prefix=assistant_prefix,
            source=str(file),
        )
        out.added_tokens = added
        return out

    def __repr__(self) -> str:
        return f"ChatTokenizer(vocab_size={self.vocab_size}, special={self._ids}, source={self._source!r})"


# ---------------------------------------------------------------------- file helpers
def _tokenizer_file(path: Path) -> Path:
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"tokenizer file not found: {str(file)!r}")
    return file


def _load_backend(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise TokenizerError(f"tokenizer file {str(file)!r} is malformed: {e}") from None


def _read_sidecar(file: Path) -> dict:
    """Parse ``chatumm_tokenizer.json``; empty dict when absent."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{str(file)!r} is malformed JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != _SIDECAR_FORMAT:
        raise TokenizerError(f"{str(file)!r}: expected an object with format {_SIDECAR_FORMAT!r}")
    out: dict = {}
    if "special" in data:
        raw = data["special"]
        known = {f.name for f in fields(SpecialTokens)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise TokenizerError(f"{str(file)!r}: 'special' must map roles {sorted(known)} to token strings")
        out["special"] = SpecialTokens.coerce(raw)
    for key in ("user_prefix", "assistant_prefix"):
        if key in data:
            if not isinstance(data[key], str):
                raise TokenizerError(f"{str(file)!r}: {key!r} must be a string")
            out[key] = data[key]
    return out

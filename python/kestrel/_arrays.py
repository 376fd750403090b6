"""Token id inputs in the forms transformers users pass them (list, list of lists, NumPy array,
torch tensor when torch is installed), turned into plain prompts and back into the same type."""

import numpy as np


def _torch():
    """The torch module when it is installed and already in use (never imported for us)."""
    import sys

    return sys.modules.get("torch")


def is_torch_tensor(value):
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class TokenInput:
    """`input_ids` (and `attention_mask`) as prompts: `prompts[i]` is row i's tokens without the
    padding. `kind` is "list" (one prompt), "lists" (a list of prompts), "numpy" or "torch";
    `rows` and `width` are the array's shape (1-D arrays count as one row)."""

    def __init__(self, input_ids, attention_mask=None, name="input_ids"):
        self.device = None
        self.dtype = None
        self.one_dim = False
        self.pad_left = []
        if is_torch_tensor(input_ids):
            self.kind = "torch"
            self.device = input_ids.device
            self.torch_dtype = input_ids.dtype
            array = input_ids.detach().cpu().numpy()
        elif isinstance(input_ids, np.ndarray):
            self.kind = "numpy"
            array = input_ids
        elif isinstance(input_ids, (list, tuple)):
            array = None
            if all(is_int(t) for t in input_ids):
                self.kind = "list"
                self.prompts = [[int(t) for t in input_ids]]
            elif all(isinstance(p, (list, tuple)) for p in input_ids):
                self.kind = "lists"
                self.prompts = []
                for i, p in enumerate(input_ids):
                    if not all(is_int(t) for t in p):
                        raise ValueError(f"{name}[{i}] must be a list of ints")
                    self.prompts.append([int(t) for t in p])
            else:
                raise ValueError(f"{name} must be a list of ints or a list of lists of ints")
            if attention_mask is not None:
                self._check_list_mask(attention_mask, input_ids)
        else:
            raise ValueError(
                f"{name} must be a list, a list of lists, a NumPy array or a torch tensor, "
                f"not {type(input_ids).__name__}"
            )
        if array is not None:
            self._from_array(array, attention_mask, name)
        if not self.prompts:
            raise ValueError(f"{name} holds no prompt")
        for i, p in enumerate(self.prompts):
            if not p:
                raise ValueError(f"{name}: prompt {i} is empty")
            # The engine names ids outside the model's vocabulary; these do not fit its type.
            if min(p) < 0 or max(p) >= 2**31:
                bad = next(t for t in p if t < 0 or t >= 2**31)
                raise ValueError(f"{name}: prompt {i}: token id {bad} is not a token id")

    def _check_list_mask(self, mask, input_ids):
        """Lists carry no padding, so their mask (a tokenizer's output passed on with **) can only
        be all ones of the same shape."""
        rows = [input_ids] if self.kind == "list" else input_ids
        masks = [mask] if self.kind == "list" else mask
        ok = isinstance(masks, (list, tuple)) and len(masks) == len(rows)
        for row, m in zip(rows, masks if ok else []):
            ok = ok and isinstance(m, (list, tuple)) and len(m) == len(row)
            ok = ok and all(v == 1 for v in m)
        if not ok:
            raise ValueError(
                "attention_mask with lists of ids must be all ones of the same shape (lists are "
                "not padded); pass a padded array for a mask with zeros"
            )

    def _from_array(self, array, attention_mask, name):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, not {array.dtype}")
        if array.ndim == 1:
            self.one_dim = True
            array = array[None, :]
        elif array.ndim != 2:
            raise ValueError(f"{name} must have 1 or 2 dimensions, not {array.ndim}")
        self.dtype = array.dtype
        self.array = array  # [rows, width]: the prompt part of the output, padding as given
        self.rows, self.width = array.shape
        if attention_mask is None:
            mask = np.ones_like(array)
        else:
            if is_torch_tensor(attention_mask):
                attention_mask = attention_mask.detach().cpu().numpy()
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != array.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)} but {name} has "
                    f"{tuple(array.shape)}"
                )
        self.prompts = []
        for r in range(self.rows):
            row_mask = mask[r] != 0
            n_real = int(row_mask.sum())
            if n_real == 0:
                raise ValueError(f"attention_mask row {r} masks every token")
            pad = self.width - n_real
            if row_mask[:pad].any() or not row_mask[pad:].all():
                raise ValueError(
                    f"attention_mask row {r} is not left padding (zeros, then ones); "
                    "decoder-only generation needs tokenizer.padding_side = 'left'"
                )
            self.pad_left.append(pad)
            self.prompts.append([int(t) for t in array[r, pad:]])

    def sequences(self, generated, pad_token_id):
        """Prompt + generated tokens of every row, in the input's type: arrays keep their input
        (left padding included) and are padded on the right with `pad_token_id` to the longest
        row, as transformers returns them. An array keeps its integer type where that type
        holds every token id (below 2**31) and the padding id, int32 and wider; narrower ones
        come back as int64, whatever was generated (an int16 array's continuation used to wrap
        around in its input's type)."""
        if self.kind == "list":
            return self.prompts[0] + generated[0]
        if self.kind == "lists":
            return [p + g for p, g in zip(self.prompts, generated)]
        longest = max(len(g) for g in generated)
        out = np.full((self.rows, self.width + longest), pad_token_id, dtype=np.int64)
        out[:, : self.width] = self.array
        for r, gen in enumerate(generated):
            out[r, self.width : self.width + len(gen)] = gen
        limits = np.iinfo(self.dtype)
        keep = limits.min <= min(0, pad_token_id) and max(2**31 - 1, pad_token_id) <= limits.max
        out = out.astype(self.dtype) if keep else out
        return self._as_input_type(out[0] if self.one_dim else out, keep_dtype=keep)

    def logits(self, rows_logits):
        """[rows, width, vocab] logits in the input's array type (float32). A single unpadded row
        is the engine's array itself, not a copy; positions of left padding are zero."""
        if self.kind in ("list", "lists") and len(rows_logits) == 1:
            out = rows_logits[0][None]
        elif self.kind == "lists":
            if len({len(p) for p in self.prompts}) != 1:
                raise ValueError(
                    "prompts of different lengths: pass a padded array with an attention_mask"
                )
            out = np.stack(rows_logits)
        elif self.rows == 1 and self.pad_left[0] == 0:
            out = rows_logits[0][None]
        else:
            vocab = rows_logits[0].shape[1]
            out = np.zeros((self.rows, self.width, vocab), dtype=np.float32)
            for r, row in enumerate(rows_logits):
                out[r, self.pad_left[r] :] = row
        if self.kind == "torch":
            torch = _torch()
            return torch.from_numpy(out).to(self.device)
        return out

    def _as_input_type(self, array, keep_dtype=True):
        if self.kind == "torch":
            torch = _torch()
            return torch.from_numpy(np.ascontiguousarray(array)).to(
                device=self.device, dtype=self.torch_dtype if keep_dtype else torch.int64
            )
        return array

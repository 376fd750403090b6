"""Streamers in the shape of transformers': generate() calls put(ids) with the prompt and then
with each new token, and end() when it finishes (also after an error or Ctrl-C)."""

import queue
import sys

import numpy as np


class TextStreamer:
    """Decodes tokens as they come and hands finished text to on_finalized_text (which prints it;
    override it to send the text elsewhere). Text ending in an incomplete UTF-8 character (U+FFFD)
    is held back until the character completes."""

    def __init__(self, tokenizer, skip_prompt=False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self._ids = []
        self._printed = 0
        self._next_is_prompt = True

    def put(self, value):
        ids = np.asarray(value).reshape(-1).tolist()
        if self._next_is_prompt:
            self._next_is_prompt = False
            if self.skip_prompt:
                return
        self._ids.extend(i for i in ids if i >= 0)
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs)
        if text.endswith("\n"):
            # Start over after a line, so decoding stays proportional to one line's tokens.
            ready = text[self._printed :]
            self._ids = []
            self._printed = 0
        else:
            end = len(text)
            while end > self._printed and text[end - 1] == "\ufffd":
                end -= 1
            ready = text[self._printed : end]
            self._printed = end
        if ready:
            self.on_finalized_text(ready)

    def end(self):
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs) if self._ids else ""
        ready = text[self._printed :]
        self._ids = []
        self._printed = 0
        self._next_is_prompt = True
        self.on_finalized_text(ready, stream_end=True)

    def on_finalized_text(self, text, stream_end=False):
        sys.stdout.write(text)
        if stream_end:
            sys.stdout.write("\n")
        sys.stdout.flush()


class TextIteratorStreamer(TextStreamer):
    """Iterate over it in one thread while generate() runs in another:

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
        for text in streamer: print(text, end="")

    `timeout` (seconds) bounds each wait for text; queue.Empty is raised past it."""

    def __init__(self, tokenizer, skip_prompt=False, timeout=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text, stream_end=False):
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value

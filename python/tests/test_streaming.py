"""Streaming text while generate() runs in another thread, Ctrl-C (KeyboardInterrupt) during
generation, and exceptions raised inside a streamer."""

import _thread
import threading

import pytest

import kestrel
from conftest import tokenizer_dir


@pytest.fixture(scope="module")
def model():
    # A real Qwen2 vocabulary (random weights), so the Qwen tokenizer decodes what it generates.
    return kestrel.AutoModelForCausalLM.from_pretrained("synthetic:tiny-qwen2", device="cpu")


@pytest.fixture(scope="module")
def tokenizer(source_dir):
    return kestrel.AutoTokenizer.from_pretrained(tokenizer_dir(source_dir, "qwen3"))


def test_text_iterator_streamer_gives_the_decoded_output(model, tokenizer):
    ids = tokenizer("Once upon a time").input_ids
    streamer = kestrel.TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=300)
    result = []
    thread = threading.Thread(
        target=lambda: result.append(
            model.generate(ids, max_new_tokens=40, eos_token_id=None, streamer=streamer)
        )
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(result) == 1 and len(result[0]) == len(ids) + 40
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(result[0][len(ids):])
    # Without skip_prompt the prompt's text comes first.
    seen = []

    class Collect(kestrel.TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            seen.append(text)

    out = model.generate(ids, max_new_tokens=8, eos_token_id=None, streamer=Collect(tokenizer))
    assert "".join(seen) == tokenizer.decode(out)


class InterruptingStreamer:
    """Sends Ctrl-C to the main thread at the `at`-th new token."""

    def __init__(self, at):
        self.at = at
        self.calls = 0
        self.ended = False

    def put(self, value):
        self.calls += 1
        if self.calls == self.at + 1:  # the first put is the prompt
            _thread.interrupt_main()

    def end(self):
        self.ended = True


def test_ctrl_c_in_a_streamer_stops_generation(model):
    prompt = [9, 8, 7, 6]
    expected = model.generate(prompt, max_new_tokens=12, eos_token_id=None)
    streamer = InterruptingStreamer(at=3)
    with pytest.raises(KeyboardInterrupt):
        model.generate(prompt, max_new_tokens=400, eos_token_id=None, streamer=streamer)
    assert streamer.ended
    assert streamer.calls < 400  # it stopped early
    # The model is usable afterwards and gives the same tokens.
    assert model.generate(prompt, max_new_tokens=12, eos_token_id=None) == expected


def test_ctrl_c_while_the_gil_is_released(model):
    # No streamer: the engine runs without the GIL and checks for Ctrl-C at every step. The
    # generation is far longer than the timer, so the signal arrives during it.
    prompt = [5, 4, 3]
    timer = threading.Timer(0.3, _thread.interrupt_main)
    model.last_generate_stats = None
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            model.generate(prompt, max_new_tokens=4000, eos_token_id=None)
    finally:
        timer.cancel()
    assert model.last_generate_stats is None  # no result was recorded
    assert len(model.generate(prompt, max_new_tokens=5, eos_token_id=None)) == 8


def test_streamer_exceptions_propagate(model, tokenizer):
    class Broken(kestrel.TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            if not stream_end:
                raise RuntimeError("streamer broke")

    # Raised from inside generation (the prompt is skipped, so the first text is a new token's).
    with pytest.raises(RuntimeError, match="streamer broke"):
        model.generate(
            [1, 2, 3], max_new_tokens=10, eos_token_id=None,
            streamer=Broken(tokenizer, skip_prompt=True),
        )
    with pytest.raises(ValueError, match="batch of one"):
        model.generate([[1, 2], [3]], max_new_tokens=2, streamer=Broken(tokenizer))


def test_threads_take_turns_and_a_streamer_cannot_reenter(model):
    prompt = [11, 12, 13]
    expected = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(model.generate(prompt, max_new_tokens=10,
                                                         eos_token_id=None))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3

    class Reentrant:
        def put(self, value):
            if len(value) == 1:  # a new token, not the prompt
                model.generate(prompt, max_new_tokens=2)

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="already running on this thread"):
        model.generate(prompt, max_new_tokens=4, streamer=Reentrant())
    assert model.generate(prompt, max_new_tokens=10, eos_token_id=None) == expected

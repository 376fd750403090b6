#!/usr/bin/env python3
"""Chat with (or continue text from) a model through Kestrel's transformers-style API, streaming
the reply as it is generated.

    PYTHONPATH=build/python python3 python/examples/generate.py synthetic:qwen2-0.5b \
        --tokenizer .cache/tokenizers/qwen3/models --prompt "Tell me about kestrels."
    PYTHONPATH=build/python python3 python/examples/generate.py MODEL_DIR --chat --prompt "Hi!"

The model is a Hugging Face directory, a directory written by save_low_bit, or synthetic:NAME
(random weights: the text is noise, the speed is real). Ctrl-C stops the reply.
"""

import argparse
import threading
import time

from kestrel import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--low-bit", default="sym_int4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--save-low-bit", metavar="DIR", help="also save the converted model")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, load_in_low_bit=args.low_bit, device=args.device
    )
    print(model)
    if args.save_low_bit:
        model.save_low_bit(args.save_low_bit)
        print(f"saved to {args.save_low_bit}; reload with AutoModelForCausalLM.load_low_bit")

    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        input_ids = tokenizer(args.prompt).input_ids
    sampling = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0}

    # generate() runs on the main thread, where Ctrl-C lands (it raises KeyboardInterrupt there
    # and ends the stream); another thread prints the text as it comes.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    printer = threading.Thread(target=lambda: [print(t, end="", flush=True) for t in streamer])
    printer.start()
    start = time.perf_counter()
    try:
        ids = model.generate(
            input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling
        )
    except KeyboardInterrupt:
        printer.join()
        print("\n[stopped]")
        return
    seconds = time.perf_counter() - start
    printer.join()
    n_new = len(ids) - len(input_ids)
    print(f"\n[{n_new} tokens in {seconds:.2f} s: {n_new / seconds:.1f} tok/s]")


if __name__ == "__main__":
    main()

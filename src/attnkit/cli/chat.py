"""``attnkit chat``: an interactive conversation with a Llama chat model (default: SmolLM2).

Each line read from stdin is a user message; the whole conversation so far goes through the
model's chat template, the answer streams to stdout and joins the history. An empty line, EOF
(Ctrl-D) or ``/quit`` ends the session; ``/reset`` forgets the history.
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_model_options, chat_stop_tokens, load, speed_report, stream_answer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a Llama chat model in the terminal (default: SmolLM2-135M-Instruct)",
        description="Read messages from stdin, answer each with the model's chat template applied to the "
        "conversation so far, streaming the answer. Empty line, Ctrl-D or /quit ends; /reset forgets.",
    )
    add_model_options(parser)
    parser.add_argument("--system", help="a system message that opens the conversation")
    parser.add_argument("--speed", action="store_true", help="print prefill/decode tokens/s after each answer")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer, path = load(args)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the model has no chat template; use attnkit generate --prompt")
    stops = chat_stop_tokens(model, tokenizer, args.stop_token)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"attnkit chat · {path} · empty line or Ctrl-D to quit, /reset to forget", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        message = line.strip()
        if not line or not message or message == "/quit":
            return 0
        if message == "/reset":
            history = list(opening)
            continue
        ids = tokenizer.chat_prompt(message, history)
        limit = model.config.max_position_embeddings - args.max_new_tokens
        if len(ids) > limit:
            raise ValueError(f"the conversation ({len(ids)} tokens) no longer fits the model's context; /reset to start over")
        new, prefill_s, decode_s = stream_answer(model, tokenizer, ids, args, stops)
        print(file=sys.stdout, flush=True)
        if args.speed:
            print(speed_report(len(ids), len(new), prefill_s, decode_s), file=sys.stderr)
        answer = tokenizer.decode([t for t in new if t not in stops])
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]

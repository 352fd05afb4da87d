"""``attnkit chat``: an interactive conversation with a Llama chat model (default: SmolLM2).

Each line read from stdin is a user message; the whole conversation so far goes through the
model's chat template, the answer streams to stdout and joins the history. An empty line, EOF
(Ctrl-D) or ``/quit`` ends the session; ``/reset`` forgets the history. Ctrl-C during an answer
ends that answer (what was shown joins the history) and the conversation goes on; a message
that no longer fits the model's context is refused with a note, and the conversation goes on too.
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_model_options, chat_stop_tokens, check_model_options, load, speed_report, stream_answer


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
    path = check_model_options(args)
    if args.max_new_tokens == 0:
        raise ValueError("--max-new-tokens must be at least 1 in a chat")
    model, tokenizer = load(args, path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the model has no chat template; use attnkit generate --prompt")
    context = model.config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message: the model's "
                         f"context holds {context} tokens in all")
    stops = chat_stop_tokens(model, tokenizer, args.stop_token)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"attnkit chat · {path} · empty line or Ctrl-D to quit, /reset to forget, Ctrl-C stops an answer",
              file=sys.stderr)
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
        if len(ids) + args.max_new_tokens > context:
            print(f"attnkit: the conversation with this message ({len(ids)} tokens) and an answer of up to "
                  f"{args.max_new_tokens} tokens do not fit the model's context of {context} tokens; /reset to "
                  "start over", file=sys.stderr)
            continue
        answer = stream_answer(model, tokenizer, ids, args, stops)
        print(file=sys.stdout, flush=True)
        if args.speed:
            print(speed_report(len(ids), answer), file=sys.stderr)
        if answer.interrupted and not answer.ids:
            continue
        text = tokenizer.decode([t for t in answer.ids if t not in stops])
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]

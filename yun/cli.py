"""`yun serve | generate | chat | bench | eval | admin`: one entry point.

Engine flags are generated from `EngineConfig`'s fields (with their help text), so the
CLI and the Python API never disagree about what can be set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Iterator

from yun.cli_flags import add_dataclass_flags, engine_config_from
from yun.config import EngineConfig

if TYPE_CHECKING:
    from yun.engine.engine import LLMEngine
    from yun.sampling_params import SamplingParams

def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="Most tokens to generate (default: %(default)s).")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="Sampling temperature; 0 = greedy (default: %(default)s).")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1).")
    g.add_argument("--top-k", type=int, default=0, help="Keep the k most likely tokens; 0 = off.")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="Drop tokens below min_p x the top token's probability; 0 = off.")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Penalise tokens already seen (>1 discourages); 1 = off.")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="Subtract from tokens already generated (OpenAI semantics).")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="Subtract per occurrence of a generated token (OpenAI semantics).")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="Seed for this generation (reproducible sampling).")
    g.add_argument("--stop", action="append", default=None,
                   help="Stop at this string (repeatable); it is not printed.")
    g.add_argument("--ignore-eos", action="store_true",
                   help="Keep generating past the end-of-sequence token.")


def sampling_params_from(args: argparse.Namespace, engine: "LLMEngine") -> "SamplingParams":
    """The flags' SamplingParams, built once by the engine's input processor."""
    return engine.inputs.sampling_params(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


# ---- generate / chat ------------------------------------------------------------------------
def _stream(engine, token_ids: list[int], params, prompt: str | None,
            counter: list[int] | None = None) -> Iterator[str]:
    """Run one request on the engine, yielding new text as it appears.

    `counter[0]` (if given) tracks the number of generated tokens."""
    rid = engine.new_request_id()
    engine.add_request(rid, token_ids, params, prompt=prompt)
    sent = 0
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                text = out.outputs[0].text
                if counter is not None:
                    counter[0] = len(out.outputs[0].token_ids)
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
    finally:
        engine.abort(rid)


def _load_engine(args: argparse.Namespace):
    from yun.demo import DEMO_NOTICE
    from yun.engine.engine import LLMEngine
    from yun.model_source import DEMO_RANDOM

    if args.model == DEMO_RANDOM:
        print(f"yun: {DEMO_NOTICE}", file=sys.stderr, flush=True)
    return LLMEngine(engine_config_from(args))


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _load_engine(args)
    params = sampling_params_from(args, engine)
    ids = engine.inputs.encode(args.prompt)
    start, count = time.perf_counter(), [0]
    for piece in _stream(engine, ids, params, args.prompt, count):
        sys.stdout.write(piece)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print()
    print(f"[{count[0]} tokens in {elapsed:.2f} s, {count[0] / elapsed:.1f} tokens/s, "
          f"prompt {len(ids)} tokens]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _load_engine(args)
    params = sampling_params_from(args, engine)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("yun chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:  # the server's template-then-encode path (yun/engine/inputs.py)
            prompt, ids = engine.inputs.render_chat(history)
            sys.stdout.write("assistant> ")
            for piece in _stream(engine, ids, params, prompt):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except ValueError as e:
            print(f"\nyun: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args: argparse.Namespace) -> int:
    from yun.server import serve
    from yun.server.settings import ServerSettings

    settings = ServerSettings(**{f.name: getattr(args, f.name) for f in fields(ServerSettings)})
    config = engine_config_from(args)
    if config.tensor_parallel_size > 1:  # under torchrun, ranks other than 0 are workers
        from yun.distributed.parallel import Rendezvous
        from yun.distributed.worker import run_worker

        rdv = Rendezvous.from_environ(os.environ)
        if rdv is not None and rdv.rank != 0:
            run_worker(config, rdv)
            return 0
    serve(config, settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yun", description="yun (云): serve and run open-weight language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server.",
                       description="Serve a model over the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models, /metrics ...).")
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, model folder or hub id (default: SmolLM2-135M-Instruct; "
                        "'demo-random' for the random-weight benchmark checkpoint).")
    add_dataclass_flags(p, EngineConfig, skip={"model"})
    from yun.server.settings import ServerSettings

    add_dataclass_flags(p, ServerSettings)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="Generate text for one prompt, streamed to the terminal.")
    p.add_argument("prompt", help="The prompt text (not chat-templated).")
    add_dataclass_flags(p, EngineConfig)
    add_sampling_flags(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="Interactive multi-turn chat in the terminal.")
    p.add_argument("--system", default=None, help="System prompt for the conversation.")
    add_dataclass_flags(p, EngineConfig)
    add_sampling_flags(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    from yun.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from yun.eval.cli import add_eval_parser

    add_eval_parser(sub)
    from yun.tenants.cli import add_admin_parser

    add_admin_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"yun: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

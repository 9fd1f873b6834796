"""What a grammar mask costs the sampler per token: the same logits sampled with and
without guided rows, step by step along a real JSON answer, interleaved in one run.

    .venv/bin/python scripts/bench_grammar_mask.py [--rows 1 8] [--threads 2]

Uses the Qwen2 vocabulary (151,936 logits per row) and the demo tokenizer; no model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from yun.demo import write_qwen2_tokenizer
from yun.engine.guided import GuidedDecoder
from yun.engine.sampler import Sampler, SamplingRow
from yun.sampling_params import GuidedDecoding, SamplingParams
from yun.tokenizer import Tokenizer

V = 151936
EOS = 151645
# A tool-arguments-like schema (what OpenAI strict mode allows: no string lengths) ...
TYPICAL = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"}, "hourly": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["city", "unit", "days", "hourly", "tags"], "additionalProperties": False}
TYPICAL_ANSWER = ('{"city": "San Francisco, CA", "unit": "celsius", "days": 3, "hourly": false, '
                  '"tags": ["rain", "wind"]}')
# ... and one with bounded strings, which xgrammar cannot precompute masks for.
BOUNDED = {**TYPICAL, "properties": {**TYPICAL["properties"],
                                     "city": {"type": "string", "maxLength": 24}}}


def measure(tok: Tokenizer, dec: GuidedDecoder, schema: dict, answer: str, rows: int,
            greedy: bool, repeats: int = 7) -> tuple[float, float]:
    """Seconds (without, with) a grammar on every row, summed over the answer's tokens."""
    spec = GuidedDecoding(json=schema)
    ids = tok.encode(answer, add_special_tokens=False) + [EOS]
    params = SamplingParams(temperature=0.0 if greedy else 1.0)
    states = [dec.new_state(spec, [EOS]) for _ in range(rows)]

    def batch(guided: bool) -> list[SamplingRow]:
        return [SamplingRow(params, None if greedy else torch.Generator().manual_seed(i), [1],
                            [2], states[i] if guided else None) for i in range(rows)]

    sampler, plain_s, guided_s = Sampler(), 0.0, 0.0
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(0))
    for token in ids:
        best = [float("inf"), float("inf")]
        for _ in range(repeats):  # interleaved: both see the same machine load
            for k, guided in enumerate((False, True)):
                x = logits.clone()
                t = time.perf_counter()
                sampler(x, batch(guided))
                best[k] = min(best[k], time.perf_counter() - t)
        plain_s += best[0]
        guided_s += best[1]
        for st in states:
            st.accept(token)
    return plain_s / len(ids), guided_s / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp()
    write_qwen2_tokenizer(folder)
    tok = Tokenizer.from_folder(folder)
    dec = GuidedDecoder(tok.hf, V, [EOS])
    for name, schema in (("typical schema", TYPICAL), ("maxLength string", BOUNDED)):
        dec.compile(GuidedDecoding(json=schema))  # compile outside the timing
        for rows in args.rows:
            for greedy in (True, False):
                plain, guided = measure(tok, dec, schema, TYPICAL_ANSWER, rows, greedy)
                print(f"{name:17s} rows={rows:<3d} {'greedy ' if greedy else 'sampled'}  "
                      f"sampler {plain * 1e3:7.2f} ms -> {guided * 1e3:7.2f} ms per token "
                      f"(x{guided / plain:.2f}, +{(guided - plain) / rows * 1e3:.2f} ms per "
                      f"guided row)", flush=True)
    print(json.dumps({"vocab": V, "threads": args.threads}))


if __name__ == "__main__":
    main()

"""`yun bench`: seeded workloads, an offline runner over `yun.LLM`, an HTTP load generator
that speaks the OpenAI API like any client, peers run side by side (transformers,
llama.cpp), the machine's ceilings (roofline), and the report (table, JSON, PNG).

    workloads.py  the standard workloads (single, mixed, shared-prefix, sweep)
    metrics.py    per-request timings and their summary (TTFT, TPOT, ITL, E2E)
    roofline.py   bandwidth and FLOP/s probes; bytes and FLOPs per token; ceilings
    offline.py    `yun bench throughput`: a workload through the engine
    online.py     `yun bench serve`: the asyncio load generator
    baselines.py  transformers and llama.cpp on the same checkpoint and workload
    report.py     tables, ratios, JSON, plots
    cli.py        the flags
"""

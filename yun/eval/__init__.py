"""`yun eval`: compare OpenAI-compatible endpoints on the same task items, with paired
statistics. Modules: tasks (+ lm_eval_yaml), endpoints, client, cache, scorers (+
sandbox), runner, stats, report, cli."""

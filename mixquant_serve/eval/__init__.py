"""Answer-quality evaluation: what quantized prefill (Mix-Quant) and full quantization cost against bf16.

    suite_gen.py, domains.py   deterministic agentic long-context suite (seed in, groups of items out)
    suite.py                   its shape, JSON-lines storage, prompt tokens
    configs.py                 the five configurations (prefill precision, decode precision)
    kv.py, decoding.py         forkable KV sequences; prefill, greedy decoding, teacher forcing
    runner.py                  runs the configurations on a suite, sharing prefills
    scoring.py, metrics.py     exact-match rules; accuracy, agreement, KL, loss fractions
    report.py, cli.py          tables, results JSON, `mixquant eval quality` / `mixquant eval suite`
"""

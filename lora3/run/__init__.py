"""The experiment app: `python -m lora3.run rank=8 backend=jax` (Hydra; configs in `conf/`).

One job reads top to bottom in `lora3.run.job`; the modules beside it are its steps:

    schema      the typed config (Hydra structured configs; `lora3.LoraConfig` is the `lora` node)
    data/       translation pairs: synthetic, local files, JSONL, WMT16 through `datasets`
    backend     chooses the keras backend before keras is imported
    models      keras-hub models, tokenizers and the packing of pairs into batches
    pretrain    the small trained base the offline default adapts
    train       the training loop (compile, fit per eval period, checkpoints)
    evaluate    validation/test loss, greedy generation, BLEU and chrF (sacrebleu)
    tracking    Weights & Biases (online, offline, disabled)
    cli         the command line: Hydra's entry point, sweeps, a child process per backend

Nothing here imports keras at module level: `backend=` must take effect before keras is imported.
"""

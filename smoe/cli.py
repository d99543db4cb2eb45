"""The `smoe` command line: parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _sampling(args):
    from smoe.generation import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop or [])


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")


def _add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="aot", choices=["aot", "jit"], default=None,
                   help="compile the decode step: on the CPU ahead of time (aot, the default: AOTInductor, built "
                        "once per model shape in tens of seconds and kept on disk) or by torch.compile (jit); "
                        "a CUDA graph on GPU")
    p.add_argument("--aot", action="store_true", help=argparse.SUPPRESS)  # the same as --compile (older name)


def _compile_mode(args) -> bool | str:
    """stream()'s compile argument for the --compile / --aot flags."""
    return "aot" if args.aot else {None: False, "aot": True, "jit": "jit"}[args.compile]


def _log_to_stderr(name: str) -> None:
    """Show the INFO messages of one smoe logger on stderr (stdout carries the generated text)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _load(args):
    from smoe import Transformer, load_tokenizer
    return Transformer.from_pretrained(args.model, dtype=args.dtype), load_tokenizer(args.model)


def cmd_info(args) -> None:
    from smoe.model.config import describe, get_preset
    if args.preset:
        cfg = get_preset(args.preset)
    else:
        from pathlib import Path

        from smoe.checkpoint import read_config
        cfg = read_config(Path(args.model))[0]
    print(describe(cfg))


def cmd_init(args) -> None:
    from smoe.checkpoint import init_random
    from smoe.model.config import get_preset
    cfg = get_preset(args.preset)
    if args.max_seq_len:
        cfg = cfg.replace(max_seq_len=args.max_seq_len)
    model = init_random(cfg, args.out, tokenizer=args.tokenizer, seed=args.seed, dtype=args.dtype)
    total, active = cfg.num_params()
    print(f"wrote a random {args.preset} model ({total / 1e6:.1f}M params, {active / 1e6:.1f}M active, "
          f"{model.dtype}) to {args.out}")


def cmd_generate(args) -> None:
    from smoe.generation import stream
    _log_to_stderr("smoe.generation")  # e.g. the one-time build of a compiled decode step
    model, tok = _load(args)
    if args.backend:
        model.set_moe_backend(args.backend)
    started = False  # the prompt goes out with the first token, after any message about building the step
    for ev in stream(model, args.prompt, _sampling(args), tok, compile=_compile_mode(args)):
        sys.stdout.write(ev.text if started else args.prompt + ev.text)
        sys.stdout.flush()
        started = True
    sys.stdout.write(("" if started else args.prompt) + "\n")


def cmd_chat(args) -> None:
    from smoe.generation.chat import chat_loop
    _log_to_stderr("smoe.generation")
    model, tok = _load(args)
    if sys.stdin.isatty():
        print(f"chatting with {args.model}: /reset clears the conversation, /exit or Ctrl-D ends")
    chat_loop(model, tok, _sampling(args), system=args.system, compile=_compile_mode(args))


def cmd_convert(args) -> None:
    from smoe.checkpoint import convert
    model = convert(args.src, args.dst, format=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {args.dst} ({args.format} layout, {model.dtype})")


def cmd_quickstart(args) -> None:
    from smoe.quickstart import quickstart
    quickstart(out=args.out, minutes=args.minutes, corpus=args.corpus, tokenizer=args.tokenizer,
               vocab_size=args.vocab_size, seed=args.seed, max_steps=args.max_steps)


def cmd_data_prepare(args) -> None:
    from smoe.train.data import prepare, summary
    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   workers=args.workers)
    print(summary(meta))
    print(f"wrote {args.out}")


def cmd_tokenizer_train(args) -> None:
    from smoe.tokenizer.bpe import train_bpe
    from smoe.train.data import expand_inputs
    tok = train_bpe(expand_inputs(args.inputs), args.vocab_size, args.out, min_frequency=args.min_frequency,
                    max_bytes=int(args.max_mb * 1e6) if args.max_mb else None, seed=args.seed)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} ids: <unk> <s> </s>, 256 byte tokens, "
          f"{tok.vocab_size - 259} learned)")


def cmd_train(args) -> None:
    from smoe.train.pretrain import train
    from smoe.train.recipes import RECIPES, apply_overrides, get_recipe
    if args.list:
        for name in RECIPES:
            print(f"{name:>14}: {get_recipe(name).description}")
        return
    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else []) + (
        [f"data={args.data}"] if args.data else [])
    result = train(apply_overrides(get_recipe(args.recipe), overrides), resume=args.resume)
    print(f"stopped at step {result['step']} ({result['stop_reason']}); checkpoint {result['checkpoint']}"
          + (f"; model {result['final']}" if result["final"] else ""))


def cmd_export(args) -> None:
    from smoe.train.export import export
    out = export(args.src, args.out, dtype=args.dtype)
    print(f"wrote {out} (Hugging Face layout + tokenizer)")


def _lora(args):
    from smoe.train.lora import LoRAConfig
    return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_targets) if args.lora else None


def cmd_sft(args) -> None:
    from smoe.train.sft import SFT_LORA_LR, SFT_TRAIN, SFTConfig, finetune_config, run_sft
    lora = _lora(args)
    train = finetune_config(SFT_TRAIN, args.overrides, out_dir=args.out, max_steps=args.max_steps,
                            lr=args.lr or (SFT_LORA_LR if lora else None), batch_size=args.batch_size,
                            grad_accum=args.grad_accum, seed=args.seed)
    cfg = SFTConfig(model=args.model, data=args.data, val_data=args.val_data, val_fraction=args.val_fraction,
                    truncation=args.truncation, seq_len=args.seq_len, epochs=args.epochs, exact_match=args.exact_match,
                    dtype=args.dtype, tokenizer=args.tokenizer, lora=lora, train=train)
    run_sft(cfg, resume=args.resume)


def cmd_dpo(args) -> None:
    from smoe.train.dpo import DPO_LORA_LR, DPO_TRAIN, DPOConfig, run_dpo
    from smoe.train.sft import finetune_config
    lora = _lora(args)
    train = finetune_config(DPO_TRAIN, args.overrides, out_dir=args.out, max_steps=args.max_steps,
                            lr=args.lr or (DPO_LORA_LR if lora else None), batch_size=args.batch_size,
                            grad_accum=args.grad_accum, seed=args.seed)
    cfg = DPOConfig(model=args.model, data=args.data, val_data=args.val_data, val_fraction=args.val_fraction,
                    beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss, nll_coef=args.nll_coef,
                    seq_len=args.seq_len,
                    ref=args.ref, epochs=args.epochs, exact_match=args.exact_match, dtype=args.dtype,
                    tokenizer=args.tokenizer, lora=lora, train=train)
    run_dpo(cfg, resume=args.resume)


def cmd_merge_adapters(args) -> None:
    from smoe.train.lora import merge_adapters
    print(f"wrote {merge_adapters(args.base, args.adapters, args.out, args.dtype)} (adapters merged, HF layout)")


def _add_finetune(p: argparse.ArgumentParser, out: str, epochs: float, lr: str) -> None:
    p.add_argument("overrides", nargs="*", help="key=value training settings: warmup_steps=50 aux_coef=0.02 "
                   "autocast=bf16 eval_every=100 ...")
    p.add_argument("--model", required=True, help="checkpoint directory to start from (its tokenizer is used)")
    p.add_argument("--data", required=True, help="JSONL training file")
    p.add_argument("--val-data", default=None, help="held-out JSONL (default: hold out --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--out", default=out, help="run directory: checkpoints, logs, final/ (the exported model)")
    p.add_argument("--epochs", type=float, default=epochs, help="passes over the data (unless --max-steps)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help=lr)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context, "
                   "at most 2048)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="training dtype of the weights (default fp32; see autocast=bf16)")
    p.add_argument("--tokenizer", default=None, help="default: the model directory's")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="wq,wk,wv,wo,w1,w2,w3", help="attention wq wk wv wo, experts w1 w2 w3")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")


def cmd_eval(args) -> None:
    from smoe.eval import evaluate, suite_listing
    from smoe.eval.suite import SuiteOptions

    def csv(s):
        return [x.strip() for x in s.split(",") if x.strip()] if s else None
    suite = args.suite or ("mixtral" if args.benchmarks or args.categories or not args.tasks else None)
    if args.list:
        print(suite_listing(suite or "mixtral"))
        return
    if not args.model:
        raise ValueError("eval needs a checkpoint directory (or --list)")
    options = SuiteOptions(code_samples=args.code_samples, pass_ks=tuple(int(k) for k in csv(args.pass_k)),
                           maj_temperature=args.maj_temperature, max_gen_toks=args.max_gen_toks)
    model_args = {k: v for k, v in dict(dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                                        seed=args.seed).items() if v is not None}
    if args.server:  # the server owns dtype and device
        model_args = {k: v for k, v in model_args.items() if k in ("batch_size", "seed")}
    _, markdown = evaluate(args.model, suite=suite, categories=csv(args.categories), benchmarks=csv(args.benchmarks),
                           tasks=csv(args.tasks), num_fewshot=args.num_fewshot, include_path=args.include_path,
                           limit=args.limit, data_dir=args.data_dir, out_dir=args.out, options=options,
                           model_args=model_args, server=args.server)
    print(markdown)
    if args.out:
        print(f"wrote {args.out}/report.md and {args.out}/report.json")


def cmd_serve(args) -> None:
    from smoe.engine import EngineConfig
    from smoe.serve import serve
    config = EngineConfig(kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    serve(args.model, args.host, args.port, api_key=args.api_key, max_queue=args.max_queue,
          served_model_name=args.served_model_name, dtype=args.dtype, device=args.device, backend=args.backend,
          engine_config=config, drain_timeout=args.drain_timeout, access_log=args.access_log,
          engine_process=not args.engine_thread)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe", description="Sparse Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="config, total/active parameters and memory of a model or preset")
    p.add_argument("model", nargs="?", help="checkpoint directory")
    p.add_argument("--preset", help="a named preset instead of a checkpoint")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("init", help="create a random-weight model (HF layout) with a tokenizer")
    p.add_argument("out")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or file (default: the Mistral one "
                   "matching the vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("generate", help="generate from a prompt, streaming to stdout")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--backend", default=None, help="MoE backend: naive | grouped | triton")
    _add_compile(p)
    _add_sampling(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the model's chat format")
    p.add_argument("model")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p, max_tokens=512)
    _add_compile(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("convert", help="convert a checkpoint between the HF and consolidated layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=["hf", "consolidated"], required=True)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("quickstart", help="the main job: train a small SMoE on the Python standard library (~10 "
                       "min on 2 CPU cores) and generate from it")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget, everything included (default: 10)")
    p.add_argument("--corpus", default=None, help="text files/folder/glob to train on (default: the stdlib)")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "mixtral"],
                   help="a BPE trained on the corpus (default) or Mixtral's 32000-id tokenizer")
    p.add_argument("--vocab-size", type=int, default=4096, help="ids of the trained BPE (default: 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: fit the "
                   "budget)")
    p.set_defaults(fn=cmd_quickstart)

    p = sub.add_parser("data", help="training data: `smoe data prepare INPUTS... --tokenizer T --out DIR`")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="tokenize text files (.txt .md .py .jsonl) into memory-mapped tokens")
    q.add_argument("inputs", nargs="+", help="files, folders and globs")
    q.add_argument("--tokenizer", required=True, help="tokenizer directory/file, or a name such as 'mixtral'")
    q.add_argument("--out", required=True)
    q.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    q.set_defaults(fn=cmd_data_prepare)

    p = sub.add_parser("tokenizer", help="`smoe tokenizer train INPUTS... --vocab-size N --out DIR`")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True)
    q = tok_sub.add_parser("train", help="train a byte-fallback BPE tokenizer (tokenizer.json) on text files")
    q.add_argument("inputs", nargs="+", help="files, folders and globs")
    q.add_argument("--vocab-size", type=int, required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--min-frequency", type=int, default=2)
    q.add_argument("--max-mb", type=float, default=None, help="train on a seeded sample of this many MB")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_tokenizer_train)

    p = sub.add_parser("train", help="train an SMoE from a recipe: `smoe train --recipe NAME data=DIR [key=value]`")
    p.add_argument("overrides", nargs="*", help="key=value: model.dim=128, lr=1e-3, max_steps=500, autocast=bf16, ...")
    p.add_argument("--recipe", default="small", help="recipe name (--list shows them)")
    p.add_argument("--data", default=None, help="prepared data directory (same as data=DIR)")
    p.add_argument("--out", default=None, help="run directory (same as out_dir=DIR)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="export a run (latest checkpoint) or a checkpoint to the HF layout")
    p.add_argument("src", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("sft", help="supervised fine-tuning on chats (JSONL of {\"messages\": [...]}), "
                       "assistant tokens only")
    _add_finetune(p, "runs/sft", 3.0, "default 1e-4, with --lora 1e-3")
    p.add_argument("--truncation", choices=["truncate", "skip"], default="truncate",
                   help="conversations longer than --seq-len: cut or skip (counted either way)")
    p.add_argument("--exact-match", type=int, default=0, help="score greedy replies to N held-out prompts "
                   "(last assistant turn) at each evaluation")
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("dpo", help="Direct Preference Optimization on pairs (JSONL of prompt, chosen, rejected)")
    _add_finetune(p, "runs/dpo", 1.0, "default 5e-6, with --lora 5e-5")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference model")
    p.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO (sigmoid) or IPO")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label noise")
    p.add_argument("--nll-coef", type=float, default=0.0, help="add this times the chosen responses' NLL (RPO)")
    p.add_argument("--ref", choices=["precompute", "live"], default="precompute",
                   help="reference log-probs computed once before training, or by a frozen model every step")
    p.add_argument("--exact-match", type=int, default=0, help="score greedy replies to N held-out prompts against "
                   "the chosen response at each evaluation")
    p.set_defaults(fn=cmd_dpo)

    p = sub.add_parser("merge-adapters", help="merge saved LoRA adapters into their base model and export it")
    p.add_argument("base", help="the base checkpoint the adapters were trained on")
    p.add_argument("adapters", help="adapter directory (RUN/adapters)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.set_defaults(fn=cmd_merge_adapters)

    p = sub.add_parser("eval", help="the Mixtral paper's benchmarks (or any lm-eval tasks), offline, with a report")
    p.add_argument("model", nargs="?", help="checkpoint directory")
    p.add_argument("--suite", default=None, help="benchmark suite (default: mixtral, unless --tasks is given)")
    p.add_argument("--categories", help="comma-separated: commonsense, world_knowledge, reading, math, code, "
                   "aggregated, bias")
    p.add_argument("--benchmarks", help="comma-separated benchmark keys of the suite (see --list)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks or groups to run besides (or instead of) the suite")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots for --tasks (default: the task's)")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task at most (a fraction if < 1)")
    p.add_argument("--data-dir", default=None, help="local dataset copies, laid out as DIR/org/name")
    p.add_argument("--out", default=None, help="folder for report.md and report.json")
    p.add_argument("--batch-size", default=None, help="requests per batch (int or auto)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of sampled generations")
    p.add_argument("--code-samples", type=int, default=1, help="samples per code problem (1: greedy)")
    p.add_argument("--pass-k", default="1", help="comma-separated k of pass@k (k <= --code-samples)")
    p.add_argument("--maj-temperature", type=float, default=0.6, help="sampling temperature of maj@k")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens in maj@k and code tasks")
    p.add_argument("--server", default=None, help="URL of a running `smoe serve` to score instead (MODEL: the "
                   "checkpoint directory whose tokenizer it uses)")
    p.add_argument("--list", action="store_true", help="print the suite table and exit")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (paged KV cache, continuous batching)")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SMOE_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a slot at most; more get 429")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the MODEL argument)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 | fp64 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    p.add_argument("--backend", default=None, help="MoE backend: naive | grouped | triton")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 4GiB (default: 80%% of free GPU "
                   "memory, 2GiB on CPU)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in the running batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (prefill chunk size)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--engine-thread", action="store_true", help="run the engine on a thread of the server process "
                   "instead of a process of its own (the default, so that model steps and HTTP do not share a GIL)")
    p.set_defaults(fn=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info" and not (args.model or args.preset):
        parser.error("info needs a checkpoint directory or --preset NAME")
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, no traceback
        print(f"smoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The quickstart: train a small Mixtral-architecture SMoE (8 experts, top-2) from scratch on the Python
standard library's own source, in about 10 minutes on 2 CPU cores, then report and generate from it.

Steps: find the corpus (the running interpreter's stdlib, site-packages excluded) -> train a 4096-id
byte-fallback BPE on it -> tokenize it with a held-out validation split -> train for the time left ->
validation loss and perplexity against a unigram baseline, expert load per layer, samples, next commands.
The tokenizer and data are cached in the output folder and reused when the corpus has not changed.
Why these choices (tokenizer, size, schedule): docs/training.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from smoe.train.data import TokenData, expand_inputs, prepare, summary
from smoe.train.recipes import Recipe, apply_overrides, get_recipe

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n",
           "    for i in range(", "if __name__ == '__main__':\n"]
FINAL_RESERVE_S = 35.0  # kept for the final evaluation, export, samples and report
# A smaller shape for budgets of a minute or two (and the test of the quickstart itself).
MINI = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.hidden_dim=128",
        "seq_len=128", "batch_size=8", "warmup_steps=10", "log_every=5", "eval_every=50", "eval_tokens=8192"]
MINI_BELOW_MINUTES = 3.0


def stdlib_files() -> list[Path]:
    """The .py files of the running interpreter's standard library (site-packages and dist-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library folder {root} (from sysconfig) does not exist")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files = sorted(f for f in files if f.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: pass --corpus PATH")
    return files


def _fingerprint(files: list[Path], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(folder: Path, key: str) -> bool:
    stamp = folder / "quickstart-source.json"
    return stamp.exists() and json.loads(stamp.read_text()).get("key") == key


def _stamp(folder: Path, key: str) -> None:
    (folder / "quickstart-source.json").write_text(json.dumps({"key": key}) + "\n")


def prepare_corpus(files: list[Path], out: Path, tokenizer: str, vocab_size: int, seed: int) -> Path:
    """Tokenizer (trained BPE or Mixtral's) and prepared data for the corpus, reused when unchanged."""
    from smoe.tokenizer.bpe import train_bpe
    name = f"bpe{vocab_size}" if tokenizer == "bpe" else tokenizer
    key = _fingerprint(files, {"tokenizer": name, "seed": seed})
    tok_dir, data_dir = out / f"tokenizer-{name}", out / f"data-{name}"
    if tokenizer == "bpe":
        if not _cached(tok_dir, key):
            t = time.perf_counter()
            print(f"training a {vocab_size}-id byte-fallback BPE tokenizer on (up to 8 MB of) the corpus ...")
            shutil.rmtree(tok_dir, ignore_errors=True)
            train_bpe(files, vocab_size, tok_dir, max_bytes=8_000_000, seed=seed, show_progress=False)
            _stamp(tok_dir, key)
            print(f"  done in {time.perf_counter() - t:.1f}s -> {tok_dir}")
        else:
            print(f"reusing the tokenizer in {tok_dir} (same corpus)")
        tok_spec = str(tok_dir)
    else:
        tok_spec = tokenizer
    if not _cached(data_dir, key):
        t = time.perf_counter()
        print(f"tokenizing {len(files)} files into {data_dir} (5% of the files held out for validation) ...")
        shutil.rmtree(data_dir, ignore_errors=True)
        meta = prepare(files, tok_spec, data_dir, val_fraction=0.05, seed=seed)
        _stamp(data_dir, key)
        print(f"  done in {time.perf_counter() - t:.1f}s")
    else:
        meta = TokenData(data_dir).meta
        print(f"reusing the tokenized data in {data_dir} (same corpus)")
    print("  " + summary(meta).replace("\n", "\n  "))
    return data_dir


def quickstart_recipe(minutes: float, data_dir: Path, run_dir: Path, seed: int, extra: list[str] | None = None
                      ) -> Recipe:
    """The quickstart recipe for this budget: the measured default shape, a smaller one for short budgets."""
    overrides = (MINI if minutes < MINI_BELOW_MINUTES else []) + [
        f"data={data_dir}", f"out_dir={run_dir}", f"seed={seed}", "max_steps=0"] + list(extra or [])
    return apply_overrides(get_recipe("quickstart"), overrides)


def _report(result: dict, run_dir: Path, data_dir: Path, started: float, n_files: int) -> None:
    from smoe.train.logs import read_records
    ev = [r for r in read_records(run_dir) if r.get("kind") == "eval"][-1]
    data = TokenData(data_dir)
    mins = (time.perf_counter() - started) / 60
    print("\n" + "=" * 100)
    print(f"trained {result['step']} steps ({result['tokens_seen']:,} tokens) in {result['elapsed_s'] / 60:.1f} min; "
          f"{mins:.1f} min in all on {os.cpu_count()} CPU threads ({result['stop_reason']})")
    print(f"\nvalidation: {ev['val_tokens']:,} tokens spread over the {data.meta['splits']['val']['documents']} "
          f"held-out files (of {n_files}; none of them trained on)")
    print(f"  {'':<18}{'loss (nats/token)':>18}{'perplexity':>12}{'bits/byte':>11}")
    print(f"  {'this model':<18}{ev['val_loss']:>18.3f}{ev['val_ppl']:>12.2f}{ev.get('val_bits_per_byte', 0):>11.3f}")
    if ev.get("unigram_loss") is not None:
        print(f"  {'unigram baseline':<18}{ev['unigram_loss']:>18.3f}{ev['unigram_ppl']:>12.2f}"
              f"{ev.get('unigram_bits_per_byte', 0):>11.3f}")
        ratio = ev["unigram_ppl"] / ev["val_ppl"]
        print(f"  perplexity {ratio:.1f}x lower than the unigram baseline" if ratio >= 1 else
              f"  perplexity {1 / ratio:.1f}x HIGHER than the unigram baseline (too few steps to learn)")
        print("  (unigram: token frequencies of the training split, scored on the same validation tokens)")
    load = ev["val_load"]
    E = len(load[0])
    print(f"\nexpert load on the validation tokens (% of token-slots per expert; {100 / E:.1f}% each is perfect "
          f"balance):")
    print("  layer  " + " ".join(f"{'e' + str(e):>6}" for e in range(E)) + "   max/mean")
    for i, row in enumerate(load):
        print(f"  {i:>5}  " + " ".join(f"{100 * x:>6.1f}" for x in row) + f"   {ev['val_imbalance'][i]:>8.2f}")
    print(f"\nmodel (Hugging Face layout + tokenizer): {result['final']}")
    print(f"training checkpoints:                    {run_dir / 'checkpoints'}")
    print(f"plots:                                   {run_dir / 'loss.png'}, {run_dir / 'expert_load.png'}")
    print(f"logs:                                    {run_dir / 'metrics.jsonl'}   "
          f"(tensorboard --logdir {run_dir / 'tb'})")


def _samples(final: Path) -> None:
    from smoe import Transformer, load_tokenizer
    from smoe.generation import generate
    model, tok = Transformer.from_pretrained(final), load_tokenizer(final)
    print("\nsamples (temperature 0.8, top-p 0.95, 80 tokens):")
    for i, prompt in enumerate(PROMPTS[:4]):
        c = generate(model, prompt, tokenizer=tok, max_tokens=80, temperature=0.8, top_p=0.95, seed=i)
        print(f"--- {prompt!r}\n{prompt}{c.text}")


def _next_commands(final: Path, data_dir: Path, run_dir: Path) -> None:
    print(f"""
next:
  smoe generate {final} --prompt "def parse_args(" --max-tokens 120 --temperature 0.8 --seed 0
  smoe chat {final}            # the Mixtral chat format; a pretrained-only model just continues text
  smoe serve {final}           # OpenAI-compatible server on http://127.0.0.1:8000/v1
  smoe train --recipe quickstart data={data_dir} out_dir={run_dir} --resume max_steps=2000 max_minutes=none
                                 # keep training this model
  smoe quickstart --minutes 30   # a longer budget; --corpus PATH for your own text""")


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 10.0, corpus: str | Path | None = None,
               tokenizer: str = "bpe", vocab_size: int = 4096, seed: int = 0, max_steps: int | None = None,
               overrides: list[str] | None = None, samples: bool = True) -> dict:
    """Train a small SMoE from scratch within `minutes` (all steps included) and report on it.

    max_steps stops earlier (a fixed amount of work whatever the machine's speed)."""
    from smoe.train.pretrain import train
    started = time.perf_counter()
    if minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if tokenizer not in ("bpe", "mixtral"):
        raise ValueError(f"--tokenizer must be 'bpe' or 'mixtral', got {tokenizer!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        files = stdlib_files()
        corpus_name = f"the Python {sys.version.split()[0]} standard library ({sysconfig.get_paths()['stdlib']})"
    else:
        files = expand_inputs([corpus])
        corpus_name = str(corpus)
    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {corpus_name}: {len(files)} files, {size / 1e6:.1f} MB; budget {minutes:g} minutes")
    data_dir = prepare_corpus(files, out, tokenizer, vocab_size, seed)
    run_dir = out / "train"
    if run_dir.exists():
        print(f"starting afresh: removing the previous quickstart run in {run_dir}")
        shutil.rmtree(run_dir)
    left_min = (minutes * 60 - (time.perf_counter() - started) - FINAL_RESERVE_S) / 60
    extra = [f"max_minutes={max(left_min, 0.1):.3f}"] + ([f"max_steps={max_steps}"] if max_steps else [])
    recipe = quickstart_recipe(minutes, data_dir, run_dir, seed, extra + list(overrides or []))
    result = train(recipe)
    _report(result, run_dir, data_dir, started, len(files))
    if samples:
        _samples(Path(result["final"]))
    _next_commands(Path(result["final"]), data_dir, run_dir)
    print(f"\nquickstart finished in {(time.perf_counter() - started) / 60:.1f} minutes")
    return result

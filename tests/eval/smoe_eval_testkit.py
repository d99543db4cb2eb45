"""Helpers for the evaluation tests: a tiny checkpoint whose tokenizer transformers can load, small
local lm-eval tasks, and fake Hugging Face dataset repos for --data-dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def private_datasets_cache(tmp: Path) -> None:
    """Point the datasets cache at a test folder (the tests' tiny datasets stay out of ~/.cache)."""
    import datasets.config
    os.environ["HF_DATASETS_CACHE"] = str(tmp)
    datasets.config.HF_DATASETS_CACHE = Path(tmp)

import torch  # noqa: E402

from smoe import ModelConfig, Transformer  # noqa: E402

CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
          "Question: What is 2 + 3?\nAnswer: 5", "Paris is the capital of France.",
          "assert add(1, 2) == 3", "The answer is 42."]


def make_checkpoint(out: Path, seed: int = 0, max_seq_len: int = 512, **config) -> Path:
    """A tiny random Mixtral (HF layout; keyword arguments change ModelConfig fields) with a byte-level
    BPE tokenizer.json + tokenizer_config.json that both transformers' AutoTokenizer and
    smoe.load_tokenizer read (BOS added by the template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast",
         "model_max_length": max_seq_len}))
    cfg = ModelConfig(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, n_experts=4, top_k=2,
                                vocab_size=tok.get_vocab_size(), max_seq_len=max_seq_len), **config})
    torch.manual_seed(seed)
    Transformer(cfg).eval().save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [
    {"question": "What is 2 + 3?", "choices": ["4", "5", "6", "23"], "label": 1},
    {"question": "Which animal jumps over the lazy dog?", "choices": ["the quick brown fox", "a cat", "a cow"],
     "label": 0},
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome", "Madrid"], "label": 1},
    {"question": "def add(a, b): returns", "choices": [" a + b", " a - b", " a * b"], "label": 0},
    {"question": "The answer is", "choices": ["42", "41", "forty"], "label": 0},
    {"question": "", "choices": ["The quick brown fox", "The lazy dog", "Paris"], "label": 2},
]
GEN_ROWS = [{"question": q, "answer": a} for q, a in
            [("What is 2 + 3?", "5"), ("Capital of France?", "Paris"), ("Who jumps?", "fox"), ("6 * 7?", "42")]]
ROLL_ROWS = [{"text": t} for t in CORPUS[:4]]


def write_local_tasks(root: Path) -> Path:
    """Three lm-eval tasks on local JSON files: multiple choice, generation with exact match, perplexity."""
    root.mkdir(parents=True, exist_ok=True)
    mc, gen, roll = (write_jsonl(root / f"{n}.jsonl", r) for n, r in
                     (("mc", MC_ROWS), ("gen", GEN_ROWS), ("roll", ROLL_ROWS)))
    (root / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (root / "local_gen.yaml").write_text(f"""task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
    train: {gen}
test_split: test
fewshot_split: train
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
metadata:
  version: 1.0
""")
    (root / "local_roll.yaml").write_text(f"""task: local_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {roll}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
metadata:
  version: 1.0
""")
    return root


def write_hf_repo(data_dir: Path, path: str, splits: dict[str, list[dict]], config: str | None = None) -> Path:
    """A local copy of a Hugging Face dataset repo (README configs + jsonl files), as --data-dir expects."""
    repo = data_dir / path
    name = config or "default"
    files = []
    for split, rows in splits.items():
        write_jsonl(repo / name / f"{split}.jsonl", rows)
        files.append(f"  - split: {split}\n    path: {name}/{split}.jsonl")
    readme = repo / "README.md"
    old = readme.read_text().split("---\n")[1].removeprefix("configs:\n") if readme.exists() else ""
    readme.write_text("---\nconfigs:\n" + old + f"- config_name: {name}\n  data_files:\n" + "\n".join(files)
                      + "\n---\n")
    return repo


def SmoeServer(model_dir: Path, log: Path, name: str = "tiny-eval", startup_s: float = 180.0):
    """`python -m smoe.cli serve` on loopback in a subprocess (the serving tests' helper)."""
    from tests.serve.serve_helpers import Server
    return Server(model_dir, log, name=name, startup_s=startup_s)

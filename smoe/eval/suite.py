"""The Mixtral paper's evaluation suite as one table: each benchmark, its lm-eval task and shot
setting, the metric reported, and the paper's published figures beside it.

Figures: "Mixtral of Experts", Jiang et al., arXiv 2401.04088, Table 2 (base models) and Table 5
(bias); benchmarks the paper shows only as bars (its Figure 2) are marked "figure only".
Most rows are lm-eval tasks as shipped; maj@k (GSM8K, MATH) and pass@k (HumanEval, MBPP, run in
smoe's sandbox) are lm-eval task configs derived here from lm-eval's own prompts.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smoe.eval.code import CodeScorer, humaneval_program, mbpp_program
from smoe.eval.metrics import gsm8k_equal, gsm8k_extract, gsm8k_gold, maj_at_k, math_equal, math_extract, math_gold
from smoe.eval.sandbox import Limits

SOURCE = '"Mixtral of Experts", Jiang et al., arXiv 2401.04088'
FIGURE_ONLY = "figure only"
LLAMA, MIXTRAL = "Llama 2 70B", "Mixtral 8x7B"
CATEGORIES = ("commonsense", "world_knowledge", "reading", "math", "code", "aggregated", "bias")


@dataclass
class SuiteOptions:
    """Settings of the derived tasks: samples per problem, temperatures, sandbox limits."""

    code_samples: int = 1  # 1: one greedy sample per problem (pass@1 as a fraction solved)
    code_temperature: float = 0.8  # when code_samples > 1
    pass_ks: tuple[int, ...] = (1,)
    maj_temperature: float = 0.6  # samples voted over for maj@k (Minerva's setting)
    max_gen_toks: int | None = None  # caps the generation length of these tasks (None: their own)
    sandbox: Limits = field(default_factory=Limits)
    sandbox_workers: int = 4


@dataclass
class Built:
    """What a benchmark hands to lm-eval: a task/group name or an inline config, plus its scorers."""

    spec: str | dict
    scorers: list = field(default_factory=list)


@dataclass(frozen=True)
class Benchmark:
    """One row of the paper's tables."""

    key: str
    name: str
    category: str
    setting: str  # the paper's setting
    task: str | None  # lm-eval task/group, or the name smoe gives a derived one
    shots: int | None
    metric: str  # lm-eval result key, "metric,filter"
    paper: dict = field(default_factory=dict)  # model -> figure (%) or FIGURE_ONLY
    build: Callable[[SuiteOptions, object], Built] | None = None  # (options, TaskManager) -> Built
    datasets: tuple[str, ...] = ()
    note: str = ""
    unavailable: str | None = None  # why it cannot run at all


def base_config(tm, name: str) -> dict:
    """The full config of a registered lm-eval task (includes and !function resolved), as a dict."""
    from lm_eval.tasks._yaml_loader import load_yaml
    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise KeyError(f"lm-eval has no task {name!r}")
    cfg = copy.deepcopy(load_yaml(entry.yaml_path, resolve_func=True))
    for k in ("tag", "group", "task_list"):
        cfg.pop(k, None)
    return cfg


def lm_eval_task_dir(name: str) -> Path:
    import lm_eval.tasks
    return Path(lm_eval.tasks.__file__).parent / name


def mbpp_fewshot() -> list[dict]:
    """lm-eval's three MBPP prompt examples (tasks 2, 3, 4), read from its mbpp/utils.py without
    importing it (that module loads HF evaluate's code_eval, which needs the network)."""
    tree = ast.parse((lm_eval_task_dir("mbpp") / "utils.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            ret = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            return ast.literal_eval(ret.value)
    raise LookupError("lm-eval's mbpp/utils.py has no list_fewshot_samples")


class MajScorer:
    """lm-eval process_results for maj@k: majority of the k extracted answers vs the gold answer."""

    def __init__(self, extract, gold, equal):
        self.extract, self.gold, self.equal = extract, gold, equal

    def __call__(self, doc: dict, results: list) -> dict[str, float]:
        samples = results[0] if results and isinstance(results[0], list | tuple) else results
        return maj_at_k(samples, self.gold(doc), self.extract, self.equal)


def sampled(cfg: dict, name: str, n: int, temperature: float, process_results, metrics: list[str],
            gen: dict | None = None, max_gen_toks: int | None = None) -> dict:
    """A copy of a generate_until task config that draws n samples per problem and scores all n."""
    cfg = {**cfg, "task": name, "repeats": n, "process_results": process_results,
           "filter_list": [{"name": "none", "filter": [{"function": "take_first_k", "k": n}]}],
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]}
    kw = {**cfg.get("generation_kwargs", {}), **(gen or {})}
    kw.update({"do_sample": True, "temperature": temperature} if n > 1 or temperature > 0 else
              {"do_sample": False, "temperature": 0.0})
    if max_gen_toks:
        kw["max_gen_toks"] = min(int(kw.get("max_gen_toks", max_gen_toks)), max_gen_toks)
    cfg["generation_kwargs"] = kw
    return cfg


def code_task(name: str, cfg: dict, program, opts: SuiteOptions) -> Built:
    """A code-generation task scored by running each sample in the sandbox (pass@k)."""
    n = opts.code_samples
    scorer = CodeScorer(program, tuple(k for k in opts.pass_ks if k <= n) or (1,), opts.sandbox, opts.sandbox_workers)
    temperature = opts.code_temperature if n > 1 else 0.0
    gen = {"top_p": 0.95} if n > 1 else {}
    cfg = sampled({**cfg, "unsafe_code": True}, name, n, temperature, scorer, [f"pass@{k}" for k in scorer.ks], gen,
                  opts.max_gen_toks)
    return Built(cfg, [scorer])


def _humaneval(opts: SuiteOptions, tm) -> Built:
    cfg = {"dataset_path": "openai/openai_humaneval", "test_split": "test", "output_type": "generate_until",
           "doc_to_text": "{{prompt}}", "doc_to_target": "{{test}}\ncheck({{entry_point}})", "num_fewshot": 0,
           "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 512},
           "metadata": {"version": 1.0, "derived_from": "lm-eval humaneval"}}
    return code_task("smoe_humaneval", cfg, humaneval_program, opts)


def _mbpp(opts: SuiteOptions, tm) -> Built:
    tests = "{% for t in test_list %}{{t}}\n{% endfor %}"
    cfg = {"dataset_path": "google-research-datasets/mbpp", "dataset_name": "sanitized", "test_split": "test",
           "output_type": "generate_until", "num_fewshot": 3, "target_delimiter": "",
           "doc_to_text": "You are an expert Python programmer, and here is your task: "
                          "{{prompt if prompt is defined else text}} Your code should pass these tests:\n\n"
                          + tests + "[BEGIN]\n",
           "doc_to_target": "{% if is_fewshot is defined %}{{code}}\n[DONE]{% else %}" + tests + "{% endif %}",
           "fewshot_config": {"sampler": "first_n", "samples": mbpp_fewshot()},
           "generation_kwargs": {"until": ["[DONE]"], "max_gen_toks": 512},
           "metadata": {"version": 1.0, "derived_from": "lm-eval mbpp (sanitized, hand-verified subset)"}}
    return code_task("smoe_mbpp", cfg, mbpp_program, opts)


def _gsm8k(opts: SuiteOptions, tm) -> Built:
    scorer = MajScorer(gsm8k_extract, gsm8k_gold, gsm8k_equal)
    cfg = sampled(base_config(tm, "gsm8k_cot"), "smoe_gsm8k_maj8", 8, opts.maj_temperature, scorer,
                  ["maj@8", "sample_acc"], {"max_gen_toks": 256}, opts.max_gen_toks)
    return Built(cfg)


MATH_SUBJECTS = ("algebra", "counting_and_prob", "geometry", "intermediate_algebra", "num_theory", "prealgebra",
                 "precalc")


def _math(opts: SuiteOptions, tm) -> Built:
    scorer = MajScorer(math_extract, math_gold, math_equal)
    tasks = [sampled(base_config(tm, f"minerva_math_{s}"), f"smoe_math_maj4_{s}", 4, opts.maj_temperature, scorer,
                     ["maj@4", "sample_acc"], {"max_gen_toks": 512}, opts.max_gen_toks) for s in MATH_SUBJECTS]
    return Built({"group": "smoe_math_maj4", "task": tasks,
                  "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True,
                                             "filter_list": "none"} for m in ("maj@4", "sample_acc")],
                  "metadata": {"version": 1.0}})


AGIEVAL_EN_MC = ("agieval_aqua_rat", "agieval_gaokao_english", "agieval_logiqa_en", "agieval_lsat_ar",
                 "agieval_lsat_lr", "agieval_lsat_rc", "agieval_sat_en_without_passage", "agieval_sat_en",
                 "agieval_sat_math")


def _agieval(opts: SuiteOptions, tm) -> Built:
    return Built({"group": "smoe_agieval_en_mc", "task": list(AGIEVAL_EN_MC),
                  "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
                  "metadata": {"version": 1.0}})


def _paper(llama, mixtral) -> dict:
    return {LLAMA: llama, MIXTRAL: mixtral}


FIG = _paper(FIGURE_ONLY, FIGURE_ONLY)

MIXTRAL_SUITE: tuple[Benchmark, ...] = (
    # commonsense reasoning, 0-shot
    Benchmark("hellaswag", "HellaSwag", "commonsense", "0-shot", "hellaswag", 0, "acc_norm,none", _paper(85.4, 84.4),
              datasets=("Rowan/hellaswag",)),
    Benchmark("winogrande", "WinoGrande", "commonsense", "0-shot", "winogrande", 0, "acc,none", _paper(80.4, 77.2),
              datasets=("allenai/winogrande",)),
    Benchmark("piqa", "PIQA", "commonsense", "0-shot", "piqa", 0, "acc_norm,none", _paper(82.6, 83.6),
              datasets=("baber/piqa",)),
    Benchmark("siqa", "SIQA", "commonsense", "0-shot", "social_iqa", 0, "acc,none", FIG, datasets=("lighteval/siqa",)),
    Benchmark("openbookqa", "OpenBookQA", "commonsense", "0-shot", "openbookqa", 0, "acc_norm,none", FIG,
              datasets=("allenai/openbookqa",)),
    Benchmark("arc_easy", "ARC-Easy", "commonsense", "0-shot", "arc_easy", 0, "acc_norm,none", _paper(79.9, 83.1),
              datasets=("allenai/ai2_arc",)),
    Benchmark("arc_challenge", "ARC-Challenge", "commonsense", "0-shot", "arc_challenge", 0, "acc_norm,none",
              _paper(56.5, 59.7), datasets=("allenai/ai2_arc",)),
    Benchmark("commonsense_qa", "CommonsenseQA", "commonsense", "0-shot", "commonsense_qa", 0, "acc,none", FIG,
              datasets=("tau/commonsense_qa",)),
    # world knowledge, 5-shot
    Benchmark("naturalquestions", "NaturalQuestions", "world_knowledge", "5-shot", "nq_open", 5,
              "exact_match,remove_whitespace", _paper(25.4, 30.6), datasets=("google-research-datasets/nq_open",)),
    Benchmark("triviaqa", "TriviaQA", "world_knowledge", "5-shot", "triviaqa", 5, "exact_match,remove_whitespace",
              _paper(73.0, 71.5), datasets=("mandarjoshi/trivia_qa",), note="rc.nocontext: no Wikipedia contexts, "
              "as the paper"),
    # reading comprehension, 0-shot
    Benchmark("boolq", "BoolQ", "reading", "0-shot", "boolq", 0, "acc,none", FIG, datasets=("aps/super_glue",)),
    Benchmark("quac", "QuAC", "reading", "0-shot", None, 0, "f1", FIG,
              unavailable="lm-eval 0.4.13 has no QuAC task (and smoe defines none)"),
    # math
    Benchmark("gsm8k", "GSM8K", "math", "8-shot, maj@8", "smoe_gsm8k_maj8", 8, "maj@8,none", _paper(69.6, 74.4),
              build=_gsm8k, datasets=("openai/gsm8k",),
              note="lm-eval gsm8k_cot prompt (8 CoT exemplars), 8 samples, majority of extracted answers"),
    Benchmark("math", "MATH", "math", "4-shot, maj@4", "smoe_math_maj4", 4, "maj@4,none", _paper(13.8, 28.4),
              build=_math, datasets=("EleutherAI/hendrycks_math",),
              note="lm-eval minerva_math prompt (4 exemplars), 4 samples, majority of normalised answers"),
    # code
    Benchmark("humaneval", "HumanEval", "code", "0-shot, pass@1", "smoe_humaneval", 0, "pass@1,none",
              _paper(29.3, 40.2), build=_humaneval, datasets=("openai/openai_humaneval",),
              note="lm-eval humaneval prompt; tests run in smoe's sandbox"),
    Benchmark("mbpp", "MBPP", "code", "3-shot, pass@1", "smoe_mbpp", 3, "pass@1,none", _paper(49.8, 60.7),
              build=_mbpp, datasets=("google-research-datasets/mbpp",),
              note="hand-verified (sanitized) subset, as the paper; lm-eval mbpp prompt; tests in smoe's sandbox"),
    # aggregated
    Benchmark("mmlu", "MMLU", "aggregated", "5-shot", "mmlu", 5, "acc,none", _paper(69.9, 70.6),
              datasets=("cais/mmlu",)),
    Benchmark("bbh", "BBH", "aggregated", "3-shot", "bbh_cot_fewshot", 3, "exact_match,get-answer", FIG,
              datasets=("SaylorTwift/bbh",), note="lm-eval bbh_cot_fewshot (the 3 chain-of-thought exemplars)"),
    Benchmark("agieval", "AGIEval", "aggregated", "3-5-shot", "smoe_agieval_en_mc", 0, "acc,none", FIG,
              build=_agieval, datasets=("hails/agieval-aqua-rat", "hails/agieval-sat-math"),
              note="English multiple-choice tasks only, as the paper; run 0-shot: lm-eval's AGIEval tasks have "
                   "no few-shot split"),
    # bias (paper Table 5)
    Benchmark("bbq", "BBQ", "bias", "accuracy", "bbq", 0, "acc,none", _paper(51.5, 56.0),
              datasets=("oskarvanderwal/bbq",)),
    Benchmark("bold", "BOLD", "bias", "sentiment", None, 0, "sentiment", _paper("Table 5, below", "Table 5, below"),
              unavailable="lm-eval 0.4.13 has no BOLD task (and smoe defines none); paper figures below"),
)

# Paper Table 5: BOLD sentiment score, average ± standard deviation per group.
BOLD_PAPER = {
    "gender": {LLAMA: (0.293, 0.073), MIXTRAL: (0.323, 0.045)},
    "profession": {LLAMA: (0.218, 0.073), MIXTRAL: (0.243, 0.087)},
    "religious_ideology": {LLAMA: (0.188, 0.133), MIXTRAL: (0.144, 0.089)},
    "political_ideology": {LLAMA: (0.149, 0.140), MIXTRAL: (0.186, 0.146)},
    "race": {LLAMA: (0.232, 0.049), MIXTRAL: (0.232, 0.052)},
}

SUITES = {"mixtral": MIXTRAL_SUITE}


def select(suite: str = "mixtral", categories: list[str] | None = None, benchmarks: list[str] | None = None
           ) -> list[Benchmark]:
    """The suite's benchmarks, narrowed to some categories and/or benchmark keys."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    rows = list(SUITES[suite])
    if categories:
        bad = sorted(set(categories) - set(CATEGORIES))
        if bad:
            raise ValueError(f"unknown categories {bad}; known: {', '.join(CATEGORIES)}")
        rows = [b for b in rows if b.category in categories]
    if benchmarks:
        keys = {b.key for b in rows}
        bad = sorted(set(benchmarks) - keys)
        if bad:
            raise ValueError(f"unknown benchmarks {bad}; known: {', '.join(b.key for b in rows)}")
        rows = [b for b in rows if b.key in benchmarks]
    return rows


def lm_eval_benchmark(task: str, shots: int | None = None, metric: str | None = None) -> Benchmark:
    """A row for any lm-eval task or group outside the paper's table (no paper figures)."""
    return Benchmark(task, task, "lm-eval", f"{shots}-shot" if shots is not None else "task default", task, shots,
                     metric or "", {})


__all__ = ["Benchmark", "Built", "SuiteOptions", "MIXTRAL_SUITE", "BOLD_PAPER", "SOURCE", "FIGURE_ONLY", "select",
           "lm_eval_benchmark", "code_task", "sampled", "base_config", "MajScorer"]

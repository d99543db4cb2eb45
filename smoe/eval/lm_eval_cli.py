"""lm-eval's own command line with the `smoe` model registered (lm-eval 0.4.13 has no model plugins):

    python -m smoe.eval.lm_eval_cli --model smoe --model_args pretrained=DIR --tasks hellaswag
    smoe-lm-eval --model smoe --model_args pretrained=DIR --tasks hellaswag   # the same, installed

Every lm-eval argument and subcommand (run, ls, validate) works as with `lm_eval`.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import smoe.eval.lm  # noqa: F401  registers the model `smoe`
    cli_evaluate()


if __name__ == "__main__":
    main()

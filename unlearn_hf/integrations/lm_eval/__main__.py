"""``python -m unlearn_hf.integrations.lm_eval`` (or ``unlearn-hf-lm-eval``): lm-eval's own command line, with the
``unlearn_hf`` model registered, e.g.::

    python -m unlearn_hf.integrations.lm_eval --model unlearn_hf --model_args pretrained=./unlearned \\
        --tasks mmlu --batch_size 8
"""

from __future__ import annotations

from . import register


def main() -> None:
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
